"""attach / plan / the Handle: the lifecycle of a set of deltas on one model."""
from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import joins, spec as specs
from .deltas import TYPES
from .errors import HandleError, KindError, PatternError, SpecError, listing
from .positions import Position, backbone_params, match, positions

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Planned:
    """One delta that attach() would build: where, what, with which options, and its size."""
    position: Position
    type: object
    options: object
    num_params: int
    rule: str

    @property
    def key(self) -> str:
        return f"{self.position.name}.{self.type.name}"


@dataclass(frozen=True)
class SharedPlan:
    """Parameters one rule shares across its positions (a hypernetwork), counted once."""
    type: object
    options: object
    positions: tuple
    num_params: int
    rule: str


class Plan(list):
    """The Planned deltas, plus `shared`: rule text -> SharedPlan. `num_params` counts both."""

    def __init__(self, items=(), shared=None):
        super().__init__(items)
        self.shared: dict[str, SharedPlan] = dict(shared or {})

    @property
    def num_params(self) -> int:
        return sum(p.num_params for p in self) + sum(s.num_params for s in self.shared.values())


def plan(model, spec: str, table: list | None = None) -> Plan:
    """Resolve a spec against a model without building anything (counts are known up front).
    Shared parameters (hypernetworks) are in `.shared`, once per rule; `.num_params` is the total."""
    table = positions(model) if table is None else table
    planned, seen = Plan(), {}
    for rule in specs.parse(spec):
        if rule.type not in TYPES:
            raise specs.unknown_type(rule.type, TYPES)
        dtype = TYPES[rule.type]
        opts = specs.make_options(dtype, rule.options, where=f"in rule {rule.text!r}: ")
        for pattern in rule.patterns or tuple(p.strip() for p in dtype.default.split(",")):
            hits = match(model, table, pattern)
            fits = [p for p in hits if p.kind in dtype.kinds]
            wildcard = pattern.startswith("re:") or any(c in pattern for c in "*?[") or "-" in pattern
            wrong = [p for p in hits if p.kind not in dtype.kinds]
            if not fits or (wrong and not wildcard):
                p = wrong[0]
                examples = listing({q.local for q in table if q.kind in dtype.kinds}, 8)
                raise KindError(f"in rule {rule.text!r}: {dtype.name} cannot go at {p.name!r}, {_article(p.kind)} {p.kind} position; "
                                f"{dtype.name} takes {', '.join(dtype.kinds)} positions, such as {examples}")
            sized = [p for p in fits if dtype.count(opts, p) > 0]   # e.g. `full` on a dropout: nothing to tune
            if not sized:
                raise KindError(f"in rule {rule.text!r}: {dtype.name} would add no parameters at "
                                f"{fits[0].name!r} (the module has none); pick a module with parameters")
            if len(sized) < len(fits) and not wildcard:
                bad = next(p for p in fits if p not in sized)
                raise KindError(f"in rule {rule.text!r}: {dtype.name} would add no parameters at {bad.name!r}")
            for p in sized:
                item = Planned(p, dtype, opts, dtype.count(opts, p), rule.text)
                if item.key in seen:
                    if seen[item.key].rule != rule.text:
                        raise SpecError(f"{dtype.name} at {p.name!r} is asked for twice, by {seen[item.key].rule!r} "
                                        f"and {rule.text!r}; keep one (or use a second handle with name=...)")
                    continue
                seen[item.key] = item
                planned.append(item)
        if dtype.shared is not None:
            where = tuple(p.position for p in planned if p.rule == rule.text)
            planned.shared[rule.text] = SharedPlan(dtype, opts, where, dtype.shared_count(opts, where), rule.text)
    return planned


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ---- per-model bookkeeping ---------------------------------------------------------------------

class _ModelState:
    def __init__(self, model):
        self.handles: dict[str, Handle] = {}
        # requires_grad of every backbone parameter before the first attach, restored by the last detach
        self.requires_grad = {n: p.requires_grad for n, p in backbone_params(model)}
        self.ckpt_hook = _input_grad_hook(model)


_STATES: "weakref.WeakKeyDictionary[nn.Module, _ModelState]" = weakref.WeakKeyDictionary()


def _input_grad_hook(model):
    """Gradient checkpointing (reentrant) drops gradients when no input of a checkpointed layer
    requires grad, which is the case with a frozen backbone. Make the embeddings' output require
    grad, but only while checkpointing is on, so normal training does not pay for it."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:   # CLIPModel: two towers, no one input embedding
        emb = None
    if emb is None:
        return None

    # transformers marks checkpointed layers with a `gradient_checkpointing` attribute; asking the
    # model (`is_activation_checkpointing`) walks every module on each forward, so find them once.
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def hook(module, args, out):
        if (torch.is_grad_enabled() and not out.requires_grad
                and any(m.gradient_checkpointing for m in flagged)):
            out.requires_grad_(True)

    return emb.register_forward_hook(hook)


def handles(model) -> dict:
    """The handles attached to `model`, by name."""
    state = _STATES.get(model)
    return dict(state.handles) if state else {}


# ---- attach ------------------------------------------------------------------------------------

def attach(model: nn.Module, spec: str, name: str = "default", *, freeze: bool = True,
           dtype: torch.dtype | None = None) -> "Handle":
    """Build the deltas that `spec` describes into `model`, freeze the backbone, return a Handle.

    dtype: of the delta parameters; by default float32 (kept in full precision on a bf16/fp16
    backbone, as an optimizer wants), or the backbone's dtype when that is float64.
    """
    if not isinstance(model, nn.Module):
        raise HandleError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise HandleError(f"handle name {name!r} must be an identifier such as 'default' or 'task_a'")
    state = _STATES.get(model)
    if state and name in state.handles:
        raise HandleError(f"a handle named {name!r} is already attached to this model; "
                          f"detach it first or pass name=... (attached: {', '.join(state.handles)})")
    planned = plan(model, spec)
    if state is None:
        state = _STATES[model] = _ModelState(model)
    handle = Handle(model, name, spec, planned, dtype)
    state.handles[name] = handle
    if freeze:
        for _, p in backbone_params(model):
            p.requires_grad_(False)
    return handle


class Handle:
    """The deltas of one attach() call. See the README for the lifecycle."""

    def __init__(self, model, name, spec, planned, dtype=None):
        self.model, self.name, self.spec = model, name, spec
        self.enabled = True
        self.entries: list[joins.Entry] = []
        self.shared: dict[str, nn.Module] = {}   # rule text -> its shared module (hypernetwork)
        try:
            for i, (rule, sp) in enumerate(getattr(planned, "shared", {}).items()):
                self.shared[rule] = self._build_shared(i, sp, dtype)
            for item in planned:
                self.entries.append(self._build(item, dtype))
        except BaseException:
            self._remove_entries()
            raise

    @staticmethod
    def _device_dtype(target, dtype):
        ref = next(iter(target.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        if dtype is None:
            dtype = torch.float64 if ref is not None and ref.dtype == torch.float64 else torch.float32
        return device, dtype

    @staticmethod
    def _holder(target) -> nn.ModuleDict:
        holder = target._modules.get("deltakit")
        if holder is None:
            holder = nn.ModuleDict()
            target.add_module("deltakit", holder)
        return holder

    def _build_shared(self, index: int, sp: SharedPlan, dtype):
        """A rule's shared module lives in the model's top-level `deltakit` holder."""
        device, dtype = self._device_dtype(self.model, dtype)
        with torch.device(device):
            module = sp.type.shared(sp.options, sp.positions).to(dtype)
        module.train(self.model.training)
        self._holder(self.model)[f"{self.name}-shared-{index}"] = module
        module.plan = sp
        return module

    def _build(self, item: Planned, dtype):
        pos = item.position
        target = joins.submodule(self.model, pos.path)
        device, dtype = self._device_dtype(target, dtype)
        extra = {"shared": self.shared[item.rule]} if item.type.shared is not None else {}
        with torch.device(device):   # on the meta device a 10B plan costs no memory
            module = item.type.build(item.options, pos, target, **extra).to(dtype)
        module.train(target.training)   # an eval() model must not get deltas with dropout on
        module.gate = None
        holder = self._holder(target)
        slot = f"{self.name}-{item.type.name}-{pos.local.replace('.', '_')}"
        holder[slot] = module
        entry = joins.Entry(self, pos, item.type, item.options, module, item.key)
        entry.rule = item.rule
        try:
            joins.install(entry, self.model)
        except BaseException:
            del holder[slot]
            if not len(holder):
                del target._modules["deltakit"]
            raise
        return entry

    # -- inspection --------------------------------------------------------------------------
    def named_parameters(self):
        for e in self.entries:
            for n, p in e.module.named_parameters():
                yield f"{e.key}.{n}", p
        for i, module in enumerate(self.shared.values()):   # shared parameters: once
            for n, p in module.named_parameters():
                yield f"shared.{i}.{n}", p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def state_dict(self) -> dict:
        return {n: p.detach() for n, p in self.named_parameters()}

    def load_state_dict(self, tensors: dict, strict: bool = True):
        from .errors import CheckpointError
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if strict and (missing or unexpected):
            raise CheckpointError(f"delta weights do not fit handle {self.name!r}: missing {listing(missing, 5) or 'none'}; "
                                  f"unexpected {listing(unexpected, 5) or 'none'}")
        with torch.no_grad():
            for key, value in tensors.items():
                if key not in own:
                    continue
                if tuple(own[key].shape) != tuple(value.shape):
                    raise CheckpointError(f"delta weight {key} has shape {tuple(value.shape)} in the checkpoint but "
                                          f"{tuple(own[key].shape)} here")
                own[key].copy_(value)

    def summary(self) -> str:
        from .report import summary
        return summary(self)

    def __repr__(self):
        types = {}
        for e in self.entries:
            types[e.type.name] = types.get(e.type.name, 0) + 1
        kinds = ", ".join(f"{t}x{n}" for t, n in types.items())
        state = "" if self.entries else " (detached)"
        return (f"<deltakit handle {self.name!r}{state}: {kinds}; {self.num_trainable:,} trainable of "
                f"{self.num_params:,} delta params on {type(self.model).__name__}>")

    # -- switching ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self):
        """Run the bare backbone (merged deltas stay in the weights: unmerge first)."""
        if self.merged:
            raise HandleError(f"handle {self.name!r} is merged into the weights; call unmerge() before disabled()")
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    @property
    def merged(self) -> bool:
        return any(e.merged for e in self.entries)

    def merge(self) -> list[str]:
        """Fold every foldable delta into the backbone weights; returns the keys that stay live
        (adapters, or bias deltas on modules without a bias)."""
        live = []
        for e in self.entries:
            if e.merged:
                continue
            if joins.fold(e, self.model, +1):
                e.merged = True
            else:
                live.append(e.key)
        return live

    def unmerge(self):
        """Take folded deltas back out of the weights (exact up to float rounding)."""
        for e in self.entries:
            if e.merged:
                joins.fold(e, self.model, -1)
                e.merged = False

    # -- tasks (hypernetwork deltas) ---------------------------------------------------------
    def set_task(self, ids):
        """Which task the hypernetworks generate deltas for: one int, or a (batch,) tensor of task ids
        (one per example, so a batch may mix tasks)."""
        nets = [m for m in self.shared.values() if hasattr(m, "set_task")]
        if not nets:
            raise HandleError(f"handle {self.name!r} has no task-conditioned deltas (hyper(...)); set_task() does not apply")
        for m in nets:
            m.set_task(ids)

    def materialize(self, task: int = 0, name: str | None = None, keep: bool = False) -> "Handle":
        """Plain deltas (adapter/LoRA/prefix) holding the weights the hypernetworks generate for `task`;
        other deltas of this handle are copied as they are. This handle is detached first (keep=True
        leaves it attached but disabled). Returns the new handle (merge, save, export it as usual)."""
        from .spec import format_options
        groups: dict = {}
        weights: dict = {}
        for e in self.entries:
            if hasattr(e.module, "materialize"):
                tname, opts = e.module.plain()
                tensors = e.module.materialize(task)
            else:
                tname, opts = e.type.name, format_options(e.options)
                tensors = {n: p.detach().clone() for n, p in e.module.named_parameters()}
            groups.setdefault((tname, opts), []).append(e.position.name)
            weights.update({f"{e.position.name}.{tname}.{n}": t for n, t in tensors.items()})
        spec = "; ".join(f"{t}({o})@{','.join(where)}" if o else f"{t}@{','.join(where)}"
                         for (t, o), where in groups.items())
        if keep:
            self.enabled = False
        else:
            self.detach()
        plain = attach(self.model, spec, name=name or (self.name if not keep else f"{self.name}_task{task}"))
        plain.load_state_dict(weights)
        return plain

    # -- saving ------------------------------------------------------------------------------
    def save(self, path, format: str = "deltakit"):
        from . import checkpoint
        if format == "deltakit":
            return checkpoint.save(self, path)
        if format == "peft":
            from . import peft_export
            return peft_export.save(self, path)
        raise HandleError(f"unknown save format {format!r}; use 'deltakit' or 'peft'")

    # -- removal -----------------------------------------------------------------------------
    def detach(self, keep_merged: bool = False):
        """Remove the deltas. With keep_merged=True, merged deltas stay folded in the weights
        (PEFT's merge_and_unload); otherwise the model is exactly what it was before attach."""
        state = _STATES.get(self.model)
        if state is None or state.handles.get(self.name) is not self:
            raise HandleError(f"handle {self.name!r} is not attached (already detached?)")
        if not keep_merged:
            self.unmerge()
        self._remove_entries()
        del state.handles[self.name]
        if not state.handles:   # the last handle: give the backbone back as it was
            for n, p in backbone_params(self.model):
                if n in state.requires_grad:
                    p.requires_grad_(state.requires_grad[n])
            if state.ckpt_hook is not None:
                state.ckpt_hook.remove()
            del _STATES[self.model]

    def _remove_entries(self):
        holder = self.model._modules.get("deltakit")
        for module in self.shared.values():
            if holder is not None:
                for key in [k for k, m in holder.items() if m is module]:
                    del holder[key]
        if holder is not None and not len(holder):
            del self.model._modules["deltakit"]
        self.shared = {}
        for e in self.entries:
            joins.uninstall(e)
            target = joins.submodule(self.model, e.position.path)
            holder = target._modules.get("deltakit")
            if holder is not None:
                for key in [k for k, m in holder.items() if m is e.module]:
                    del holder[key]
                if len(holder) == 0:
                    del target._modules["deltakit"]
        self.entries = []


def get(model, name: str = "default") -> Handle:
    state = _STATES.get(model)
    if state is None or name not in state.handles:
        have = ", ".join(state.handles) if state else "none"
        raise HandleError(f"no handle named {name!r} on this model (attached: {have})")
    return state.handles[name]
