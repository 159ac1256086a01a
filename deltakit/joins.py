"""How a built delta joins the backbone's computation (forward hooks) and folds into its weights.

Hooks rather than module replacement: the backbone's modules, names and state_dict keys stay as
they were, and removing the hooks and the delta submodules gives back exactly the original model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import attention_joins
from .positions import is_backbone, is_linear


class Entry:
    """One delta at one position, and the hooks that join it."""

    def __init__(self, handle, position, delta_type, options, module, key: str):
        self.handle, self.position, self.type, self.options = handle, position, delta_type, options
        self.module, self.key = module, key
        self.join = delta_type.join_at(options, position)   # parallel | sequential | reparam | prefix | embed
        self.hooks: list = []
        self.merged = False
        self._inputs: list = []   # parallel deltas on sub-blocks: inputs seen by `pos.inp`

    @property
    def active(self) -> bool:
        return self.handle.enabled and not self.merged

    @property
    def gate(self):
        return self.module.gate

    @gate.setter
    def gate(self, value):
        self.module.gate = value

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def __repr__(self):
        return f"Entry({self.key})"


# ---- helpers -----------------------------------------------------------------------------------

def submodule(model, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def _first(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()))


def _gated(entry, value):
    gate = entry.module.gate
    return value if gate is None else value * gate


def _delta_dtype(module, fallback):
    p = next(module.parameters(), None)
    return p.dtype if p is not None else fallback


def _place(delta, out, cut):
    """Pad a slice's contribution to the full width of a fused projection's output."""
    if cut is None:
        return delta
    return F.pad(delta, (cut[0], out.shape[-1] - cut[1]))


def _on_tensor(out, fn):
    """Apply fn to a module's output, or to the first element of a tuple output."""
    if isinstance(out, tuple):
        return (fn(out[0]),) + out[1:]
    return fn(out)


def forward_with(module, params: dict, args, kwargs):
    """Run module.forward (no hooks) with some parameters replaced, as torch.func.functional_call
    does, but without re-entering this module's own forward hooks. A parameter registered under
    several names (BERT's MLM head: `predictions.bias` is `predictions.decoder.bias`) is replaced
    under all of them, whichever one forward reads."""
    aliases: dict = {}
    for alias, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(alias)
    saved = []
    try:
        for name, value in params.items():
            for alias in aliases.get(id(module.get_parameter(name)), [name]):
                owner_path, _, leaf = alias.rpartition(".")
                owner = submodule(module, owner_path)
                saved.append((owner, leaf, owner._parameters[leaf]))
                owner._parameters[leaf] = value
        return module.forward(*args, **kwargs)
    finally:
        for owner, leaf, value in reversed(saved):
            owner._parameters[leaf] = value


_LINEAR_IN_PARAMS = ("Conv1D", "T5LayerNorm", "CpmAntLayerNorm", "RMSNorm")


def linear_in_params(module) -> bool:
    """Is the output a linear function of the parameters (f(x; a+b) = f(x; a) + f(x; b))?
    Then a weight delta's contribution is f(x; delta) alone: exact in bf16 and cheap."""
    if any(name != "deltakit" for name, _ in module.named_children()):
        return False
    name = type(module).__name__
    if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)) or name in _LINEAR_IN_PARAMS:
        return True
    return name.endswith("RMSNorm") and not name.startswith("Gemma")  # Gemma scales by (1 + w)


# ---- installing hooks --------------------------------------------------------------------------

class Site:
    """The one forward hook of a module that deltas join. It applies them in a fixed order, as
    S3PET writes it: out = f(x; params + sum of reparam deltas) + sum of parallel deltas, then
    out += sum of sequential deltas, each seeing that same out. So the result does not depend on
    the order of attach() calls, and merging the foldable deltas leaves it unchanged."""

    def __init__(self, module):
        self.entries: list[Entry] = []
        self.fast = linear_in_params(module)
        self.hook = module.register_forward_hook(self, with_kwargs=True)
        self.remove = self.hook.remove

    def __call__(self, module, args, kwargs, out):
        active = [e for e in self.entries if e.active]
        if not active:
            return None
        reparam = [e for e in active if e.join == "reparam"]
        if reparam:
            out = self._reparam(module, reparam, args, kwargs, out)
        return _on_tensor(out, lambda o: self._add(active, _first(args, kwargs), o))

    def _reparam(self, module, entries, args, kwargs, out):
        params = dict(module.named_parameters())
        deltas: dict = {}
        for e in entries:
            for n, d in reparam_deltas(e, params).items():
                d = d.to(params[n].dtype)
                deltas[n] = deltas[n] + d if n in deltas else d
        values = any(hasattr(e.module, "values") for e in entries)
        if self.fast and not values:   # f(x; p + d) = f(x; p) + f(x; d): one cheap call, no cancellation
            zeros = {n: torch.zeros_like(p) for n, p in params.items() if n not in deltas and is_backbone(n)}
            return _on_tensor(out, lambda o: o + forward_with(module, {**zeros, **deltas}, args, kwargs))
        if values and all(e.module.gate is None for e in entries) and len(entries) == 1:
            replaced = {n: v.to(params[n].dtype) for n, v in entries[0].module.values().items()}
            return forward_with(module, replaced, args, kwargs)   # exact replacement
        return forward_with(module, {n: params[n] + d for n, d in deltas.items()}, args, kwargs)

    def _add(self, active, x, out):
        total = out
        for e in active:
            if e.join == "parallel":
                inp = e._inputs.pop() if e.position.kind in ("attention", "block") else x
                total = total + _contribution(e, inp, out)
        seq_in = total
        for e in active:
            if e.join == "sequential":
                cut = e.position.slice if e.position.kind == "linear" else None
                total = total + _contribution(e, seq_in if cut is None else seq_in[..., cut[0]:cut[1]], out)
        return total


def reparam_deltas(entry, params: dict) -> dict:
    """A reparam delta's gated change to each parameter: `weights()` are deltas (LNFit), `values()`
    are replacement values (full), whose delta is taken against the current parameters."""
    if hasattr(entry.module, "values"):
        return {n: _gated(entry, v - params[n]) for n, v in entry.module.values().items()}
    return {n: _gated(entry, d) for n, d in entry.module.weights().items()}


def _contribution(entry, x, out):
    delta = entry.module(x.to(_delta_dtype(entry.module, x.dtype)))
    cut = entry.position.slice if entry.position.kind == "linear" else None
    return _place(_gated(entry, delta).to(out.dtype), out, cut)


def _site(module) -> Site:
    site = module.__dict__.get("_deltakit_site")
    if site is None:
        site = Site(module)
        module.__dict__["_deltakit_site"] = site   # plain attribute: not a submodule, not in state_dict
    return site


def install(entry, model):
    pos = entry.position
    sub_block = pos.kind in ("attention", "block")
    if entry.join == "prefix":
        return attention_joins.install_prefix(entry, submodule(model, pos.path))
    if entry.join == "embed":
        return attention_joins.install_prompt(entry, model)
    if entry.join not in ("parallel", "sequential", "reparam"):
        raise NotImplementedError(f"join {entry.join!r} of delta type {entry.type.name!r} is not supported")
    if entry.join == "parallel" and sub_block:   # needs the sub-block's input, seen by `pos.inp`
        def remember(module, args, kwargs):
            if entry.active:
                entry._inputs.append(_first(args, kwargs))
        entry.hooks.append(submodule(model, pos.inp).register_forward_pre_hook(remember, with_kwargs=True))
    target = submodule(model, pos.out if sub_block and entry.join != "reparam" else pos.path)
    _site(target).entries.append(entry)
    entry.site_module = target


def uninstall(entry):
    if entry.join in attention_joins.SITE_ATTR:   # prefix, embed
        return attention_joins.uninstall(entry)
    for h in entry.hooks:
        h.remove()
    entry.hooks.clear()
    entry._inputs.clear()
    attention_joins.leave_site(entry, getattr(entry, "site_module", None), "_deltakit_site")


# ---- folding into the weights ------------------------------------------------------------------

def _fold_target(entry, model):
    return entry.site_module


def weight_deltas(entry, model):
    """{(module, param name): delta in that parameter's own layout and slice}, or None when the delta
    cannot be folded (an adapter, or a bias delta on a module without a bias)."""
    target = _fold_target(entry, model)
    if entry.join in ("prefix", "embed"):
        return None   # prefixes and prompts never fold into weights
    if entry.join == "reparam":
        params = dict(target.named_parameters())
        return {(target, n): d.detach() for n, d in reparam_deltas(entry, params).items()}
    if not hasattr(entry.module, "merge_delta"):
        return None
    out = {}
    cut = entry.position.slice if entry.position.kind == "linear" else None
    for name, delta in entry.module.merge_delta().items():
        param = getattr(target, name, None)
        if not isinstance(param, torch.Tensor):
            return None
        delta = _gated(entry, delta.detach())
        if name == "weight":   # a module computing x (scale * W)^T (native CPM-Ant) stores delta / scale
            delta = delta / getattr(target, "weight_scale", 1.0)
        conv1d = is_linear(target) and not isinstance(target, nn.Linear) and name == "weight"
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


def _shared_outside(model, module, name) -> bool:
    """Is `module`'s parameter `name` also registered in a module outside `module`? (A tied LM
    head's weight is the input embedding: folding a head delta into it would move the embedding.)"""
    param = module.get_parameter(name)
    inside = {id(m) for m in module.modules()}
    return any(p is param for m in model.modules() if id(m) not in inside for p in m._parameters.values())


def fold(entry, model, sign: int) -> bool:
    deltas = weight_deltas(entry, model)
    if deltas is None:
        return False
    if sign > 0 and any(_shared_outside(model, module, name) for module, name in deltas):
        return False   # stays live: the hook applies it to this module only
    with torch.no_grad():
        for (module, name), delta in deltas.items():
            param = module.get_parameter(name)
            if hasattr(entry.module, "values"):   # replacement values: keep the original to restore
                stash = entry.__dict__.setdefault("stash", {})
                if sign > 0:
                    stash[name] = param.detach().clone()
                    param.add_(delta.to(param.dtype))
                else:
                    param.copy_(stash.pop(name))
                continue
            param.add_(sign * delta.to(param.dtype))
    return True
