"""Parallel adapter (He et al. 2022): the sub-block output gets scale * up(act(down(x))), where x
is the sub-block's input, so the adapter runs beside the block instead of after it."""
from __future__ import annotations

from dataclasses import dataclass

from ..spec import check
from . import DeltaType
from .adapter import Act, Adapter


@dataclass(frozen=True)
class Options:
    dim: int = 64
    act: Act = "relu"
    scale: float = 4.0          # He et al.'s s=4 for the FFN parallel adapter

    def __post_init__(self):
        check(self.dim >= 1, f"parallel_adapter option dim={self.dim} must be at least 1")


def dims(pos) -> tuple:
    """(input width, output width): a projection's own, or the sub-block's hidden size twice."""
    return tuple(pos.shape) if pos.kind == "linear" else (pos.width, pos.width)


def count(opts: Options, pos) -> int:
    fan_in, fan_out = dims(pos)
    return fan_in * opts.dim + opts.dim + opts.dim * fan_out + fan_out


def build(opts: Options, pos, target) -> Adapter:
    return Adapter(*dims(pos), opts.dim, opts.act, scale=opts.scale)


TYPE = DeltaType("parallel_adapter", Options, kinds=("attention", "block", "linear"), join="parallel",
                 count=count, build=build, default="ffn", doc="bottleneck adapter beside a sub-block")
