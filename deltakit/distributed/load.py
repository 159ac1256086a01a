"""Loading a sharded model with its deltas without the full model in memory on any rank.

    handle = load_sharded(lambda device: cpmant.build("cpm-ant-10b", torch.bfloat16, device),
                          "cpm-ant-10b.safetensors", lambda m: deltakit.attach(m, spec), seed=0, checkpointing=True)

1. The checkpoint is opened memory-mapped (safetensors, or a torch `.pt` file): nothing is read yet.
2. The deltas' initial values: `torch.manual_seed(seed)`, then `attach` on a model built on the meta
   device whose weights are the memory-mapped checkpoint tensors. That is what a single process
   gets from load, seed, attach, value for value; only what a delta's init reads (the embedding
   rows a prompt copies, a head that `full` copies) is ever read from disk.
3. The model to train: built on the meta device, `attach` again, `shard`, then each parameter is
   allocated as this rank's slice only, filled from the checkpoint (only those rows are read) or
   from the deltas of step 2.
Nothing stays on the meta device, and a tensor the checkpoint lacks is an error that names it.

A checkpoint in the training dtype is mapped without a copy; in another dtype, the modules that get
deltas are converted whole in step 2 (their size, on each rank) and the slices in step 3. Convert
once with `to_safetensors` (in bf16) to avoid both.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, listing
from ..io import atomic_write
from ..positions import HOLDER, is_backbone
from . import group
from .shard import shard
from .tensors import is_dtensor, local_slice, plain_name


def to_safetensors(state_dict: dict, path, dtype: torch.dtype | None = None) -> Path:
    """Write a backbone's state dict as one safetensors file (atomically), floating tensors in `dtype`:
    the one-time conversion of `cpmant.read_state_dict("cpm-ant-10b.pt")`, or of CPM-2's
    `cpm2.convert_state_dict(megatron.load_merged(folder, cpm2.MERGE_RULES))`."""
    from safetensors.torch import save_file
    out, storages = {}, set()
    for k, v in state_dict.items():
        v = v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach()
        key = (v.untyped_storage().data_ptr(), v.device)
        out[k] = v.contiguous() if key not in storages else v.clone()   # safetensors stores no shared memory
        storages.add(key)
    return atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata={"format": "pt"}))


def read_checkpoint(path) -> dict:
    """The tensors of a safetensors or torch checkpoint, memory-mapped (read when touched)."""
    from ..backbones.cpmant import read_state_dict
    return read_state_dict(path)


def _aliases(model) -> dict:
    """id(tensor) -> [(owner module, attribute, plain name)] for every parameter and buffer (tied
    ones have several names)."""
    out = {}
    for mod_name, m in model.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for leaf, t in store.items():
                if t is not None:
                    name = plain_name(f"{mod_name}.{leaf}" if mod_name else leaf)
                    out.setdefault(id(t), (t, []))[1].append((m, leaf, name))
    return out


def _find(names, tensors: dict):
    return next((tensors[n] for _, _, n in names if n in tensors), None)


def _missing(model, tensors: dict) -> list[str]:
    """Backbone parameters and persistent buffers that `tensors` has under none of their names."""
    persistent = set(model.state_dict(keep_vars=True))
    out = []
    for t, names in _aliases(model).values():
        name = names[0][2]
        if is_backbone(name) and _find(names, tensors) is None:
            is_param = isinstance(t, torch.nn.Parameter)
            if is_param or any(plain_name(n) in persistent for _, _, n in names):
                out.append(name)
    return out


def _under(name: str, paths: set) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in paths for i in range(len(parts)))


def _put(names, value):
    for owner, leaf, _ in names:
        store = owner._parameters if leaf in owner._parameters else owner._buffers
        store[leaf] = value


def _reference_deltas(build, tensors: dict, attach, seed: int, targets: set) -> dict:
    """The deltas' initial values, as a single process gets them: seed, then attach to a model whose
    weights are the (memory-mapped) checkpoint tensors. Modules in `targets` (those the deltas
    attach to) get the model's dtype, so a delta that copies them copies what a single process has."""
    ref = build("meta")
    first = next(ref.parameters(), None)   # whose dtype a hypernetwork's shared module takes
    for t, names in _aliases(ref).values():
        value = _find(names, tensors)
        if value is None:
            continue   # reported by _missing on the model to train
        read = t is first or any(_under(n, targets) for _, _, n in names)
        if value.dtype != t.dtype and t.is_floating_point() and read:
            value = value.to(t.dtype)
        _put(names, torch.nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter)
             else value)
    torch.manual_seed(seed)
    attach(ref)
    values = {plain_name(n): p.detach() for n, p in ref.named_parameters() if not is_backbone(n)}
    from ..handle import handles   # here, not at the top: deltakit.handle imports this package
    for h in handles(ref).values():   # an attached model stays referenced by its handles: let it go
        h.detach()
    return values


def load_sharded(build, path, attach, *, seed: int = 0, mesh=None, **shard_options):
    """The sharded model with its deltas, each rank holding its slices only (see the module docstring).

    build(device) -> the model with its parameters on `device` (it is called with "meta"), e.g.
    `lambda d: cpmant.build(cfg, torch.bfloat16, d)` or `lambda d: cpm2.build(cfg, d)`;
    path: the backbone checkpoint (.safetensors, see `to_safetensors`, or a torch .pt);
    attach(model): attaches the deltas (`lambda m: deltakit.attach(m, spec)`); what it returns for
    the model to train is returned here (usually the handle); seed: of the deltas' init;
    mesh and shard_options: as for `shard` (checkpointing, offload, mp_policy, ...)."""
    tensors = read_checkpoint(path)
    model = build("meta")
    result = attach(model)
    missing = _missing(model, tensors)
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensor(s) the model has: {listing(missing, 8)} "
                              f"(is it the checkpoint of this model and config?)")
    targets = {plain_name(n).rpartition(f".{HOLDER}")[0] for n, _ in model.named_modules() if n.endswith(f".{HOLDER}")}
    deltas = _reference_deltas(build, tensors, attach, seed, targets)
    shard(model, mesh=mesh, **shard_options)
    where = torch.device("cpu") if shard_options.get("offload") == "cpu" else group.device()
    for t, names in _aliases(model).values():
        value = _find(names, tensors) if is_backbone(names[0][2]) else _find(names, deltas)
        if value is None:
            if t.is_meta:
                raise CheckpointError(f"{names[0][2]} is on the meta device and not in {path}: it is a buffer the "
                                      f"model computes when it is built; build its buffers on a real device")
            continue
        if tuple(value.shape) != tuple(t.shape):
            raise CheckpointError(f"{names[0][2]} has shape {tuple(value.shape)} in {path}, {tuple(t.shape)} in the model "
                                  f"(is it the checkpoint of this config?)")
        _put(names, _allocate(t, value, where))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"after loading {path}, {listing(left, 6)} are still on the meta device")
    _check_same_everywhere(deltas)
    return result


def _allocate(t, value, where):
    """A new tensor like `t` (sharded or not) holding this rank's part of `value`, on `where`, in its
    own memory (not the checkpoint's mapping, which is let go after loading)."""
    local = local_slice(value, t).to(device=where, dtype=t.dtype, copy=True).contiguous()
    if is_dtensor(t):
        from torch.distributed.tensor import DTensor
        local = DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return torch.nn.Parameter(local, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else local


def _check_same_everywhere(deltas: dict):
    """Every rank drew the deltas itself (the same seed, the same ops): make sure they agree."""
    if group.world_size() == 1 or not deltas:
        return
    import torch.distributed as dist
    total = torch.stack([v.double().sum() for v in deltas.values()]).to(group.device())
    low, high = total.clone(), total.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise group.DistributedError("the ranks drew different initial deltas from the same seed; run every rank with "
                                     "the same code, torch version and seed")
