"""S3PET structure search: find where deltas go under a parameter budget, retrain that structure
from scratch, report its test score.

    python -m search.s3pet --budget 0.01%
    python -m search.s3pet --budget 25k --space L --order 2 --output-dir runs/s3pet-L
    python -m search.s3pet --model cpm-ant-10b.pt --task my.jsonl --verbalizer 否,是 --device cuda

As an API (notebooks):

    from search.s3pet import Config, run
    result = run(Config(budget="0.01%", space="M"))
    result.spec, result.test["accuracy"]

Writes into --output-dir: structure.json, structure.spec (a deltakit spec string that
deltakit.attach re-applies), gates.png (heat map), metrics.json, deltas/ (the retrained deltas,
handle.save format) and search.ckpt.safetensors (the resumable search state: rerunning the same
command after a crash continues from it and finishes with the same result).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import deltakit
from deltakit.io import atomic_write, write_json

from . import ckpt, data as datalib
from .bilevel import first_order_grad, second_order_grad
from .budget import Budget, check_fits, parse_budget
from .discretize import greedy_knapsack, random_structure, structure_cost
from .errors import SearchError
from .gates import Gates, logistic_noise
from .models import load_backbone
from .space import build_space

CKPT = "search.ckpt.safetensors"


@dataclass
class Config:
    budget: str = "0.01%"
    model: str | None = None        # HF folder or native CPM-Ant .pt/folder; default: multilingual-e5-small
    task: str = "sentiment"         # built-in, or a JSONL file of {"text", "label"}
    verbalizer: str | None = None   # language-model backbones (CPM-Ant): one word per label, comma-separated
    space: str = "M"                # M, L, or a deltakit spec string of candidates
    fixed: str | None = "auto"      # always-on deltas outside the budget; auto: the backbone's choice (full@head)
    order: int = 1                  # 1: first-order, 2: DARTS second-order
    strategy: str = "search"        # search | random
    seed: int = 0
    n_train: int | None = 1600      # training examples (halved during the search); None: all
    n_dev: int = 200
    n_test: int = 500
    max_length: int = 40
    batch_size: int = 16
    search_epochs: float = 3.0      # over each half; after 1 the supernet is barely trained (benchmarks/RESULTS.md)
    search_steps: int | None = None  # overrides search_epochs
    retrain_epochs: float = 1.0
    lr_weights: float = 3e-4
    lr_fixed: float = 1e-3          # the fixed part (a new task head) during the search: it starts random
    lr_logits: float = 0.1
    retrain_lr: float = 1e-3
    beta: float = 1.0
    project: bool = True            # zero-sum projection of the gate gradient (S3PET's shift_detach)
    jacobian: str = "lr"            # second order: 'lr' (DARTS/S3PET) or 'adamw' (exact virtual-step derivative)
    clip: float = 2.0
    evals: int = 4                  # dev evaluations during the search (the best one is discretised)
    retrain_evals: int = 2
    ckpt_every: int = 10            # search steps between checkpoints
    output_dir: str = "runs/s3pet"
    wandb: bool = False
    fresh: bool = False             # ignore an existing checkpoint
    progress: bool = True
    threads: int | None = None      # torch intra-op threads (default: torch's choice)
    device: str = "auto"            # auto (the GPU if there is one), cpu, cuda, cuda:N
    step_sleep: float = 0.0         # testing hook: seconds to sleep after each search step

    _RUN_ONLY = ("output_dir", "wandb", "fresh", "progress", "step_sleep", "threads", "device")

    def fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self._RUN_ONLY}


@dataclass
class Result:
    spec: str                  # structure + fixed part: deltakit.attach(model, spec) re-applies it
    structure_spec: str        # the searched deltas alone
    fixed_spec: str | None
    chosen: list               # candidate keys
    cost: int                  # parameters of the chosen structure
    budget: Budget
    test: dict
    dev: dict
    metrics: dict
    output_dir: Path | None
    probs: list = field(default_factory=list)
    model: object = field(default=None, repr=False)
    handle: object = field(default=None, repr=False)


def _seed(*parts) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


@torch.no_grad()
def evaluate(backbone, enc: datalib.Encoded, batch_size: int) -> dict:
    was = backbone.model.training
    backbone.model.eval()
    preds, gold = [], []
    for batch in enc.batches(batch_size * 2):
        preds += backbone.logits(batch).argmax(-1).tolist()
        gold += batch["labels"].tolist()
    backbone.model.train(was)
    from sklearn.metrics import accuracy_score, f1_score
    return {"accuracy": float(accuracy_score(gold, preds)),
            "macro_f1": float(f1_score(gold, preds, average="macro", zero_division=0))}


def _lr(base: float, step: int, total: int) -> float:
    return base * max(0.0, 1.0 - step / max(1, total))


class _Logger:
    def __init__(self, cfg: Config, out: Path | None):
        self.run = None
        if not cfg.wandb:
            return
        try:
            import wandb
        except ImportError:
            print("--wandb: the wandb package is not installed (pip install deltakit[wandb]); not logging", file=sys.stderr)
            return
        if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
        self.run = wandb.init(project="deltakit-s3pet", config=asdict(cfg), dir=str(out) if out else None,
                              name=f"{cfg.strategy}-{cfg.budget}-s{cfg.seed}", resume="allow")

    def log(self, values: dict, step: int | None = None):
        if self.run is not None:
            self.run.log(values, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()


# ---- the search --------------------------------------------------------------------------------

class Search:
    """The supernet (every candidate attached, gated) and the bi-level loop over it."""

    def __init__(self, cfg, backbone, space, budget, fixed, trn, halves):
        self.cfg, self.backbone, self.space, self.budget = cfg, backbone, space, budget
        self.trn, (self.half_w, self.half_a) = trn, halves
        spec = space.spec + (f"; {fixed}" if fixed else "")
        torch.manual_seed(_seed(cfg.seed, 1))
        self.handle = deltakit.attach(backbone.model, spec, name="s3pet_search")
        by_key = {e.key: e for e in self.handle.entries}
        self.entries = [by_key[c.key] for c in space.candidates]
        self.names = dict(self.handle.named_parameters())
        self.weights = list(self.names.values())
        shared = sum(space.shared.values())
        self.gates = Gates(space.sizes, budget.params - shared, cfg.beta, cfg.project)
        self.alpha = self.gates.logits
        # The fixed part (a new, random task head) learns at its own rate: at the deltas' 3e-4 it stays
        # near random for a short search and the gates would be chosen against an untrained head.
        candidate = {id(p) for e in self.entries for p in e.module.parameters()}
        candidate |= {id(p) for rule, m in self.handle.shared.items() if rule in space.shared for p in m.parameters()}
        groups = [{"params": [w for w in self.weights if id(w) in candidate], "base_lr": cfg.lr_weights},
                  {"params": [w for w in self.weights if id(w) not in candidate], "base_lr": cfg.lr_fixed}]
        self.w_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr_weights, weight_decay=0.0)
        self.a_opt = torch.optim.AdamW([self.alpha], lr=cfg.lr_logits, weight_decay=0.0)
        per_epoch = max(1, len(self.half_w) // cfg.batch_size)
        self.total = cfg.search_steps or max(1, math.ceil(cfg.search_epochs * per_epoch))
        k = max(1, cfg.evals)
        self.eval_steps = sorted({max(1, round(self.total * (i + 1) / k)) for i in range(k)})
        self.step, self.best, self.best_step, self.history = 0, -1.0, 0, []
        self.best_logits = self.alpha.detach().clone()
        self.done = False

    def set_gates(self, z):
        for e, g in zip(self.entries, z.unbind()):
            e.gate = g

    def loss_on(self, part: str, step: int, b: float, noise, pass_id: int):
        idx = self.half_w if part == "w" else self.half_a
        local = datalib.step_indices(len(idx), self.cfg.batch_size, self.cfg.seed, step, 0 if part == "w" else 1)
        batch = self.trn.batch([idx[i] for i in local])
        torch.manual_seed(_seed(self.cfg.seed, step, pass_id))   # the same dropout masks in every pass of one kind
        self.set_gates(self.gates.sample(b, noise))
        return self.backbone.loss(batch)

    def run_step(self, step: int) -> dict:
        cfg = self.cfg
        for g in self.w_opt.param_groups:
            g["lr"] = _lr(g["base_lr"], step, self.total)
        for g in self.a_opt.param_groups:
            g["lr"] = _lr(cfg.lr_logits, step, self.total)
        gen = torch.Generator().manual_seed(_seed(cfg.seed, step, 99))
        # 1. logits, on the logits half (noise drawn once and shared by every pass of this update)
        b = self.gates.shift()
        noise = logistic_noise(len(self.entries), gen)
        trn = lambda: self.loss_on("w", step, b, noise, 1)   # noqa: E731
        val = lambda: self.loss_on("a", step, b, noise, 2)   # noqa: E731
        if cfg.order == 2:
            grad = second_order_grad(self.alpha, self.weights, self.w_opt, trn, val, cfg.jacobian)
        else:
            grad = first_order_grad(self.alpha, val)
        self.alpha.grad = grad
        torch.nn.utils.clip_grad_norm_([self.alpha], cfg.clip)
        self.a_opt.step()
        self.a_opt.zero_grad(set_to_none=True)
        # 2. weights, on the weights half, with fresh noise and gates held constant
        b = self.gates.shift()
        noise = logistic_noise(len(self.entries), gen)
        with torch.no_grad():
            z = self.gates.sample(b, noise)
        idx = datalib.step_indices(len(self.half_w), cfg.batch_size, cfg.seed, step, 0)
        batch = self.trn.batch([self.half_w[i] for i in idx])
        torch.manual_seed(_seed(cfg.seed, step, 3))
        self.set_gates(z)
        loss = self.backbone.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.weights, cfg.clip)
        self.w_opt.step()
        self.w_opt.zero_grad(set_to_none=True)
        return {"loss": loss.item(), "shift": b, "lr_w": self.w_opt.param_groups[0]["lr"]}

    def dev_score(self, dev) -> dict:
        with torch.no_grad():
            self.set_gates(self.gates.probs())
        return evaluate(self.backbone, dev, self.cfg.batch_size)

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        tensors = {f"w.{i}": w for i, w in enumerate(self.weights)}
        tensors["logits"] = self.alpha
        tensors["best_logits"] = self.best_logits
        tensors.update(ckpt.optimizer_tensors("opt_w", self.w_opt, {w: str(i) for i, w in enumerate(self.weights)}))
        tensors.update(ckpt.optimizer_tensors("opt_a", self.a_opt, {self.alpha: "0"}))
        rng_t, rng_j = ckpt.rng_state()
        tensors.update(rng_t)
        state = {"config": self.cfg.fingerprint(), "step": self.step, "best": self.best, "best_step": self.best_step,
                 "history": self.history, "done": self.done, "rng": rng_j, "weights": list(self.names)}
        return tensors, state

    def restore(self, tensors: dict, state: dict):
        if state["weights"] != list(self.names):
            raise SearchError("the search checkpoint was written for a different search space; pass --fresh")
        with torch.no_grad():
            for i, w in enumerate(self.weights):
                w.copy_(tensors[f"w.{i}"])
            self.alpha.copy_(tensors["logits"])
        self.best_logits = tensors["best_logits"].clone()
        ckpt.load_optimizer("opt_w", self.w_opt, {w: str(i) for i, w in enumerate(self.weights)}, tensors)
        ckpt.load_optimizer("opt_a", self.a_opt, {self.alpha: "0"}, tensors)
        ckpt.set_rng_state(tensors, state["rng"])
        self.step, self.best, self.best_step = state["step"], state["best"], state["best_step"]
        self.history, self.done = state["history"], state["done"]


def _save_ckpt(search: Search, path: Path | None):
    if path is not None:
        ckpt.save(path, *search.state())


def _fixed_spec(cfg: Config, backbone) -> str | None:
    if cfg.fixed == "auto":
        return backbone.fixed
    return None if cfg.fixed is None or cfg.fixed.strip().lower() in ("", "none") else cfg.fixed


@dataclass
class Setup:
    """What every run of a Config starts from: data, backbone, budget, fixed part, encoded splits."""
    task: datalib.Task
    backbone: object
    budget: Budget
    fixed: str | None
    trn: datalib.Encoded
    dev: datalib.Encoded
    test: datalib.Encoded


def label_words(cfg: Config, task: datalib.Task) -> list:
    """The task's label words, or --verbalizer's (one per label, in the task's label order)."""
    if cfg.verbalizer is None:
        return task.words
    words = [w.strip() for w in re.split("[,，]", cfg.verbalizer)]   # the full-width comma too
    if len(words) != task.num_labels or not all(words):
        raise SearchError(f"--verbalizer {cfg.verbalizer!r} gives {len(words)} words for the {task.num_labels} "
                          f"labels {task.labels}; give one non-empty word per label, in that order, comma-separated")
    return words


def prepare(cfg: Config) -> Setup:
    task = datalib.load_task(cfg.task, cfg.n_train, cfg.n_dev, cfg.n_test)
    backbone = load_backbone(cfg.model, label_words(cfg, task), cfg.seed, cfg.device)
    budget = parse_budget(cfg.budget, sum(p.numel() for p in backbone.model.parameters()))
    encode = lambda xs: datalib.Encoded(xs, backbone, cfg.max_length)   # noqa: E731
    return Setup(task, backbone, budget, _fixed_spec(cfg, backbone), encode(task.train), encode(task.dev),
                 encode(task.test))


def run(cfg: Config) -> Result:
    """Search (or draw a random structure), retrain it from scratch, report. See the module doc."""
    from tqdm.auto import tqdm
    if cfg.order not in (1, 2):
        raise SearchError(f"order={cfg.order}: use 1 (first-order) or 2 (second-order DARTS)")
    if cfg.strategy not in ("search", "random"):
        raise SearchError(f"strategy={cfg.strategy!r}: use 'search' or 'random'")
    if cfg.jacobian not in ("lr", "adamw"):
        raise SearchError(f"jacobian={cfg.jacobian!r}: use 'lr' or 'adamw'")
    parse_budget(cfg.budget, 10 ** 15)     # a malformed or non-positive budget fails before any loading
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir) if cfg.output_dir else None
    t0 = time.perf_counter()

    setup = prepare(cfg)
    task, backbone, budget, fixed, trn, dev, test = (setup.task, setup.backbone, setup.budget, setup.fixed,
                                                     setup.trn, setup.dev, setup.test)
    model = backbone.model
    space = build_space(model, cfg.space, fixed)
    check_fits(budget, space.sizes, sum(space.shared.values()))
    groups = [c.rule if c.rule in space.shared else None for c in space.candidates]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    logger = _Logger(cfg, out)
    setup_s = time.perf_counter() - t0

    # ---- search ----
    t1 = time.perf_counter()
    probs, search_info = None, {}
    if cfg.strategy == "search":
        search = Search(cfg, backbone, space, budget, fixed, trn, datalib.halves(len(trn), cfg.seed))
        path = out / CKPT if out is not None else None
        loaded = None if (cfg.fresh or path is None) else ckpt.load(path)
        if loaded is not None:
            tensors, state = loaded
            # a setting added to Config after the checkpoint was written counts as its default there
            saved = {**Config().fingerprint(), **state["config"]}
            if saved != cfg.fingerprint():
                diff = sorted(k for k in cfg.fingerprint() if saved.get(k) != cfg.fingerprint()[k])
                raise SearchError(f"{path} holds a search with other settings ({', '.join(diff)}); "
                                  f"use another --output-dir or pass --fresh to start over")
            search.restore(tensors, state)
        bar = tqdm(total=search.total, initial=search.step, desc="search", disable=not cfg.progress)
        while search.step < search.total:
            step = search.step
            info = search.run_step(step)
            search.step = step + 1
            if search.step in search.eval_steps:
                score = search.dev_score(dev)
                info["dev_accuracy"] = score["accuracy"]
                if score["accuracy"] >= search.best:
                    search.best, search.best_step = score["accuracy"], search.step
                    search.best_logits = search.alpha.detach().clone()
            search.history.append({"step": search.step, **info})
            logger.log({f"search/{k}": v for k, v in info.items()}, step=search.step)
            bar.update()
            bar.set_postfix(loss=f"{info['loss']:.3f}", best=f"{search.best:.3f}")
            if search.step % cfg.ckpt_every == 0 or search.step == search.total:
                search.done = search.step == search.total
                _save_ckpt(search, path)
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
        bar.close()
        b = float(search.gates.shift())
        with torch.no_grad():
            search.alpha.copy_(search.best_logits)
            probs = search.gates.probs().tolist()
        chosen = greedy_knapsack(probs, space.sizes, budget.params, groups, space.shared)
        search_info = {"steps": search.total, "best_step": search.best_step, "best_dev_accuracy": search.best,
                       "history": search.history, "final_shift": b}
        search.handle.detach()
        del search
    else:
        chosen = random_structure(space.sizes, budget.params, cfg.seed, groups, space.shared)
    search_s = time.perf_counter() - t1
    cost = structure_cost(chosen, space.sizes, groups, space.shared)
    assert cost <= budget.params, (cost, budget.params)

    # ---- retrain from scratch on the full training set ----
    t2 = time.perf_counter()
    structure_spec = space.spec_for(chosen)
    spec = "; ".join(s for s in (structure_spec, fixed) if s)
    retrain = train_structure(cfg, backbone, spec, trn, dev, logger)
    handle = retrain.pop("handle")
    retrain_s = time.perf_counter() - t2
    test_scores = evaluate(backbone, test, cfg.batch_size)
    logger.log({f"test/{k}": v for k, v in test_scores.items()})
    logger.finish()

    keys = [space.candidates[i].key for i in chosen]
    metrics = {"test": test_scores, "dev": retrain["dev"], "budget": budget.params, "budget_text": budget.text,
               "budget_fraction": budget.fraction, "backbone_params": budget.backbone, "cost": cost,
               "fixed_params": sum(p.numel() for n, p in handle.named_parameters()) - cost,
               "num_chosen": len(chosen), "num_candidates": len(space), "space_params": space.total,
               "strategy": cfg.strategy, "order": cfg.order, "seconds": {"setup": round(setup_s, 1), "search": round(search_s, 1),
               "retrain": round(retrain_s, 1), "total": round(time.perf_counter() - t0, 1)},
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               "search": {k: v for k, v in search_info.items() if k != "history"}, "retrain": retrain,
               "data": {"train": len(task.train), "dev": len(task.dev), "test": len(task.test)},
               "config": asdict(cfg)}
    result = Result(spec, structure_spec, fixed, keys, cost, budget, test_scores, retrain["dev"], metrics, out,
                    probs or [], model, handle)
    if out is not None:
        write_outputs(result, space, chosen, probs, search_info, handle)
    return result


def train_structure(cfg: Config, backbone, spec: str, trn, dev, logger=None, name: str = "default") -> dict:
    """Plain delta training of `spec` from a fresh initialisation on the whole training set; keeps
    the deltas of the best dev evaluation. Returns {"handle", "dev", "steps", "losses"}."""
    torch.manual_seed(_seed(cfg.seed, 2))
    handle = deltakit.attach(backbone.model, spec, name=name)
    params = handle.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.retrain_lr, weight_decay=0.01)
    per_epoch = max(1, len(trn) // cfg.batch_size)
    total = max(1, math.ceil(cfg.retrain_epochs * per_epoch))
    warm = max(1, int(0.06 * total))
    k = max(1, cfg.retrain_evals)
    evals = {max(1, round(total * (i + 1) / k)) for i in range(k)}
    best, best_state, losses = None, None, []
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc="retrain", disable=not cfg.progress)
    backbone.model.train()
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = cfg.retrain_lr * min((step + 1) / warm, max(0.0, (total - step) / (total - warm + 1e-9)))
        idx = datalib.step_indices(len(trn), cfg.batch_size, cfg.seed, step, 2)
        torch.manual_seed(_seed(cfg.seed, step, 4))
        loss = backbone.loss(trn.batch(idx))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if logger:
            logger.log({"retrain/loss": losses[-1]})
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if step + 1 in evals:
            score = evaluate(backbone, dev, cfg.batch_size)
            if best is None or score["accuracy"] >= best["accuracy"]:
                best, best_state = {**score, "step": step + 1}, {n: p.detach().clone() for n, p in handle.named_parameters()}
    bar.close()
    handle.load_state_dict(best_state)
    return {"handle": handle, "dev": best, "steps": total, "final_loss": float(np.mean(losses[-20:])),
            "trainable": handle.num_trainable}


def write_outputs(result: Result, space, chosen, probs, search_info, handle):
    out = result.output_dir
    chosen_set = set(chosen)
    structure = {
        "spec": result.spec, "structure_spec": result.structure_spec, "fixed_spec": result.fixed_spec,
        "budget": result.budget.params, "budget_text": result.budget.text, "cost": result.cost,
        "backbone_params": result.budget.backbone, "space": space.spec,
        "chosen": [{"key": c.key, "position": c.position, "type": c.type, "delta": c.head, "params": c.num_params}
                   for c in space.candidates if c.index in chosen_set],
        "candidates": [{"key": c.key, "params": c.num_params, "p": (probs[c.index] if probs else None),
                        "chosen": c.index in chosen_set} for c in space.candidates],
    }
    write_json(out / "structure.json", structure)
    atomic_write(out / "structure.spec", lambda tmp: tmp.write_text(result.spec + "\n", encoding="utf-8"))
    metrics = dict(result.metrics)
    if search_info.get("history"):
        metrics["search_history"] = search_info["history"]
    write_json(out / "metrics.json", metrics)
    handle.save(out / "deltas")
    from .plots import heatmap
    values = probs if probs else [1.0 if i in chosen_set else 0.0 for i in range(len(space))]
    title = (f"S3PET gates at the best dev step, budget {result.budget.text} ({result.budget.params:,} params); "
             f"red: chosen ({result.cost:,})" if probs else f"random structure, budget {result.budget.text}")
    heatmap(space.candidates, values, chosen, out / "gates.png", title)


# ---- command line ------------------------------------------------------------------------------

def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true/false")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.s3pet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name.startswith("_"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.type in ("bool",) or isinstance(default, bool):
            if f.name in ("wandb", "fresh"):
                p.add_argument(flag, action="store_true", default=default)
            else:
                p.add_argument(flag, type=_bool, default=default, metavar="true|false")
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        if f.name in ("n_train", "search_steps", "threads"):
            kind = lambda s: None if s.lower() == "none" else int(s)   # noqa: E731
        p.add_argument(flag, type=kind, default=default)
    return p


def main(argv=None) -> int:
    args = vars(parser().parse_args(argv))
    cfg = Config(**args)
    try:
        result = run(cfg)
    except deltakit.DeltakitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {"spec": result.spec, "cost": result.cost, "budget": result.budget.params, "test": result.test,
               "dev": result.dev, "seconds": result.metrics["seconds"], "output_dir": str(result.output_dir)}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
