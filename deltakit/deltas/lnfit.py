"""LNFit (a candidate of S3PET-M): a zero-initialised delta on a norm's scale, weight + delta.
The norm runs once, with weight + delta in place of its weight, whatever its formula
(x * w, or Gemma-style x * (1 + w)): a zero delta changes nothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import Delta, DeltaType


@dataclass(frozen=True)
class Options:
    pass


class LNFit(Delta):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def new_params(self, params):
        return {"weight": params["weight"] + self.weight}


def count(opts: Options, pos) -> int:
    return pos.shape[0]


def build(opts: Options, pos, target) -> LNFit:
    return LNFit(pos.shape[0])


TYPE = DeltaType("lnfit", Options, kinds=("norm",), join="reparam", count=count, build=build,
                 default="ln.*", doc="delta on a norm's scale, mergeable")
