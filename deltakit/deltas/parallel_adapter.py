"""Parallel adapter (He et al. 2022): the sub-block output gets scale * up(act(down(x))), where x
is the sub-block's input, so the adapter runs beside the block instead of after it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..spec import check
from . import DeltaType
from .adapter import Adapter


@dataclass(frozen=True)
class Options:
    dim: int = 64
    act: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    scale: float = 4.0          # He et al.'s s=4 for the FFN parallel adapter

    def __post_init__(self):
        check(self.dim >= 1, f"parallel_adapter option dim={self.dim} must be at least 1")


class ParallelAdapter(Adapter):
    def __init__(self, fan_in: int, fan_out: int, opts: Options):
        super().__init__(fan_in, opts)
        self.up = type(self.up)(opts.dim, fan_out)   # the output width may differ from the input's
        self.up.weight.data.zero_()
        self.up.bias.data.zero_()
        self.scale = opts.scale

    def forward(self, x):
        return super().forward(x) * self.scale


def dims(pos) -> tuple:
    """(input width, output width): a projection's own, or the sub-block's hidden size twice."""
    return tuple(pos.shape) if pos.kind == "linear" else (pos.shape[0], pos.shape[0])


def count(opts: Options, pos) -> int:
    fan_in, fan_out = dims(pos)
    return fan_in * opts.dim + opts.dim + opts.dim * fan_out + fan_out


def build(opts: Options, pos, target) -> ParallelAdapter:
    return ParallelAdapter(*dims(pos), opts)


TYPE = DeltaType("parallel_adapter", Options, kinds=("attention", "block", "linear"), join="parallel",
                 count=count, build=build, default="ffn", doc="bottleneck adapter beside a sub-block")
