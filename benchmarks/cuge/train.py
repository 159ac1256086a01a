"""The training loop of a CUGE run: AdamW on the deltas, dev evaluations, model selection with
early-stopping patience, atomic checkpoints, and resumption to the very same deltas.

    result = train.train(handle, loss, train_rows, dev_rows, TrainConfig(...), out_dir, fingerprint)

* Batches: the rows of step s follow from (seed, s) alone (`Batches`: a permutation per epoch, rows of
  similar length batched together), so the data position is the step number; the dropout RNG is
  reseeded from (seed, step).
* Learning rate: "noam" is CPM-Live's bmtrain Noam (lr / sqrt(w) * t / w while t <= w, then
  lr / sqrt(t), counted from t = 1), "constant" CPM-2-Finetune's, "linear" warm-up then linear decay.
* Every `eval_every` steps (and at the end) the dev loss is computed; `select="metric"` also scores
  the dev predictions (`dev_metric()`, higher is better) and selects on that. The best deltas are kept;
  after `patience` evaluations without a better one the run stops (CPM-Live's early stop).
* Every `save_every` steps (and at an evaluation that ends the run) OUT/train.ckpt.safetensors is
  written atomically (deltakit.io.atomic_write): the deltas, the AdamW state, the best deltas, and as
  JSON metadata the step, scheduler state, RNG states, best-so-far, histories and a fingerprint of
  the run. The same command after a crash (kill -9 included) resumes from it and ends with the same
  deltas, bit for bit, as an uninterrupted run; a checkpoint of another run is refused.
Nothing is unpickled: tensors go through safetensors, the rest is JSON.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deltakit import distributed as dist
from deltakit.io import atomic_write, read_state, rng_state, set_rng_state, write_state
from deltakit.wandb_log import Run

from . import parallel
from .errors import CugeError

CKPT = "train.ckpt.safetensors"
FORMAT = "deltakit-cuge-train"
SCHEDULES = ("noam", "constant", "linear")
SELECT = ("dev_loss", "metric")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 16
    max_steps: int = 100
    eval_every: int = 50
    save_every: int = 50
    patience: int | None = 10
    select: str = "dev_loss"
    schedule: str = "noam"
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    eval_batch_size: int | None = None
    bucket: bool = True              # batch rows of similar length together (shuffled batch order)
    step_sleep: float = 0.0          # testing hook: seconds to sleep after each step (to kill a run mid-way)

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)}" for k in ("batch_size", "max_steps", "eval_every", "save_every")
               if getattr(self, k) < 1]
        if bad:
            raise CugeError(f"{', '.join(bad)}: must be at least 1")
        if self.schedule not in SCHEDULES:
            raise CugeError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.select not in SELECT:
            raise CugeError(f"select={self.select!r}: use dev_loss or metric")
        if self.lr <= 0:
            raise CugeError(f"lr={self.lr} must be positive")

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at optimizer step `step` (0-based)."""
        t, w = step + 1, max(self.warmup, 0)
        if self.schedule == "constant":
            return min(1.0, t / w) if w else 1.0
        if self.schedule == "noam":
            return (t / w ** 1.5) if w and t <= w else 1.0 / math.sqrt(t)
        if w and t <= w:
            return t / w
        return max(0.0, (self.max_steps - step) / max(1, self.max_steps - w))


@dataclass
class TrainResult:
    steps: int                     # steps run
    best_step: int                 # the step whose deltas were kept (0: the initial ones)
    best: float                    # dev loss (lower is better) or dev metric (higher is better) there
    stopped_early: bool
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)      # {"step", "dev_loss", ["dev_metric"]}
    resumed_from: int | None = None
    seconds: float = 0.0


def _seed(*parts) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class Batches:
    """The rows of each optimizer step, a function of (seed, step) alone: each epoch is a seeded
    permutation; with `lengths`, rows of similar length share a batch (sorted inside windows of
    WINDOW batches, then the batch order is shuffled), so little of a batch is padding."""
    WINDOW = 50

    def __init__(self, n: int, batch_size: int, seed: int, lengths=None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._batches = None, None

    def _make(self, epoch: int) -> list:
        rng = np.random.default_rng(_seed(self.seed, epoch, 17))
        perm = rng.permutation(self.n)
        if self.lengths is None:
            return [perm[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        size = self.WINDOW * self.batch_size
        batches = []
        for w in range(0, self.n, size):
            window = perm[w:w + size]
            window = window[np.argsort(self.lengths[window], kind="stable")]
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __call__(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._make(epoch)
        return self._batches[k].tolist()


def input_lengths(rows) -> np.ndarray:
    """Characters of each row's input, read from the Arrow column (no Python strings for a big split)."""
    if isinstance(rows, list):
        return np.array([len(r["input"]) for r in rows])
    import pyarrow.compute as pc
    return pc.utf8_length(rows.with_format("arrow")["input"]).to_numpy(zero_copy_only=False)


def take(rows, idx: list[int]) -> list[dict]:
    """Rows `idx` of a datasets.Dataset (or a list) as a list of dicts."""
    if isinstance(rows, list):
        return [rows[i] for i in idx]
    cols = rows[idx]
    return [dict(zip(cols, values)) for values in zip(*cols.values())]


# ---- checkpoint ------------------------------------------------------------------------------------

def save_checkpoint(path: Path, tensors: dict, state: dict):
    write_state(path, tensors, state, FORMAT)


def load_checkpoint(path: Path) -> tuple[dict, dict] | None:
    return read_state(path, FORMAT, "CUGE training checkpoint", CugeError,
                      "delete it (or pass --fresh) to start this run over")


# ---- the loop ----------------------------------------------------------------------------------------

@torch.no_grad()
def dev_loss(loss_fn, rows, batch_size: int, model, idle=None) -> float:
    """The mean of the batches' losses weighted by their rows; under torchrun each rank takes every
    world-th batch, its forwards in lockstep with the others' (`idle()`: one forward)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with parallel.lockstep(model, idle):
        for idx in parallel.batches(len(rows), batch_size):
            batch = take(rows, idx)
            total += loss_fn(batch).item() * len(batch)
            n += len(batch)
    total, n = parallel.sums(total, n)
    model.train(was)
    return total / max(n, 1)


@dataclass
class _Progress:
    """What a checkpoint holds besides tensors, and what the loop updates."""
    step: int = 0
    best: float | None = None      # best dev score so far (loss: lower is better; metric: higher)
    best_step: int = 0
    since: int = 0                 # evaluations since the best one
    stopped: bool = False          # patience ran out
    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)


def _save(path: Path, fingerprint: dict, names: dict, best_state: dict, opt, sched, progress: _Progress):
    """Every rank calls it (sharded tensors are gathered whole, so any world size resumes); rank 0 writes."""
    tensors = {f"delta.{n}": p for n, p in names.items()} | {f"best.{n}": t for n, t in best_state.items()}
    opt_state = opt.state_dict()
    for i, n in enumerate(names):
        for k, v in opt_state["state"].get(i, {}).items():
            tensors[f"opt.{n}.{k}"] = v if torch.is_tensor(v) else torch.tensor(float(v))
    tensors = parallel.whole(tensors)
    rng_t, rng_j = rng_state()
    state = {"fingerprint": fingerprint, **asdict(progress), "rng": rng_j,
             "optimizer": {"param_groups": opt_state["param_groups"]}, "scheduler": sched.state_dict()}
    parallel.on_main(save_checkpoint, path, tensors | rng_t, state)


def _restore(path: Path, fingerprint: dict, names: dict, best_state: dict, opt, sched) -> _Progress | None:
    """Load the checkpoint at `path` into deltas, optimizer, scheduler and RNG; None when there is none."""
    loaded = load_checkpoint(path)
    if loaded is None:
        return None
    tensors, state = loaded
    if state["fingerprint"] != fingerprint:
        diff = sorted(k for k in set(state["fingerprint"]) | set(fingerprint)
                      if state["fingerprint"].get(k) != fingerprint.get(k))
        raise CugeError(f"{path} holds a run with other settings ({', '.join(diff)}); use another "
                        f"--output-dir, or pass --fresh to start this one over")
    with torch.no_grad():   # whole tensors; a sharded parameter takes this rank's slice (dist.like)
        for n, p in names.items():
            p.copy_(dist.like(tensors[f"delta.{n}"], p))
            best_state[n] = dist.like(tensors[f"best.{n}"], p)
    opt_state = {"state": {}, "param_groups": state["optimizer"]["param_groups"]}
    for i, (n, p) in enumerate(names.items()):
        st = {k.rsplit(".", 1)[1]: dist.like(v, p) if v.shape == p.shape else v.to(p.device)
              for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        if st:
            opt_state["state"][i] = st
    opt.load_state_dict(opt_state)
    sched.load_state_dict(state["scheduler"])
    set_rng_state(tensors, state["rng"])
    return _Progress(**{k: state[k] for k in _Progress.__dataclass_fields__})


def train(handle, loss_fn, train_rows, dev_rows, cfg: TrainConfig, out_dir, fingerprint: dict,
          dev_metric=None, dev_loss_fn=None, logger: Run | None = None, progress: bool = True,
          fresh: bool = False) -> TrainResult:
    """Train `handle`'s deltas with `loss_fn(rows) -> scalar`; leaves the selected deltas in the handle.
    `dev_loss_fn` (default `loss_fn`) computes the dev loss when dev rows are of another kind.
    `logger` (a deltakit.wandb_log.Run; the caller finishes it) gets the losses, lr and dev scores."""
    from tqdm.auto import tqdm
    if cfg.select == "metric" and dev_metric is None:
        raise CugeError("select='metric' needs a dev metric")
    if len(train_rows) == 0 or len(dev_rows) == 0:
        raise CugeError(f"nothing to train on: {len(train_rows)} training and {len(dev_rows)} dev rows")
    out = Path(out_dir)
    path, model = out / CKPT, handle.model
    names = dict(handle.named_parameters())
    params = list(names.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cfg.lr_factor(s))   # a plain function: not saved
    fingerprint = json.loads(json.dumps(   # as it reads back from the checkpoint's JSON
        {**fingerprint, "train": asdict(cfg) | {"step_sleep": None}, "deltas": list(names)}))
    best_state = {n: p.detach().clone() for n, p in names.items()}
    state = None if fresh else _restore(path, fingerprint, names, best_state, opt, sched)
    resumed = state.step if state else None
    state = state or _Progress()

    def idle():                                     # a forward matching another rank's (lockstep)
        return loss_fn(take(train_rows, [0]))

    def evaluate() -> dict:
        record = {"step": state.step, "dev_loss": dev_loss(dev_loss_fn or loss_fn, dev_rows,
                                                           cfg.eval_batch_size or cfg.batch_size, model, idle)}
        if cfg.select == "metric":
            record["dev_metric"] = float(dev_metric())
        score = record["dev_metric"] if cfg.select == "metric" else record["dev_loss"]
        if state.best is None or (score > state.best if cfg.select == "metric" else score < state.best):
            state.best, state.best_step, state.since = score, state.step, 0
            best_state.update({n: p.detach().clone() for n, p in names.items()})
        else:
            state.since += 1
            state.stopped = cfg.patience is not None and state.since >= cfg.patience
        state.evals.append(record)
        logger.log({f"dev/{k}": v for k, v in record.items() if k != "step"}, state.step)
        return record

    logger = logger or Run()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc=f"train {out.name}", disable=not (progress and dist.is_main()),
               file=sys.stderr)
    batches = Batches(len(train_rows), cfg.batch_size, cfg.seed, input_lengths(train_rows) if cfg.bucket else None)
    model.train()
    while state.step < cfg.max_steps and not state.stopped:
        idx = batches(state.step)
        torch.manual_seed(_seed(cfg.seed, state.step, 3))          # dropout masks depend on the step alone
        loss = parallel.step_loss(loss_fn, lambda rows: take(train_rows, rows), idx)   # this rank's share
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.losses.append(parallel.mean(loss.item()))
        logger.log({"train/loss": state.losses[-1], "train/lr": sched.get_last_lr()[0]}, state.step)
        post = {"loss": f"{np.mean(state.losses[-20:]):.3f}"}
        if state.step % cfg.eval_every == 0 or state.step == cfg.max_steps:
            record = evaluate()
            post["dev"] = f"{record.get('dev_metric', record['dev_loss']):.3f}"
        bar.update()
        bar.set_postfix(post)
        if state.step % cfg.save_every == 0 or state.step == cfg.max_steps or state.stopped:
            _save(path, fingerprint, names, best_state, opt, sched, state)
        if cfg.step_sleep:
            time.sleep(cfg.step_sleep)
    bar.close()
    dist.reshard(model)   # a sharded root holds gathered copies after an evaluation: write the shards
    with torch.no_grad():
        for n, p in names.items():
            p.copy_(best_state[n])
    model.eval()
    return TrainResult(state.step, state.best_step, state.best, state.stopped, state.losses, state.evals, resumed,
                       round(time.perf_counter() - t0, 1))


def plot(result: TrainResult, path, title: str = ""):
    """The loss curve: training loss per step (and its running mean), dev loss at each evaluation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    steps = np.arange(1, len(result.losses) + 1)
    ax.plot(steps, result.losses, alpha=0.3, label="train (batch)")
    k = max(1, len(result.losses) // 25)
    smooth = np.convolve(result.losses, np.ones(k) / k, mode="valid") if result.losses else []
    ax.plot(steps[k - 1:], smooth, label=f"train (mean of {k})")
    if result.evals:
        ax.plot([e["step"] for e in result.evals], [e["dev_loss"] for e in result.evals], "o-", label="dev")
    if result.best_step:
        ax.axvline(result.best_step, color="grey", ls=":", label=f"selected (step {result.best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
