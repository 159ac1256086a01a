"""attach / load / the Handle: the lifecycle of a set of deltas on one model.

How deltas appear in the model: each delta is a submodule of a `deltakit` ModuleDict child of the
module it changes (`encoder.layer.0.attention.self.query.deltakit.default-lora-attn_q.lora_A`), so
`model.parameters()`, `.to()`, `.train()` and `model.state_dict()` see them. Because of that a strict
`model.load_state_dict(original)` fails on the extra keys after attach: load the backbone with
`deltakit.backbone_state_dict(model)` / `strict=False`, or before attaching.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, joins, peft_export, peft_import, report
from .deltas import Delta
from .distributed.tensors import copy_into, full_tensor, refuse_if_sharded, reshard
from .errors import CheckpointError, HandleError, listing
from .joins import fold
from .plan import Plan, Planned, SharedPlan, plan
from .positions import HOLDER, backbone_params, is_backbone

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# ---- per-model bookkeeping ---------------------------------------------------------------------

class _ModelState:
    def __init__(self, model):
        self.handles: dict[str, Handle] = {}
        # requires_grad of every backbone parameter before the first attach, restored by the last detach
        self.requires_grad = {n: p.requires_grad for n, p in backbone_params(model)}
        self.ckpt_hook = _input_grad_hook(model)
        self.merges: list = []   # (handle name, ids of the parameters it wrote), in merge order


# The state lives on the model (a plain attribute, not a submodule): a model dropped while attached
# is collected with its handles, which a global table keyed by the model would keep alive.
_STATE = "_deltakit_state"


def _state(model) -> "_ModelState | None":
    return model.__dict__.get(_STATE)


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
    state = _state(model)
    return dict(state.handles) if state else {}


def get(model, name: str = "default") -> "Handle":
    state = _state(model)
    if state is None or name not in state.handles:
        have = ", ".join(state.handles) if state else "none"
        raise HandleError(f"no handle named {name!r} on this model (attached: {have})")
    return state.handles[name]


def backbone_state_dict(model) -> dict:
    """The model's state_dict without the deltas: what `model.state_dict()` held before attach."""
    return {k: v for k, v in model.state_dict().items() if is_backbone(k)}


# ---- attach and load ---------------------------------------------------------------------------

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
    refuse_if_sharded(model, "attach()")
    state = _state(model)
    if state and name in state.handles:
        raise HandleError(f"a handle named {name!r} is already attached to this model; "
                          f"detach it first or pass name=... (attached: {', '.join(state.handles)})")
    planned = plan(model, spec)
    fresh = state is None
    if fresh:   # before any delta exists: it snapshots the backbone's requires_grad
        state = _ModelState(model)
    try:
        handle = Handle(model, name, spec, planned, dtype)
    except BaseException:
        if fresh and state.ckpt_hook is not None:   # a failed first attach leaves nothing behind
            state.ckpt_hook.remove()
        raise
    if fresh:
        model.__dict__[_STATE] = state
    state.handles[name] = handle
    if freeze:
        for _, p in backbone_params(model):
            p.requires_grad_(False)
    return handle


def load(model, path, name: str | None = None) -> "Handle":
    """Attach the deltas saved at `path` (by `Handle.save`) to `model` and load their weights.
    A clear CheckpointError when they do not fit; a warning when the backbone differs but they fit.
    A PEFT adapter folder (adapter_config.json) is read as the same deltas (deltakit/peft_import.py)."""
    refuse_if_sharded(model, "load()")
    if peft_import.is_peft_folder(path) and not (Path(path) / checkpoint.CONFIG).is_file():
        spec, tensors = peft_import.read(model, path)
        return _attach_loaded(model, spec, name or "default", tensors)
    config = checkpoint.read_config(path)
    checkpoint.check_fits(model, config, plan(model, config["spec"]), path)
    tensors = checkpoint.read_tensors(path)
    handle = _attach_loaded(model, config["spec"], name or config.get("name", "default"), tensors)
    checkpoint.warn_if_backbone_differs(model, handle, config, path)
    return handle


def _attach_loaded(model, spec: str, name: str, tensors: dict) -> "Handle":
    handle = attach(model, spec, name=name)
    try:
        handle.load_state_dict(tensors)
    except BaseException:
        handle.detach()
        raise
    return handle


# ---- the handle --------------------------------------------------------------------------------

class Handle:
    """The deltas of one attach() call. See the README for the lifecycle."""

    def __init__(self, model, name: str, spec: str, planned: Plan, dtype=None):
        self.model, self.name, self.spec = model, name, spec
        self.family = planned.family   # how deltas reach this model where hooks are not enough
        self.enabled = True
        self.entries: list[joins.Entry] = []
        self.shared_modules: dict[str, nn.Module] = {}   # rule text -> its shared module (hypernetwork)
        self.shared_plans: dict[str, SharedPlan] = dict(planned.shared)
        self.originals: dict = {}   # (module, param name) -> value before merge() wrote to it
        try:
            for i, (rule, sp) in enumerate(planned.shared.items()):
                self.shared_modules[rule] = self._build_shared(i, sp, dtype)
            for item in planned:
                self.entries.append(self._build(item, dtype))
            joins.share_inputs(self.entries, self.family, model)
        except BaseException:
            self._remove_entries()
            raise

    # -- building ----------------------------------------------------------------------------
    @staticmethod
    def _device_dtype(target, dtype):
        ref = next(iter(target.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        if dtype is None:
            dtype = torch.float64 if ref is not None and ref.dtype == torch.float64 else torch.float32
        return device, dtype

    @staticmethod
    def _holder(target) -> nn.ModuleDict:
        holder = target._modules.get(HOLDER)
        if holder is None:
            holder = nn.ModuleDict()
            target.add_module(HOLDER, holder)
        return holder

    def _build_shared(self, index: int, sp: SharedPlan, dtype):
        """A rule's shared module lives in the model's top-level `deltakit` holder."""
        device, dtype = self._device_dtype(self.model, dtype)
        with torch.device(device):
            module = sp.type.build_shared(sp.options, sp.positions).to(dtype)
        module.train(self.model.training)
        self._holder(self.model)[f"{self.name}-shared-{index}"] = module
        return module

    def _build(self, item: Planned, dtype) -> joins.Entry:
        pos = item.position
        target = joins.site.submodule(self.model, pos.path)
        device, dtype = self._device_dtype(target, dtype)
        extra = {"shared": self.shared_modules[item.rule]} if item.type.build_shared is not None else {}
        with torch.device(device):   # on the meta device a 10B plan costs no memory
            module = item.type.build(item.options, pos, target, **extra).to(dtype)
        if not isinstance(module, Delta):
            raise HandleError(f"delta type {item.type.name!r} built a {type(module).__name__}; a delta module must "
                              f"subclass deltakit.deltas.Delta (it declares the gate the engine reads)")
        module.train(target.training)   # an eval() model must not get deltas with dropout on
        holder = self._holder(target)
        holder[f"{self.name}-{item.type.name}-{pos.local.replace('.', '_')}"] = module
        entry = joins.Entry(self, pos, item.type, item.options, module, item.rule, item.type.join_at(item.options, pos))
        entry.undo.append(lambda: _drop(target, module))
        joins.install(entry, self.model)   # on failure it undoes itself, the submodule included
        return entry

    # -- inspection --------------------------------------------------------------------------
    def named_parameters(self):
        for e in self.entries:
            for n, p in e.module.named_parameters():
                yield f"{e.key}.{n}", p
        for i, module in enumerate(self.shared_modules.values()):   # shared parameters: once
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
        """The delta tensors by name; on a sharded model gathered whole (a collective: every rank calls it)."""
        reshard(self.model)
        return {n: full_tensor(p.detach()) for n, p in self.named_parameters()}

    def load_state_dict(self, tensors: dict, strict: bool = True):
        fold.refuse_while_merged(self, "loading delta weights")
        reshard(self.model)   # on a sharded model: write into the shards, not into a gathered copy
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if strict and (missing or unexpected):
            raise CheckpointError(f"delta weights do not fit handle {self.name!r}: missing {listing(missing, 5) or 'none'}; "
                                  f"unexpected {listing(unexpected, 5) or 'none'}")
        wrong = [f"{k}: {tuple(v.shape)} given, {tuple(own[k].shape)} here" for k, v in tensors.items()
                 if k in own and tuple(own[k].shape) != tuple(v.shape)]
        if wrong:   # checked before anything is copied: a failed load changes nothing
            raise CheckpointError(f"delta weights of handle {self.name!r} have other shapes: {listing(wrong, 5)}")
        for key, value in tensors.items():   # whole values; on a sharded model each rank keeps its slice
            if key in own:
                copy_into(own[key], value)

    def summary(self) -> str:
        return report.summary(self)

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

    def merge(self, keep_original: bool = True) -> list[str]:
        """Fold every foldable delta into the backbone weights; returns the keys that stay live
        (adapters, prefixes, prompts, bias deltas on modules without a bias). keep_original keeps a
        copy of each weight written to, so unmerge() restores it bit for bit (deltakit/joins/fold.py)."""
        refuse_if_sharded(self.model, "merge()")
        return fold.merge(self, keep_original)

    def unmerge(self):
        """Take folded deltas back out of the weights (bit-exact with keep_original=True)."""
        refuse_if_sharded(self.model, "unmerge()")
        fold.unmerge(self)

    # the order of merges across handles on one model, so unmerges can be checked against it
    def merge_record(self, param_ids: set):
        state = _state(self.model)
        state.merges = [(n, ids) for n, ids in state.merges if n != self.name] + [(self.name, param_ids)]

    def check_unmerge_order(self):
        merges = _state(self.model).merges
        names = [n for n, _ in merges]
        if self.name not in names:
            return
        i = names.index(self.name)
        later = [n for n, ids in merges[i + 1:] if ids & merges[i][1]]
        if later:
            raise HandleError(f"handle {self.name!r} cannot unmerge before {listing(later)}: they were merged later into "
                              f"the same weights; unmerge them first")

    def unmerge_record(self):
        state = _state(self.model)
        state.merges = [(n, ids) for n, ids in state.merges if n != self.name]

    # -- tasks (hypernetwork deltas) ---------------------------------------------------------
    def set_task(self, ids):
        """Which task the hypernetworks generate deltas for: one int, or a (batch,) tensor of task ids
        (one per example, so a batch may mix tasks)."""
        nets = [m for m in self.shared_modules.values() if hasattr(m, "set_task")]
        if not nets:
            raise HandleError(f"handle {self.name!r} has no task-conditioned deltas (hyper(...)); set_task() does not apply")
        for m in nets:
            m.set_task(ids)

    def materialize(self, task: int = 0, name: str | None = None, keep: bool = False) -> "Handle":
        """Plain deltas (adapter/LoRA/prefix) holding the weights the hypernetworks generate for `task`;
        other deltas of this handle are copied as they are. This handle is detached first (keep=True
        leaves it attached but disabled). Returns the new handle (merge, save, export it as usual)."""
        from .deltas.hyper import plain_deltas
        refuse_if_sharded(self.model, "materialize()")
        fold.refuse_while_merged(self, "materialize()")
        spec, weights = plain_deltas(self, task)
        if keep:
            self.enabled = False
        else:
            self.detach()
        plain = attach(self.model, spec, name=name or (self.name if not keep else f"{self.name}_task{task}"))
        plain.load_state_dict(weights)
        return plain

    # -- saving ------------------------------------------------------------------------------
    def save(self, path, format: str = "deltakit"):
        if format == "deltakit":
            return checkpoint.save(self, path)
        if format == "peft":
            return peft_export.save(self, path)
        raise HandleError(f"unknown save format {format!r}; use 'deltakit' or 'peft'")

    # -- removal -----------------------------------------------------------------------------
    def detach(self, keep_merged: bool = False):
        """Remove the deltas. With keep_merged=True, merged deltas stay folded in the weights
        (PEFT's merge_and_unload); otherwise the model is exactly what it was before attach."""
        state = _state(self.model)
        if state is None or state.handles.get(self.name) is not self:
            raise HandleError(f"handle {self.name!r} is not attached (already detached?)")
        refuse_if_sharded(self.model, "detach()")
        if keep_merged:
            self.originals.clear()
            self.unmerge_record()
        else:
            self.unmerge()
        self._remove_entries()
        del state.handles[self.name]
        if not state.handles:   # the last handle: give the backbone back as it was
            for n, p in backbone_params(self.model):
                if n in state.requires_grad:
                    p.requires_grad_(state.requires_grad[n])
            if state.ckpt_hook is not None:
                state.ckpt_hook.remove()
            del self.model.__dict__[_STATE]

    def _remove_entries(self):
        for module in self.shared_modules.values():
            _drop(self.model, module)
        self.shared_modules = {}
        for e in self.entries:
            joins.uninstall(e)
        self.entries = []


def _drop(target, module):
    """Remove `module` from `target`'s deltakit holder (and the holder once it is empty)."""
    holder = target._modules.get(HOLDER)
    if holder is None:
        return
    for key in [k for k, m in holder.items() if m is module]:
        del holder[key]
    if not len(holder):
        del target._modules[HOLDER]
