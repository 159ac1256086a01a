"""The process group under torchrun: joining it, who this rank is, the device mesh to shard over,
work that only rank 0 does, and failures that end the run with a message instead of a hang.

A rank that dies closes its connections, and the other ranks' next collective fails at once (gloo,
NCCL); a rank that hangs makes them fail after the process group's `timeout`. `guard()` turns either
failure into a DistributedError that says so and how to go on (run the same command again: it
resumes from the last checkpoint, `deltakit.distributed.load_state`).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os

import torch
import torch.distributed as dist

from ..errors import DeltakitError


class DistributedError(DeltakitError):
    """A distributed run cannot go on: a rank died or stopped answering, or the run is set up wrongly."""


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0: the one that writes files and shows progress bars (`tqdm(disable=not is_main())`)."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its GPU (LOCAL_RANK) under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init(backend: str | None = None, timeout: float = 600.0, init_method: str | None = None):
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK in the environment); without them, a group of one process (so `shard` also works at
    world size 1). backend: NCCL when there are GPUs, else gloo. timeout: seconds a collective waits
    for the other ranks before it fails (then `guard` says which rank and what to do). Does nothing
    when the group exists already."""
    if is_distributed():
        return
    gpu = torch.cuda.is_available() and backend in (None, "nccl")
    backend = backend or ("nccl" if gpu else "gloo")
    wait = datetime.timedelta(seconds=timeout)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        kwargs["device_id"] = torch.device("cuda", local_rank())
    if "RANK" not in os.environ and init_method is None:   # a single process: an in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=wait, **kwargs)
        return
    missing = [v for v in ("RANK", "WORLD_SIZE") if v not in os.environ]
    if missing:
        raise DistributedError(f"the environment lacks {', '.join(missing)}: launch with torchrun "
                               f"(torchrun --nproc-per-node N script.py), which sets them")
    dist.init_process_group(backend, init_method=init_method or "env://", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=wait, **kwargs)


def shutdown():
    """Leave the process group. Sharded models left in reference cycles hold handles of the group's
    collectives; they are collected first, while the group exists (freed after it, gloo aborts the process)."""
    if is_distributed():
        gc.collect()
        dist.destroy_process_group()


def mesh(nodes: int | str | None = None):
    """The device mesh to shard over. nodes=None: one dimension over all ranks (FSDP). nodes=N, or
    "auto" (the number of torchrun nodes, WORLD_SIZE / LOCAL_WORLD_SIZE): two dimensions,
    ("replicate", "shard") = (N, ranks per node): the backbone is sharded inside a node and
    replicated across nodes (HSDP), so only the deltas' gradients travel between nodes."""
    from torch.distributed.device_mesh import init_device_mesh
    if not is_distributed():
        init()
    world, kind = world_size(), device().type
    if nodes is None:
        return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))
    if nodes == "auto":
        nodes = world // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if not isinstance(nodes, int) or nodes < 1 or world % nodes:
        raise DistributedError(f"nodes={nodes!r} must divide the world size {world} (ranks per node = world / nodes)")
    return init_device_mesh(kind, (nodes, world // nodes), mesh_dim_names=("replicate", "shard"))


def barrier():
    if is_distributed() and world_size() > 1:
        dist.barrier()


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only (writing a file); every rank must call this. The others
    wait for it and fail with a DistributedError when it failed there, instead of going on without
    its result (or waiting forever for a rank that raised). Returns fn's result on rank 0."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:   # reported to the other ranks, then raised here
            error = e
    ok = torch.tensor([error is None], dtype=torch.int32, device=device())
    dist.broadcast(ok, src=0)
    if error is not None:
        raise error
    if not ok.item():
        raise DistributedError(f"rank {rank()}: rank 0 failed in {getattr(fn, '__name__', 'its work')} (see its log)")
    return result


def _peer_failure(error: BaseException) -> bool:
    """A failed collective: NCCL and the store raise DistError; gloo a RuntimeError from its sources
    ("Connection reset by peer", "Timed out waiting ...")."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error).lower())


@contextlib.contextmanager
def guard(what: str = "the run"):
    """Turn a collective that failed because another rank died or stopped answering into a
    DistributedError saying so; other errors pass through unchanged.

        with deltakit.distributed.guard("training"):
            for step in range(start, steps): ...
    """
    try:
        yield
    except Exception as e:
        if not _peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} stopped because a collective failed ({first[:300]}); "
            f"another rank has probably died or hangs: see its log. Run the same command again to resume "
            f"from the last checkpoint (any number of processes)") from e
