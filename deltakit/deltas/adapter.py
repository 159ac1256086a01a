"""Sequential bottleneck adapter (Houlsby et al. 2019): h += up(act(down(h))) on the output of a
sub-block (`adapter@attn,ffn` is Houlsby's placement, `adapter@ffn` Pfeiffer's) or of a projection.
`up` starts at zero, so the adapter starts as the identity."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..spec import check
from . import DeltaType

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class Options:
    dim: int = 64                                          # bottleneck width
    act: Literal["relu", "gelu", "silu", "tanh"] = "relu"

    def __post_init__(self):
        check(self.dim >= 1, f"adapter option dim={self.dim} must be at least 1")


class Adapter(nn.Module):
    def __init__(self, hidden: int, opts: Options):
        super().__init__()
        self.down = nn.Linear(hidden, opts.dim)
        self.act = ACTIVATIONS[opts.act]()
        self.up = nn.Linear(opts.dim, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return self.up(self.act(self.down(h)))


def hidden_size(pos) -> int:
    """Width of what the adapter sees: a projection's output, or a sub-block's hidden size."""
    return pos.shape[1] if pos.kind == "linear" else pos.shape[0]


def count(opts: Options, pos) -> int:
    d = hidden_size(pos)
    return 2 * d * opts.dim + opts.dim + d


def build(opts: Options, pos, target) -> Adapter:
    return Adapter(hidden_size(pos), opts)


TYPE = DeltaType("adapter", Options, kinds=("attention", "block", "linear"), join="sequential",
                 count=count, build=build, default="attn,ffn",
                 doc="sequential bottleneck adapter (Houlsby: @attn,ffn; Pfeiffer: @ffn)")
