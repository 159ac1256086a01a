"""Retraining a chosen structure from scratch (plain delta training, the best dev evaluation kept),
the evaluation every part of the search scores with, and the learning-rate schedules."""
from __future__ import annotations

import math

import numpy as np
import torch

import deltakit
from deltakit import distributed as dist

from . import data as datalib, ranks
from .errors import SearchError
from .seeds import derive


def linear_decay(base: float, step: int, total: int) -> float:
    """The search's schedule: from `base` down to 0 at `total`."""
    return base * max(0.0, 1.0 - step / max(1, total))


def warmup_decay(step: int, total: int, warm: int) -> float:
    """The retrain's schedule factor: linear warm-up over `warm` steps, then linear decay to 0."""
    return min((step + 1) / warm, max(0.0, (total - step) / (total - warm + 1e-9)))


@torch.no_grad()
def evaluate(backbone, enc: datalib.Encoded, batch_size: int) -> dict:
    """Accuracy and macro-F1 (scikit-learn) of the backbone's predictions (its argmax class, or
    option) on an encoded split."""
    was = backbone.model.training
    backbone.model.eval()
    enc = ranks.share(enc, backbone)   # torchrun: this rank's batches, the forwards in lockstep
    preds, gold = [], []
    for batch in enc.batches(batch_size * 2):
        preds += backbone.predict(batch)
        gold += batch["labels"].tolist()
    backbone.model.train(was)
    preds, gold = ranks.gathered(preds), ranks.gathered(gold)
    from sklearn.metrics import accuracy_score, f1_score
    return {"accuracy": float(accuracy_score(gold, preds)),
            "macro_f1": float(f1_score(gold, preds, average="macro", zero_division=0))}


def train_structure(cfg, backbone, spec: str, trn, dev, logger=None, name: str = "default") -> dict:
    """Plain delta training of `spec` from a fresh initialisation on the whole training set; keeps
    the deltas of the best dev evaluation. Returns {"handle", "dev", "steps", "final_loss", "trainable"}."""
    from tqdm.auto import tqdm
    torch.manual_seed(derive(cfg.seed, 2))
    handle = deltakit.attach(backbone.model, spec, name=name)
    ranks.shard(backbone.model)   # torchrun: FSDP2, after attaching, before the optimizer
    params = handle.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.retrain_lr, weight_decay=0.01)
    per_epoch = max(1, len(trn) // cfg.batch_size)
    total = max(1, math.ceil(cfg.retrain_epochs * per_epoch))
    warm = max(1, int(0.06 * total))
    k = cfg.retrain_evals
    evals = {max(1, round(total * (i + 1) / k)) for i in range(k)}
    best, best_state, losses = None, None, []
    bar = tqdm(total=total, desc="retrain", disable=not ranks.progress(cfg))
    backbone.model.train()
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = cfg.retrain_lr * warmup_decay(step, total, warm)
        idx = datalib.step_indices(len(trn), cfg.batch_size, cfg.seed, step, 2)
        torch.manual_seed(derive(cfg.seed, step, 4))
        loss = ranks.step_loss(lambda mine: backbone.loss(trn.batch(mine)), idx)   # this rank's share
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(ranks.mean(loss.item()))
        if not math.isfinite(losses[-1]):   # the deltas are lost: say so rather than score noise
            raise SearchError(f"retraining diverged at step {step + 1} of {total} (loss {losses[-1]}); "
                              f"lower --retrain-lr (now {cfg.retrain_lr:g}) and run again")
        if logger:
            logger.log({"retrain/loss": losses[-1]})
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if step + 1 in evals:
            score = evaluate(backbone, dev, cfg.batch_size)
            if best is None or score["accuracy"] >= best["accuracy"]:
                dist.reshard(backbone.model)   # sharded: the registered parameters are the shards again
                best, best_state = {**score, "step": step + 1}, {n: p.detach().clone() for n, p in handle.named_parameters()}
    bar.close()
    if dist.is_sharded(backbone.model):   # the kept values are shards: each rank writes its own
        dist.reshard(backbone.model)
        with torch.no_grad():
            for n, p in handle.named_parameters():
                p.copy_(best_state[n])
    else:
        handle.load_state_dict(best_state)
    return {"handle": handle, "dev": best, "steps": total, "final_loss": float(np.mean(losses[-20:])),
            "trainable": handle.num_trainable}
