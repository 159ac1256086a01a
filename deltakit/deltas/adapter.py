"""Sequential bottleneck adapter (Houlsby et al. 2019): h += up(act(down(h))) on the output of a
sub-block (`adapter@attn,ffn` is Houlsby's placement, `adapter@ffn` Pfeiffer's) or of a projection.
`up` starts at zero, so the adapter starts as the identity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..spec import check
from . import Delta, DeltaType

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
Act = Literal["relu", "gelu", "silu", "tanh"]   # the keys of ACTIVATIONS, for Options fields


@dataclass(frozen=True)
class Options:
    dim: int = 64                                          # bottleneck width
    act: Act = "relu"

    def __post_init__(self):
        check(self.dim >= 1, f"adapter option dim={self.dim} must be at least 1")


class Adapter(Delta):
    """up(act(down(x))) * scale, from fan_in to fan_out features through `dim`; up starts at zero."""

    def __init__(self, fan_in: int, fan_out: int, dim: int, act: str, scale: float = 1.0):
        super().__init__()
        self.down = nn.Linear(fan_in, dim)
        self.act = ACTIVATIONS[act]()
        self.up = nn.Linear(dim, fan_out)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        out = self.up(self.act(self.down(h.to(self.down.weight.dtype))))
        return out if self.scale == 1.0 else out * self.scale


def count(opts: Options, pos) -> int:
    d = pos.width
    return 2 * d * opts.dim + opts.dim + d


def build(opts: Options, pos, target) -> Adapter:
    return Adapter(pos.width, pos.width, opts.dim, opts.act)


TYPE = DeltaType("adapter", Options, kinds=("attention", "block", "linear"), join="sequential",
                 count=count, build=build, default="attn,ffn",
                 doc="sequential bottleneck adapter (Houlsby: @attn,ffn; Pfeiffer: @ffn)")
