"""BitFit (Ben Zaken et al. 2022): a zero-initialised bias added to a module's output, so it works
on modules that have no bias (LLaMA, CPM-Ant). Folds into the module's bias when it has one."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import DeltaType


@dataclass(frozen=True)
class Options:
    pass


class BitFit(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return self.bias   # the same for every input: a parallel delta that folds into a bias

    def merge_delta(self):
        return {"bias": self.bias}


def width(pos) -> int:
    return pos.shape[1] if pos.kind == "linear" else pos.shape[0]


def count(opts: Options, pos) -> int:
    return width(pos)


def build(opts: Options, pos, target) -> BitFit:
    return BitFit(width(pos))


TYPE = DeltaType("bitfit", Options, kinds=("linear", "norm", "attention", "block"), join="parallel",
                 count=count, build=build, default="attn.*,ffn.*,ln.*", doc="bias on a module's output")
