"""Folding a handle's deltas into the backbone's weights (merge) and taking them out again (unmerge).

What folds: reparam deltas (their values are written in) and parallel/sequential deltas with
`merge_delta()` (LoRA, BitFit on a module with a bias). Adapters, prefixes and prompts stay live.
A delta whose parameter is also registered outside its module (a tied LM head is the input
embedding) stays live too: folding it would move the embedding.

Exactness: merge() keeps a copy of every parameter it writes to (`keep_original=True`, the
default), and unmerge() copies it back, so the backbone comes back bit for bit in every dtype
(subtracting a delta again in bf16 does not: after 10 merge/unmerge cycles 22 % of a weight's
elements had moved). The cost is one copy of each weight a merge touches, on the weight's device:
for LoRA on q and v of CPM-Ant 10B in bf16, 96 matrices of 4096 x 4096, 3.2 GB. With
`keep_original=False` only reparam deltas keep theirs (the size of the delta itself), and unmerge
subtracts the foldable deltas again: exact in float32 up to rounding.

Several handles may merge into the same weight; they must unmerge in the reverse order.
"""
from __future__ import annotations

import torch

from ..errors import HandleError
from .site import ModuleSite, reparam_values, weight_changes


def _shared_outside(model, target, param) -> bool:
    """Is `param` (of `target`) also registered in a module outside `target`?"""
    inside = {id(m) for m in target.modules()}
    return any(p is param for m in model.modules() if id(m) not in inside for p in m._parameters.values())


def _params_of(target) -> dict:
    return target.__dict__[ModuleSite.attr].params()   # every reparam target has its module site


def plan_merge(handle) -> tuple[list, list, list]:
    """(reparam entries by target, foldable (entry, changes), keys that stay live)."""
    model = handle.model
    reparam, foldable, live = {}, [], []
    for e in handle.entries:
        if e.merged:
            continue
        if e.join == "reparam":
            params = _params_of(e.target)
            if any(_shared_outside(model, e.target, params[n]) for n in e.module.new_params(params)):
                live.append(e.key)
            else:
                reparam.setdefault(e.target, []).append(e)
            continue
        changes = weight_changes(e)
        if changes is None or any(_shared_outside(model, m, m._parameters[n]) for m, n in changes):
            live.append(e.key)
        else:
            foldable.append((e, changes))
    return reparam, foldable, live


def _owner(module, name):
    owner, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


def merge(handle, keep_original: bool = True) -> list[str]:
    reparam, foldable, live = plan_merge(handle)
    originals = handle.originals
    touched = set()
    with torch.no_grad():
        for target, entries in reparam.items():
            for name, value in reparam_values(entries, _params_of(target)).items():
                module, leaf = _owner(target, name)
                param = module._parameters[leaf]
                originals.setdefault((module, leaf), param.detach().clone())
                param.copy_(value)
                touched.add(id(param))
            for e in entries:
                e.merged = True
        for e, changes in foldable:
            for (module, leaf), delta in changes.items():
                param = module._parameters[leaf]
                if keep_original:
                    originals.setdefault((module, leaf), param.detach().clone())
                param.add_(delta.to(param.dtype))
                touched.add(id(param))
            e.merged = True
    handle.merge_record(touched)
    return live


def unmerge(handle):
    merged = [e for e in handle.entries if e.merged]
    if not merged:
        return
    handle.check_unmerge_order()
    originals = handle.originals
    with torch.no_grad():
        for e in merged:
            if e.join == "reparam":
                continue
            for (module, leaf), delta in weight_changes(e).items():
                if (module, leaf) not in originals:   # merged with keep_original=False
                    param = module._parameters[leaf]
                    param.sub_(delta.to(param.dtype))
        for (module, leaf), value in originals.items():
            module._parameters[leaf].copy_(value)
    originals.clear()
    for e in merged:
        e.merged = False
    handle.unmerge_record()


def refuse_while_merged(handle, what: str):
    if handle.merged:
        raise HandleError(f"handle {handle.name!r} is merged into the weights; {what} would make the next unmerge() "
                          f"take out deltas other than the ones put in. Call unmerge() first")
