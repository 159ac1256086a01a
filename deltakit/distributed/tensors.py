"""Sharded (DTensor) parameters, for the engine: gathering a delta whole, writing a whole value into
this rank's slice, and refusing what must not happen to a sharded model.

FSDP2 turns every parameter into a DTensor sharded along dim 0 (`Shard(0)`; with HSDP
`(Replicate(), Shard(0))`), chunked as `torch.chunk` does. `full_tensor` is a collective: every
rank must call it, in the same order. torch.distributed.tensor takes seconds to import, so it is
only looked at once FSDP has imported it (before that no tensor can be a DTensor).
"""
from __future__ import annotations

import sys

import torch

from ..errors import HandleError

WRAPPED = "_checkpoint_wrapped_module."   # what torch's checkpoint_wrapper inserts into parameter names


def plain_name(name: str) -> str:
    """A parameter name as it is without checkpoint_wrapper modules (which `shard` does not use, but a
    user may have applied; state_dict keys are without them too)."""
    return name.replace(WRAPPED, "")


def is_dtensor(t) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def plain_class_name(module) -> str:
    """The module's class name as before sharding (FSDP swaps in a subclass named FSDP<name>)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not isinstance(module, fsdp.FSDPModule):
        return type(module).__name__
    return next(c for c in type(module).__mro__ if not issubclass(c, fsdp.FSDPModule)).__name__


def is_sharded(model) -> bool:
    """Has FSDP sharded this model (or a part of it)?"""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


def reshard(model):
    """Put every FSDP unit of `model` back into its sharded state (the root stays gathered after a
    forward without backward), so that its registered parameters are the sharded ones that the
    optimizer holds and that writes must go to. A no-op for a model that is not sharded."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return
    for m in model.modules():
        if isinstance(m, fsdp.FSDPModule):
            m.reshard()


def refuse_if_sharded(model, what: str):
    """A HandleError for an operation that a sharded model must not see (attach, detach, merge, load)."""
    if not is_sharded(model):
        return
    if what.startswith(("attach", "load")):
        raise HandleError(f"{what} on a sharded model: attach the deltas first, then deltakit.distributed.shard(model), "
                          f"then build the optimizer. A delta added after sharding is not managed by FSDP, so its "
                          f"gradients would silently differ between ranks (load saved deltas into a sharded "
                          f"model with handle.load_state_dict, every rank)")
    raise HandleError(f"{what} on a sharded model is not supported: save the deltas (handle.save, on every rank) "
                      f"and {what} them in a single process after deltakit.load")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective), or `t` itself."""
    return t.full_tensor() if is_dtensor(t) else t


def local_slice(value: torch.Tensor, like) -> torch.Tensor:
    """The part of the whole `value` that this rank holds of the sharded `like` (a view: nothing
    is read that this rank does not keep, no communication); `value` itself when `like` is whole."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import Replicate, Shard
    coords = like.device_mesh.get_coordinate()
    for i, placement in enumerate(like.placements):
        if type(placement) is Shard:   # not _StridedShard, which FSDP does not use for a parameter
            chunks = value.chunk(like.device_mesh.size(i), dim=placement.dim)
            value = chunks[coords[i]] if coords[i] < len(chunks) else value.narrow(placement.dim, 0, 0)
        elif not isinstance(placement, Replicate):
            raise HandleError(f"cannot place a value into a tensor sharded as {like.placements}")
    return value


def like(value: torch.Tensor, ref) -> torch.Tensor:
    """`value` (whole) as a tensor laid out like `ref`: a DTensor holding this rank's slice when `ref`
    is sharded (what optimizer states of sharded parameters are), else on ref's device and dtype."""
    local = local_slice(value, ref).to(device=_local(ref).device, dtype=ref.dtype).contiguous()
    if not is_dtensor(ref):
        return local
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
                              stride=ref.stride())


def copy_into(param: torch.Tensor, value: torch.Tensor):
    """param[...] = value, for a whole or a sharded param (each rank writes its slice)."""
    with torch.no_grad():
        _local(param).copy_(local_slice(value, param))


def _local(t):
    return t.to_local() if is_dtensor(t) else t


def leading_values(t: torch.Tensor, k: int) -> torch.Tensor:
    """The first k values of t flattened (fewer when it has fewer), the same on every rank. For a
    sharded t they live in the first shard, which is sent to the others (k values, not the tensor);
    a collective then, which every rank must call."""
    if not is_dtensor(t):
        return t.detach().reshape(-1)[:k]
    import torch.distributed as dist
    n = min(k, t.numel())
    if _first_shard_holds(t, n):
        src = int(t.device_mesh.mesh.reshape(-1)[0])   # the rank at coordinate 0 of every mesh dimension
        out = torch.zeros(n, dtype=t.dtype, device=t.device_mesh.device_type)
        if dist.get_rank() == src:
            out.copy_(t.to_local().detach().reshape(-1)[:n])
        dist.broadcast(out, src=src)
        return out.cpu()
    return t.full_tensor().detach().reshape(-1)[:n].cpu()   # a tiny tensor, split finer than k values


def _first_shard_holds(t, n: int) -> bool:
    rows = t.shape[0] if t.dim() else 1
    for i, placement in enumerate(t.placements):
        if getattr(placement, "dim", None) == 0:
            rows = -(-rows // t.device_mesh.size(i))   # the first chunk of torch.chunk
    per_row = t.numel() // max(t.shape[0], 1) if t.dim() else 1
    return rows * per_row >= n
