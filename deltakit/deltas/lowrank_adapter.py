"""Low-rank adapter (Compacter's LowRankAdapter, a candidate of S3PET-M): a sequential bottleneck
adapter whose down and up maps are each a rank-`rank` product u v^T, so it costs
2*rank*(d+dim) + dim + d parameters instead of 2*d*dim + dim + d."""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import nn

from ..spec import check
from . import Delta, DeltaType
from .adapter import ACTIVATIONS, Act


@dataclass(frozen=True)
class Options:
    dim: int = 32
    rank: int = 1
    act: Act = "gelu"

    def __post_init__(self):
        check(self.dim >= 1, f"lowrank_adapter option dim={self.dim} must be at least 1")
        check(self.rank >= 1, f"lowrank_adapter option rank={self.rank} must be at least 1")


class LowRankLinear(nn.Module):
    """y = x (u v^T)^T + b with u: (out, rank), v: (in, rank)."""

    def __init__(self, fan_in: int, fan_out: int, rank: int, zero: bool = False):
        super().__init__()
        bound = 1 / math.sqrt(fan_in)
        self.u = nn.Parameter(torch.zeros(fan_out, rank) if zero else torch.empty(fan_out, rank).uniform_(-bound, bound))
        self.v = nn.Parameter(torch.empty(fan_in, rank).uniform_(-1, 1))
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x):
        return (x @ self.v) @ self.u.t() + self.bias


class LowRankAdapter(Delta):
    def __init__(self, hidden: int, opts: Options):
        super().__init__()
        self.down = LowRankLinear(hidden, opts.dim, opts.rank)
        self.act = ACTIVATIONS[opts.act]()
        self.up = LowRankLinear(opts.dim, hidden, opts.rank, zero=True)   # starts as the identity

    def forward(self, h):
        return self.up(self.act(self.down(h.to(self.down.bias.dtype))))


def count(opts: Options, pos) -> int:
    d = pos.width
    return 2 * opts.rank * (d + opts.dim) + opts.dim + d


def build(opts: Options, pos, target) -> LowRankAdapter:
    return LowRankAdapter(pos.width, opts)


TYPE = DeltaType("lowrank_adapter", Options, kinds=("attention", "block", "linear"), join="sequential",
                 count=count, build=build, default="attn,ffn", doc="adapter with rank-1 factored maps")
