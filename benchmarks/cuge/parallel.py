"""The CUGE runner under torchrun (`torchrun --nproc-per-node N -m benchmarks.cuge.run ...`): the
backbone sharded by FSDP2 after the deltas are attached, every rank a part of each training batch,
the dev and test rows split over the ranks with their forwards kept in lockstep, losses reduced and
predictions gathered, and rank 0 alone writing files. With one process every function here leaves
the run as it was (the same batches, the same numbers, bit for bit).

Under FSDP every forward is a collective, so every rank runs the same number of forwards: a
training step takes this rank's share of the global batch (`deltakit.distributed.share`), and an
evaluation, where ranks may have different numbers of batches (and beam search different numbers
of steps), answers the other ranks' forwards with `idle()` ones (`deltakit.distributed.lockstep`).
"""
from __future__ import annotations

import contextlib
import os

from deltakit import distributed as dist

from .errors import CugeError

SEQ2SEQ = ("cpm-2", "hf-seq2seq")   # their generate() runs the encoder outside the model's forward


def start(device: str) -> bool:
    """Join torchrun's process group when there is one (WORLD_SIZE > 1): gloo for --device cpu, else
    NCCL when there are GPUs. Returns whether the run is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init(backend="gloo" if device == "cpu" else None)
    return True


def active() -> bool:
    return dist.world_size() > 1


def check(kind: str, dataset):
    """Refuse, before any work, what the distributed path cannot run."""
    if active() and kind in SEQ2SEQ and any(dataset.kind_of(s) in ("generate", "math", "tag") for s in ("dev", "test")):
        raise CugeError(f"{dataset.title} is decoded by beam search, and the {kind} recipe's generate() runs the "
                        f"encoder outside the model's forward, which the ranks cannot keep in lockstep under "
                        f"torchrun; run this dataset in one process (python -m benchmarks.cuge.run ...)")


def shard(model):
    """FSDP2 over the process group, after attaching and before the optimizer is built."""
    if active():
        dist.shard(model)


def step_loss(loss_fn, take, idx: list):
    """The loss of this rank's share of the global batch `idx`, weighted so that FSDP's average of
    the ranks' gradients is the whole batch's (exact for a loss averaged over rows; a loss averaged
    over tokens is then averaged over each rank's tokens, as data-parallel training does)."""
    mine, weight = dist.share(idx)
    loss = loss_fn(take(mine))
    return loss * weight if active() else loss


def mean(value: float) -> float:
    """A number averaged over ranks (a rank's weighted loss: the mean is the global batch's)."""
    return dist.reduce({"v": value}, "mean")["v"] if active() else float(value)


def sums(*values: float) -> list[float]:
    """Numbers summed over ranks."""
    if not active():
        return list(values)
    total = dist.reduce({str(i): v for i, v in enumerate(values)})
    return [total[str(i)] for i in range(len(values))]


def batches(n: int, batch_size: int) -> list[list[int]]:
    """This rank's batches of rows 0..n-1 taken in order (one process: all of them)."""
    every = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    return dist.split(every) if active() else every


def gathered(pairs: list) -> list:
    """Every rank's (index, prediction) pairs, on every rank (JSON: predictions are plain values)."""
    return [p for part in dist.gather(pairs) for p in part] if active() else pairs


@contextlib.contextmanager
def lockstep(model, idle):
    """Forwards of `model` matched across ranks (`idle()`: one forward, e.g. a one-row loss)."""
    if not active():
        yield
        return
    with dist.lockstep(model, idle):
        yield


def whole(tensors: dict) -> dict:
    """Sharded tensors gathered whole (a collective: every rank, the same keys in the same order)."""
    return {k: dist.full_tensor(v) for k, v in tensors.items()}


def main_first(fn):
    """fn on rank 0, then on the others: what it caches (datasets' Arrow files) is built once, and an
    error there (a malformed file) stops every rank."""
    if not active():
        return fn()
    result = on_main(fn)
    return result if dist.is_main() else fn()


def on_main(fn, *args, **kwargs):
    """fn on rank 0 only (writing files); the others wait and fail if it failed."""
    return dist.on_main(fn, *args, **kwargs)
