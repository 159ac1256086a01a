"""Full tuning of one module (a classification head, an embedding...): a trainable copy of its
parameters that the module runs with (PEFT's modules_to_save). The backbone itself is never written
to, so detach() restores it exactly; the copy is saved as absolute values, so a checkpoint does not
depend on how the backbone's (e.g. randomly initialised) head started."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..positions import backbone_params
from . import Delta, DeltaType


@dataclass(frozen=True)
class Options:
    pass


class Full(Delta):
    def __init__(self, target: nn.Module):
        super().__init__()
        # ParameterDict keys cannot hold dots: 'dense.weight' is stored as 'dense__weight'
        self.value = nn.ParameterDict({name.replace(".", "__"): nn.Parameter(p.detach().float().clone())
                                       for name, p in backbone_params(target)})

    def new_params(self, params):
        return {key.replace("__", "."): value for key, value in self.value.items()}


def count(opts: Options, pos) -> int:
    return pos.params


def build(opts: Options, pos, target) -> Full:
    return Full(target)


TYPE = DeltaType("full", Options, kinds=("linear", "norm", "embed", "rows", "module", "attention", "block"),
                 join="reparam", count=count, build=build, default="head",
                 doc="tune every parameter of a module (e.g. a classification head), mergeable")
