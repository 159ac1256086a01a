"""Data and results across ranks: each rank's share of the data, metrics summed over ranks, outputs
gathered to every rank, and forwards kept in lockstep.

Under FSDP every forward is a collective (each block's parameters are gathered from all ranks), so
every rank must run the same number of forwards. Training batches are evened out by the sampler
(torch's DistributedSampler repeats a few examples); evaluation and generation give each example to
exactly one rank (`split`), so ranks may have different numbers of batches, and beam search stops
at a different step on each rank: `lockstep` makes a rank that is done keep answering the others'
forwards (with a small idle forward) until every rank is done.
"""
from __future__ import annotations

import contextlib
import json

import torch
import torch.distributed as dist

from . import group


def sampler(dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """torch's DistributedSampler over this process group (call .set_epoch(epoch) every epoch)."""
    from torch.utils.data import DistributedSampler
    return DistributedSampler(dataset, num_replicas=group.world_size(), rank=group.rank(), shuffle=shuffle,
                              seed=seed, drop_last=drop_last)


def split(items: list) -> list:
    """This rank's share of `items` for evaluation: every item goes to exactly one rank (rank r takes
    items r, r + world, ...), so metrics summed over ranks count each once."""
    return list(items)[group.rank()::group.world_size()]


def share(batch: list) -> tuple[list, float]:
    """This rank's rows of a global training batch (`split`) and the weight of their mean loss,
    len(mine) * world / len(batch): FSDP averages gradients over ranks, so the weighted per-rank
    means average to the whole batch's mean (exactly, for a loss that is a mean over rows), and the
    global batch stays what one process would take. A rank left without rows (a batch smaller than
    the world) gets the batch's first row with weight 0: it still runs the forward and backward
    that FSDP's collectives need. One process: (batch, 1.0)."""
    world = group.world_size()
    if world == 1:
        return list(batch), 1.0
    mine = split(batch)
    if not mine:
        return list(batch)[:1], 0.0
    return mine, len(mine) * world / len(batch)


def reduce(values: dict, op: str = "sum") -> dict:
    """{name: number} combined over ranks (sum, max, min or mean), the same on every rank: sum the
    counts behind a metric (correct, total), then divide."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "mean": dist.ReduceOp.SUM}
    if op not in ops:
        raise group.DistributedError(f"op={op!r}: use one of {', '.join(ops)}")
    if group.world_size() == 1:
        return {k: float(v) for k, v in values.items()}
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=group.device())
    dist.all_reduce(t, op=ops[op])
    if op == "mean":
        t /= group.world_size()
    return dict(zip(names, t.tolist()))


def gather(obj) -> list:
    """`obj` (anything JSON holds: predictions, ids, scores) from every rank, in rank order, on every
    rank. Sent as JSON text: nothing is unpickled."""
    if group.world_size() == 1:
        return [obj]
    data = torch.tensor(list(json.dumps(obj, ensure_ascii=False).encode()), dtype=torch.uint8)
    dev, world = group.device(), group.world_size()
    size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[:data.numel()] = data.to(dev)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[:int(s.item())].cpu().tolist()).decode()) for p, s in zip(parts, sizes)]


def _vote(active: bool) -> int:
    """How many ranks are still working (one small all-reduce)."""
    t = torch.tensor([int(active)], dtype=torch.int64, device=group.device())
    dist.all_reduce(t)
    return int(t.item())


@contextlib.contextmanager
def lockstep(model, idle):
    """Inside, each call of `model(...)` on this rank is matched by one on every other rank; on
    leaving, this rank calls `idle()` (one forward of the same kind of work, e.g. the model on a
    one-token batch; run under no_grad) once for each forward another rank still runs, until every
    rank is done. Every rank must enter, and leave, the block. Only calls of the model itself count: a
    generation loop that calls its submodules directly needs its own matching."""
    if group.world_size() == 1:
        yield
        return
    state = {"idle": False}

    def before(module, args, kwargs):
        if not state["idle"]:
            _vote(True)
    # before FSDP's own pre-forward hook, so that the vote comes before the forward's gathers on every rank
    hook = model.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
    try:
        yield
        state["idle"] = True
        while _vote(False):
            with torch.no_grad():
                idle()
    finally:
        hook.remove()


def generate_in_lockstep(model, generate, batches, idle) -> list:
    """[generate(batch) for batch in batches] on this rank, with every rank running the same number of
    forwards (`lockstep`): ranks may have different numbers of batches (`split`), and each batch may
    take a different number of steps (beam search). idle(): a forward like one step of `generate`."""
    with lockstep(model, idle):
        return [generate(batch) for batch in batches]
