"""Delta types. Each file here defines one type as a small PyTorch module plus a `TYPE` record.

The protocol, as torchtune's `AdapterModule` states its own: what a delta type declares, and the
one or two methods the engine (`deltakit/joins/`) calls on a delta module.

The type record (`DeltaType`):
* `options`: a dataclass of typed options with defaults; `__post_init__` rejects bad values.
* `kinds`: the position kinds the type accepts (linear, norm, attention, block, embed, rows, module).
* `count(opts, pos)`: the number of parameters it adds at `pos`, known before building (the
  structure search needs it). `build(opts, pos, target)`: the delta module (`target`: the module at
  `pos.path`).
* `join`: how the module joins the computation (`join_of(opts, pos)` picks it per position instead):
    - "parallel":   out += delta(x), x the input of the position (of `pos.inp` for a sub-block);
    - "sequential": out += delta(out), out the output of the position (of `pos.out` for a sub-block);
    - "reparam":    the module runs with `delta.new_params(params)` in place of those parameters
                    (`Reparam`); they are put in place before it runs and taken out after it;
    - "prefix":     delta(batch) -> (keys, values), each (batch or 1, n, key width), that every query
                    of the attention module at `pos.path` sees (`deltakit/joins/prefix.py`);
    - "prompt":     delta(batch) -> (batch, n, dim) vectors inserted before the input
                    (`deltakit/joins/prompt.py`).
* Parameters one rule shares over all its positions (hypernetworks): `build_shared(opts,
  positions)` builds that one module and `count_shared(opts, positions)` counts it before building;
  `build(opts, pos, target, shared=...)` then gets it, and `count` is only what each position adds
  on its own, so totals count shared parameters once.

The delta module (a `Delta`):
* `gate`: None (= 1) or a tensor the engine multiplies into the delta's contribution (for a
  reparam delta: into its change of the parameters). The S3PET search sets it.
* Inputs arrive in the backbone's dtype (bf16 on a GPU); a delta casts what it reads to its own
  dtype, and the engine casts its contribution back.
* `merge_delta() -> {param name: delta}` (`Foldable`, nn.Linear layout): a parallel or sequential
  delta that folds into the weights. Reparam deltas always fold (their new values are written in).
* optional, parallel deltas: `add_into(out, x) -> out + delta(x)`, or None when it cannot; a cheaper
  way to add (LoRA: one addmm), used where no gate or slice applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn

JOINS = ("parallel", "sequential", "reparam", "prefix", "prompt")


class Delta(nn.Module):
    """Base of every delta module: it only declares the gate."""

    gate: torch.Tensor | None = None


@runtime_checkable
class Foldable(Protocol):
    def merge_delta(self) -> dict[str, torch.Tensor]:
        """The change of each parameter of the target module, in nn.Linear layout."""


@runtime_checkable
class Reparam(Protocol):
    def new_params(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values the target module runs with, for each parameter this delta changes, given
        the current ones (`params`, the module's own, by name)."""


@dataclass(frozen=True)
class DeltaType:
    name: str
    options: type
    kinds: tuple
    join: str
    count: Callable
    build: Callable
    default: str            # placement used when a rule has no '@'
    positional: str | None = None  # option that may be written without 'key=' first
    doc: str = ""
    join_of: Callable | None = None        # (opts, pos) -> join, when it depends on the position/options
    build_shared: Callable | None = None   # (opts, positions) -> one module shared by a rule's positions
    count_shared: Callable | None = None   # (opts, positions) -> its parameter count

    def join_at(self, opts, pos) -> str:
        return self.join_of(opts, pos) if self.join_of else self.join


TYPES: dict[str, DeltaType] = {}


def register(delta_type: DeltaType) -> DeltaType:
    """Add a delta type (also for user-defined ones); its name becomes usable in specs."""
    if delta_type.join not in JOINS:
        from ..errors import SpecError
        raise SpecError(f"delta type {delta_type.name!r} joins as {delta_type.join!r}; a delta joins as one of "
                        f"{', '.join(JOINS)}")
    TYPES[delta_type.name] = delta_type
    return delta_type


def _register_builtins():
    from . import adapter, bitfit, full, hyper, lnfit, lora, lowrank_adapter, parallel_adapter, prefix, prompt
    for module in (lora, adapter, parallel_adapter, lowrank_adapter, bitfit, lnfit, full, prefix, prompt, hyper):
        register(module.TYPE)


_register_builtins()
