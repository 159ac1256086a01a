"""Delta types. Each file here defines one type as a small PyTorch module plus a `TYPE` record.

The protocol (what the engine in `deltakit/joins.py` relies on):

* `TYPE.options`: a dataclass of typed options with defaults; `__post_init__` rejects bad values.
* `TYPE.kinds`: the position kinds the type accepts (linear, norm, attention, block, embed, module).
* `TYPE.count(opts, pos)`: the number of parameters it adds at `pos`, known before building
  (the structure search needs it).
* `TYPE.build(opts, pos, target)`: the delta module. `target` is the module at `pos.path`.
* `TYPE.join`: how the delta module joins the computation:
    - "parallel":   out += delta(x), x the input of the position (for a sub-block, of `pos.inp`);
    - "sequential": out += delta(out), out the output of the position (for a sub-block, of `pos.out`);
    - "reparam":    the module runs with params + delta.weights() (a dict name -> delta tensor);
    - "prefix":     module(batch) -> (keys, values), each (batch or 1, n, key width), that every
                    query of the attention module at `pos.path` sees (deltakit/attention_joins.py);
    - "embed":      module(batch) -> (batch, n, dim) vectors inserted before the input.
  `TYPE.join_of(opts, pos)`, when given, picks the join per position instead (a prompt on native
  prompt rows is a reparam; a hypernetwork joins as the delta it generates).
  A parallel or sequential delta that can be folded into the weights defines
  `merge_delta() -> {param name: delta}` in nn.Linear layout; reparam deltas always fold.
* Every delta instance has a `gate` attribute (None = 1) that the engine multiplies into its
  contribution; the S3PET search sets it, normal use leaves it alone.
* Shared parameters (hypernetwork deltas): `TYPE.shared(opts, positions)` builds one module for
  all positions one rule places, and `TYPE.shared_count(opts, positions)` counts its parameters,
  known before building. The engine builds it once per rule and passes it as
  `build(opts, pos, target, shared=...)`; `count(opts, pos)` is then only what each position adds on
  its own, so plan/handle totals count shared parameters exactly once (`Plan.shared`). A delta
  module must not register the shared module as a submodule (keep it in `__dict__`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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
    join_of: Callable | None = None    # (opts, pos) -> join, when it depends on the position/options
    shared: Callable | None = None     # (opts, positions) -> one module shared by a rule's positions
    shared_count: Callable | None = None   # (opts, positions) -> its parameter count

    def join_at(self, opts, pos) -> str:
        return self.join_of(opts, pos) if self.join_of else self.join


TYPES: dict[str, DeltaType] = {}


def register(delta_type: DeltaType) -> DeltaType:
    """Add a delta type (also for user-defined ones); its name becomes usable in specs."""
    TYPES[delta_type.name] = delta_type
    return delta_type


def _register_builtins():
    from . import adapter, bitfit, full, hyper, lnfit, lora, lowrank_adapter, parallel_adapter, prefix, prompt
    for module in (lora, adapter, parallel_adapter, lowrank_adapter, bitfit, lnfit, full, prefix, prompt, hyper):
        register(module.TYPE)


_register_builtins()
