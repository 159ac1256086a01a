"""Prefix tuning (Li & Liang 2021): n learned key and value vectors that every query of an
attention module sees in front of the real keys, `prefix@attn` (self attention) or `prefix@cross`
(T5 cross attention). The vectors live in the module's projected key/value space, after any rotary
embedding, and have no position; `deltakit/joins/prefix.py` says how each family is joined.

`mlp=<hidden>` reparameterises them as in the paper: an (n, d) embedding through
Linear(d, hidden) -> tanh -> Linear(hidden, 2 * kv width), one MLP per position (the paper shares
one across layers; per position keeps a delta one module). After training the MLP can be dropped:
`Prefix.kv(1)` are the vectors. `mlp=0` (default) learns them directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..spec import check
from . import Delta, DeltaType


@dataclass(frozen=True)
class Options:
    n: int = 10                                  # prefix vectors per attention module
    mlp: int = 0                                 # hidden width of the reparameterisation MLP; 0: none
    init: Literal["normal", "zeros"] = "normal"
    std: float = 0.5                             # of the normal init (keys/values, or the MLP input)

    def __post_init__(self):
        check(self.n >= 1, f"prefix option n={self.n} must be at least 1")
        check(self.mlp >= 0, f"prefix option mlp={self.mlp} must be 0 (no MLP) or a hidden width")
        check(self.std > 0, f"prefix option std={self.std} must be positive")


class Prefix(Delta):
    def __init__(self, dim: int, kv: int, opts: Options):
        super().__init__()
        self.n, self.kv_width = opts.n, kv
        if opts.mlp:
            self.embed = nn.Parameter(torch.empty(opts.n, dim))
            self.mlp = nn.Sequential(nn.Linear(dim, opts.mlp), nn.Tanh(), nn.Linear(opts.mlp, 2 * kv))
            drawn = [self.embed]
        else:
            self.key = nn.Parameter(torch.empty(opts.n, kv))
            self.value = nn.Parameter(torch.empty(opts.n, kv))
            drawn = [self.key, self.value]
        for p in drawn:
            if opts.init == "normal":
                nn.init.normal_(p, std=opts.std)
            else:
                nn.init.zeros_(p)

    def forward(self, batch: int):
        """(keys, values), each (1, n, kv width): the same prefix for every example."""
        if hasattr(self, "mlp"):
            k, v = self.mlp(self.embed).split(self.kv_width, dim=-1)
        else:
            k, v = self.key, self.value
        return k[None], v[None]


def mlp_count(opts: Options, dim: int, kv: int) -> int:
    return opts.n * dim + dim * opts.mlp + opts.mlp + opts.mlp * 2 * kv + 2 * kv


def count(opts: Options, pos) -> int:
    kv = pos.kv or 0
    if not kv:
        return 0
    return mlp_count(opts, pos.shape[0], kv) if opts.mlp else 2 * opts.n * kv


def build(opts: Options, pos, target) -> Prefix:
    return Prefix(pos.shape[0], pos.kv, opts)


TYPE = DeltaType("prefix", Options, kinds=("attention",), join="prefix", count=count, build=build,
                 default="attn", doc="learned key/value prefixes for attention (Li & Liang)")
