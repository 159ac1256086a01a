"""The search under torchrun (`torchrun --nproc-per-node N -m search.s3pet ...`): the backbone
sharded by FSDP2 after each attach (the supernet, then the retrained structure), every rank a part
of each step's batch, evaluations split over the ranks in lockstep, and the gate logits kept
replicated: they live outside FSDP, so their gradient is averaged over the ranks here and rank 0's
average is broadcast, which leaves the same bits on every rank. Rank 0 alone writes and shows bars.
With one process every function here leaves the run as it was.
"""
from __future__ import annotations

import contextlib
import os

import torch

from deltakit import distributed as dist

from .errors import SearchError


def start(cfg):
    """Join torchrun's process group when there is one (WORLD_SIZE > 1), and refuse what it cannot run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if cfg.order == 2:
        raise SearchError("order=2 cannot run under torchrun: the second-order step differentiates the loss with "
                          "respect to the delta weights with autograd.grad, and under FSDP their gradients exist "
                          "only through backward(); use --order 1, or one process")
    dist.init(backend="gloo" if cfg.device == "cpu" else None)


def active() -> bool:
    return dist.world_size() > 1


def shard(model):
    """FSDP2 over the process group, after attaching and before the optimizers are built."""
    if active():
        dist.shard(model)


def progress(cfg) -> bool:
    return cfg.progress and dist.is_main()


def step_loss(loss_fn, indices: list):
    """loss_fn(this rank's share of the global batch `indices`), weighted so that the average over
    ranks is the whole batch's mean loss (`deltakit.distributed.share`)."""
    mine, weight = dist.share(indices)
    loss = loss_fn(mine)
    return loss * weight if active() else loss


def mean(value: float) -> float:
    return dist.reduce({"v": value}, "mean")["v"] if active() else value


def replicated_grad(grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a parameter kept whole on every rank (the gate logits): averaged over ranks,
    then rank 0's result sent to all, so every rank steps with the same bits."""
    if not active():
        return grad
    import torch.distributed as tdist
    grad = grad.contiguous()
    tdist.all_reduce(grad)
    grad /= dist.world_size()
    tdist.broadcast(grad, src=0)
    return grad


class _Share:
    """This rank's batches of a split (every world-th), the model's forwards in lockstep with the
    other ranks' (a one-example loss answers a forward another rank still runs)."""

    def __init__(self, split, backbone):
        self.split, self.backbone = split, backbone

    def __len__(self):
        return len(self.split)

    def batches(self, batch_size: int):
        n = len(self.split)
        starts = dist.split(list(range(0, n, batch_size)))
        with dist.lockstep(self.backbone.model, lambda: self.backbone.loss(self.split.batch([0]))):
            for s in starts:
                yield self.split.batch(range(s, min(n, s + batch_size)))


def share(split, backbone):
    """What an evaluation loops over: the split itself in one process, this rank's part of it under torchrun."""
    return _Share(split, backbone) if active() else split


def gathered(values: list) -> list:
    """Every rank's values (plain numbers), in rank order, on every rank."""
    return [v for part in dist.gather(values) for v in part] if active() else values


def whole(tensors: dict) -> dict:
    """Sharded tensors gathered whole (a collective: every rank, the same keys in the same order)."""
    return {k: dist.full_tensor(v) for k, v in tensors.items()} if active() else tensors


def on_main(fn, *args, **kwargs):
    return dist.on_main(fn, *args, **kwargs)


@contextlib.contextmanager
def guard(what: str):
    with dist.guard(what):
        yield
