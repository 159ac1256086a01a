"""BitFit (Ben Zaken et al. 2022): a zero-initialised bias added to a module's output, so it works
on modules that have no bias (LLaMA, CPM-Ant). Folds into the module's bias when it has one."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import Delta, DeltaType


@dataclass(frozen=True)
class Options:
    pass


class BitFit(Delta):
    def __init__(self, width: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return self.bias   # the same for every input (which it does not read, nor cast)

    def merge_delta(self):
        return {"bias": self.bias}


def count(opts: Options, pos) -> int:
    return pos.width


def build(opts: Options, pos, target) -> BitFit:
    return BitFit(pos.width)


TYPE = DeltaType("bitfit", Options, kinds=("linear", "norm", "attention", "block"), join="parallel",
                 count=count, build=build, default="attn.*,ffn.*,ln.*", doc="bias on a module's output")
