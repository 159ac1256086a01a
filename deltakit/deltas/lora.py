"""LoRA (Hu et al. 2021): out += (alpha/r) * B A dropout(x), with B zero-initialised so training
starts from the backbone. Mergeable: W += (alpha/r) B A. On a fused projection (GPT-2 c_attn) the
engine gives it one output slice, so `lora@attn.q` adapts only the query part."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..spec import check
from . import Delta, DeltaType


@dataclass(frozen=True)
class Options:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: Literal["kaiming", "gaussian"] = "kaiming"   # how A starts; B always starts at zero

    def __post_init__(self):
        check(self.r >= 1, f"lora option r={self.r} must be at least 1")
        check(0.0 <= self.dropout < 1.0, f"lora option dropout={self.dropout} must be in [0, 1)")


class LoRA(Delta):
    def __init__(self, fan_in: int, fan_out: int, opts: Options):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(opts.r, fan_in))
        self.lora_B = nn.Parameter(torch.zeros(fan_out, opts.r))
        self.scale = opts.alpha / opts.r
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout else None   # no module call when 0
        if opts.init == "kaiming":   # nn.Linear's default, as loralib and PEFT do
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1 / opts.r)

    def forward(self, x):
        x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # the scale goes on the (out, r) matrix, not on the (batch, seq, out) result
        return x @ self.lora_A.t() @ (self.lora_B.t() * self.scale)

    @property
    def down(self):   # the first matmul, x A^T, which LoRAs on one input share (joins/shared_input.py)
        return self.lora_A

    def add_into(self, out, x, t=None):
        """out + forward(x) as one addmm, so the (batch, seq, out) delta is never written on its own;
        t: x A^T when already computed. None when out is not in this delta's dtype (then the engine
        adds forward(x) itself)."""
        if not x.dtype == out.dtype == self.lora_A.dtype:
            return None
        if t is None:
            if self.dropout is not None:
                x = self.dropout(x)
            t = x @ self.lora_A.t()
        t = t.reshape(-1, self.lora_A.shape[0])
        return torch.addmm(out.reshape(-1, out.shape[-1]), t, self.lora_B.t(), alpha=self.scale).view(out.shape)

    def merge_delta(self):
        return {"weight": (self.lora_B @ self.lora_A) * self.scale}


def count(opts: Options, pos) -> int:
    fan_in, fan_out = pos.shape
    return opts.r * (fan_in + fan_out)


def build(opts: Options, pos, target) -> LoRA:
    return LoRA(*pos.shape, opts)


TYPE = DeltaType("lora", Options, kinds=("linear",), join="parallel", count=count, build=build,
                 default="attn.q,attn.v", doc="low-rank update of a projection, mergeable")
