"""Module sites: parallel, sequential and reparam deltas on one module.

Each module with deltas gets one forward pre-hook and one forward hook, and the deltas compose in a
fixed order, as S3PET writes it:

    out = f(x; params with the reparam deltas in place) + sum of parallel deltas
    out = out + sum of sequential deltas, each seeing that same out

so the result does not depend on the order of attach() calls, and merging the foldable deltas
leaves it unchanged. The module runs once: the pre-hook puts the reparam deltas' values in place
of its parameters (under every name a parameter is registered by, found once at install), the
forward hook takes them out again, also when the forward raises (`always_call`), then adds the
parallel and sequential contributions. A model with deltas must not run forwards from several
threads at once (the parameters are swapped on the module while it runs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DeltakitError
from ..positions import backbone_params
from .base import Site, common_parent, join_site


def submodule(model, path: str):
    return model.get_submodule(path) if path else model


def first_input(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def gated(entry, value):
    gate = entry.module.gate
    return value if gate is None else value * gate


def reparam_values(entries, params: dict) -> dict:
    """The values the module runs with, per parameter the reparam `entries` change. One delta on a
    parameter: its value exactly (full's copy is exact in any dtype); several: the original plus the
    sum of their gated changes, so their order does not matter."""
    changes: dict = {}
    for e in entries:
        for name, value in e.module.new_params(params).items():
            changes.setdefault(name, []).append((e, value))
    out = {}
    for name, items in changes.items():
        p = params[name]
        if len(items) == 1 and items[0][0].module.gate is None:
            out[name] = items[0][1].to(p.dtype)
        else:
            out[name] = (p + sum(gated(e, v - p) for e, v in items)).to(p.dtype)
    return out


def _on_tensor(out, fn):
    """Apply fn to a module's output, or to the first element of a tuple output."""
    if isinstance(out, tuple):
        return (fn(out[0]),) + out[1:]
    return fn(out)


def _contribution(entry, x, out):
    delta = gated(entry, entry.module(x)).to(out.dtype)
    cut = entry.position.slice   # a slice of a fused projection: pad to the full output width
    return delta if cut is None else F.pad(delta, (cut[0], out.shape[-1] - cut[1]))


class ModuleSite(Site):
    attr = "_deltakit_site"

    def __init__(self, module):
        super().__init__(module)
        # every (owner, leaf) a backbone parameter is registered under, by its name in `module`:
        # BERT's MLM head reads `predictions.bias` as `predictions.decoder.bias` too
        self.names: dict = {}
        for alias, p in module.named_parameters(remove_duplicate=False):
            if "deltakit" in alias.split("."):
                continue
            owner, _, leaf = alias.rpartition(".")
            self.names.setdefault(id(p), []).append((submodule(module, owner), leaf))
        self.by_name = {name: self.names[id(p)] for name, p in backbone_params(module)}
        self.swapped: list = []
        self.hooks = [module.register_forward_pre_hook(self.before),
                      module.register_forward_hook(self.after, with_kwargs=True, always_call=True)]

    def params(self) -> dict:
        return {name: owners[0][0]._parameters[owners[0][1]] for name, owners in self.by_name.items()}

    def before(self, module, args):
        reparam = [e for e in self.active() if e.join == "reparam"]
        if not reparam:
            return None
        for name, value in reparam_values(reparam, self.params()).items():
            for owner, leaf in self.by_name[name]:
                self.swapped.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = value
        return None

    def after(self, module, args, kwargs, out):
        while self.swapped:   # also when the forward raised: the module gets its own parameters back
            owner, leaf, value = self.swapped.pop()
            owner._parameters[leaf] = value
        if out is None:
            return None
        active = [e for e in self.active() if e.join != "reparam"]
        if not active:
            return None
        return _on_tensor(out, lambda o: self._add(active, first_input(args, kwargs), o))

    def _add(self, active, x, out):
        total = out
        for e in active:
            if e.join == "parallel":
                inp = x
                if e.position.kind in ("attention", "block"):   # the sub-block's input, seen at `pos.inp`
                    inp, e.seen = e.seen, None
                    if inp is None:
                        raise DeltakitError(f"{e.key}: the input of the sub-block ({e.position.inp}) was not seen in "
                                            f"this forward; the model does not run it before {e.position.out}")
                fused = getattr(e.module, "add_into", None)
                if fused is not None and e.module.gate is None and e.position.slice is None:
                    t = e.shared_input.part(e, inp) if e.shared_input is not None else None
                    result = fused(total, inp, t)
                    if result is not None:
                        total = result
                        continue
                total = total + _contribution(e, inp, out)
        seq_in = total
        for e in active:
            if e.join == "sequential":
                cut = e.position.slice
                total = total + _contribution(e, seq_in if cut is None else seq_in[..., cut[0]:cut[1]], out)
        return total


def install(entry, model):
    pos = entry.position
    sub_block = pos.kind in ("attention", "block")
    if entry.join == "parallel" and sub_block:   # needs the sub-block's input, seen by `pos.inp`
        def remember(module, args, kwargs):
            if entry.active:
                entry.seen = first_input(args, kwargs)

        def forget(module, args, out):   # also after a forward that raised: hold no activation
            entry.seen = None
        hooks = [submodule(model, pos.inp).register_forward_pre_hook(remember, with_kwargs=True),
                 submodule(model, common_parent([pos.inp, pos.out])).register_forward_hook(forget, always_call=True)]
        entry.undo.append(lambda: [h.remove() for h in hooks])
    target = submodule(model, pos.out if sub_block and entry.join != "reparam" else pos.path)
    join_site(entry, target, ModuleSite)
    entry.target = target
    if entry.join == "reparam":   # T5's `shared` embedding is never called: the modules that run it are
        for path in pos.calls:
            join_site(entry, submodule(model, path), ModuleSite)


# ---- folding into the weights ------------------------------------------------------------------

def weight_changes(entry) -> dict | None:
    """{(module, param name): change} in that parameter's own layout and slice, for a foldable
    parallel or sequential delta; None when it cannot fold (an adapter, a bias on a module without one)."""
    from ..deltas import Foldable
    from ..positions import is_linear
    target = entry.target
    if entry.join not in ("parallel", "sequential") or not isinstance(entry.module, Foldable):
        return None
    out = {}
    cut = entry.position.slice
    for name, delta in entry.module.merge_delta().items():
        param = target._parameters.get(name)
        if param is None:
            return None
        delta = gated(entry, delta.detach())
        fam = entry.handle.family
        if name == "weight" and fam is not None and fam.weight_scale:   # x (s W)^T (native CPM-Ant): W += delta / s
            delta = delta / getattr(target, fam.weight_scale, 1.0)
        conv1d = is_linear(target) and not isinstance(target, torch.nn.Linear) and name == "weight"
        if conv1d:   # HF Conv1D stores (in, out)
            delta = delta.t()
        if cut is not None:   # a slice of a fused projection: rows (Linear) or columns (Conv1D)
            full = torch.zeros_like(param, dtype=delta.dtype)
            if conv1d:
                full[:, cut[0]:cut[1]] = delta
            else:
                full[cut[0]:cut[1]] = delta
            delta = full
        out[(target, name)] = delta
    return out
