"""The supernet: every candidate of the space attached at once, each scaled by its gate, and the
bi-level loop over it: gate logits on one half of the training data, delta weights on the other,
a dev evaluation now and then (the best one's gates are kept), a checkpoint every few steps.

    probs, info = search(cfg, backbone, space, budget, fixed, trn, dev, ckpt_path, logger)
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import deltakit

from deltakit import distributed as dist
from deltakit.io import rng_state, set_rng_state

from . import ckpt, data as datalib, ranks
from .bilevel import first_order_grad, second_order_grad
from .errors import SearchError
from .gates import Gates, logistic_noise
from .retrain import evaluate, linear_decay
from .seeds import derive

CKPT = "search.ckpt.safetensors"   # the checkpoint's name inside the output folder


class Search:
    """The supernet (every candidate attached, gated) and the bi-level loop over it."""

    def __init__(self, cfg, backbone, space, budget, fixed, trn, halves):
        self.cfg, self.backbone, self.space, self.budget = cfg, backbone, space, budget
        self.trn, (self.half_w, self.half_a) = trn, halves
        spec = space.spec + (f"; {fixed}" if fixed else "")
        torch.manual_seed(derive(cfg.seed, 1))
        self.handle = deltakit.attach(backbone.model, spec, name="s3pet_search")
        ranks.shard(backbone.model)   # torchrun: FSDP2 over the deltas' blocks; the gate logits stay whole
        by_key = {e.key: e for e in self.handle.entries}
        self.entries = [by_key[c.key] for c in space.candidates]
        self.names = dict(self.handle.named_parameters())
        self.weights = list(self.names.values())
        shared = sum(space.rule_params.values())
        self.gates = Gates(space.sizes, budget.params - shared, cfg.beta, cfg.project)
        self.alpha = self.gates.logits
        # The fixed part (a new, random task head) learns at its own rate: at the deltas' 3e-4 it stays
        # near random for a short search and the gates would be chosen against an untrained head.
        candidate = {id(p) for e in self.entries for p in e.module.parameters()}
        candidate |= {id(p) for rule, m in self.handle.shared_modules.items() if rule in space.rule_params for p in m.parameters()}
        groups = [{"params": [w for w in self.weights if id(w) in candidate], "base_lr": cfg.lr_weights},
                  {"params": [w for w in self.weights if id(w) not in candidate], "base_lr": cfg.lr_fixed}]
        self.w_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr_weights, weight_decay=0.0)
        self.a_opt = torch.optim.AdamW([self.alpha], lr=cfg.lr_logits, weight_decay=0.0)
        per_epoch = max(1, len(self.half_w) // cfg.batch_size)
        self.total = cfg.search_steps or max(1, math.ceil(cfg.search_epochs * per_epoch))
        k = cfg.evals
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
        torch.manual_seed(derive(self.cfg.seed, step, pass_id))   # the same dropout masks in every pass of one kind
        self.set_gates(self.gates.sample(b, noise))
        return ranks.step_loss(lambda mine: self.backbone.loss(self.trn.batch(mine)), [idx[i] for i in local])

    def run_step(self, step: int) -> dict:
        """One bi-level step: the gate logits, then the delta weights."""
        cfg = self.cfg
        for g in self.w_opt.param_groups:
            g["lr"] = linear_decay(g["base_lr"], step, self.total)
        for g in self.a_opt.param_groups:
            g["lr"] = linear_decay(cfg.lr_logits, step, self.total)
        gen = torch.Generator().manual_seed(derive(cfg.seed, step, 99))
        # 1. logits, on the logits half (noise drawn once and shared by every pass of this update)
        b = self.gates.shift()
        noise = logistic_noise(len(self.entries), gen)
        trn = lambda: self.loss_on("w", step, b, noise, 1)   # noqa: E731
        val = lambda: self.loss_on("a", step, b, noise, 2)   # noqa: E731
        if cfg.order == 2:
            grad = second_order_grad(self.alpha, self.weights, self.w_opt, trn, val, cfg.jacobian)
        else:
            grad = first_order_grad(self.alpha, val)
        self.alpha.grad = ranks.replicated_grad(grad)   # torchrun: the same logits on every rank
        torch.nn.utils.clip_grad_norm_([self.alpha], cfg.clip)
        self.a_opt.step()
        self.a_opt.zero_grad(set_to_none=True)
        # 2. weights, on the weights half, with fresh noise and gates held constant
        b = self.gates.shift()
        noise = logistic_noise(len(self.entries), gen)
        with torch.no_grad():
            z = self.gates.sample(b, noise)
        idx = datalib.step_indices(len(self.half_w), cfg.batch_size, cfg.seed, step, 0)
        torch.manual_seed(derive(cfg.seed, step, 3))
        self.set_gates(z)
        loss = ranks.step_loss(lambda mine: self.backbone.loss(self.trn.batch(mine)), [self.half_w[i] for i in idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.weights, cfg.clip)
        self.w_opt.step()
        self.w_opt.zero_grad(set_to_none=True)
        return {"loss": ranks.mean(loss.item()), "shift": b, "lr_w": self.w_opt.param_groups[0]["lr"]}

    def dev_score(self, dev) -> dict:
        with torch.no_grad():
            self.set_gates(self.gates.probs())
        return evaluate(self.backbone, dev, self.cfg.batch_size)

    def loop(self, dev, path: Path | None, logger) -> None:
        """Steps until `total`, from wherever a resumed search stands; dev evaluations at `eval_steps`
        (the best one's logits are kept), checkpoints every `ckpt_every` steps and at the end."""
        from tqdm.auto import tqdm
        cfg = self.cfg
        bar = tqdm(total=self.total, initial=self.step, desc="search", disable=not ranks.progress(cfg))
        while self.step < self.total:
            step = self.step
            info = self.run_step(step)
            self.step = step + 1
            if self.step in self.eval_steps:
                score = self.dev_score(dev)
                info["dev_accuracy"] = score["accuracy"]
                if score["accuracy"] >= self.best:
                    self.best, self.best_step = score["accuracy"], self.step
                    self.best_logits = self.alpha.detach().clone()
            self.history.append({"step": self.step, **info})
            logger.log({f"search/{k}": v for k, v in info.items()}, step=self.step)
            bar.update()
            bar.set_postfix(loss=f"{info['loss']:.3f}", best=f"{self.best:.3f}")
            if self.step % cfg.ckpt_every == 0 or self.step == self.total:
                self.done = self.step == self.total
                if path is not None:
                    tensors, state = self.state()            # every rank: the deltas gathered whole
                    ranks.on_main(ckpt.save, path, tensors, state)
            if cfg.step_sleep:
                time.sleep(cfg.step_sleep)
        bar.close()

    def outcome(self) -> tuple[list, dict]:
        """The gate probabilities at the best dev step, and what the search did."""
        b = float(self.gates.shift())
        with torch.no_grad():
            self.alpha.copy_(self.best_logits)
            probs = self.gates.probs().tolist()
        return probs, {"steps": self.total, "best_step": self.best_step, "best_dev_accuracy": self.best,
                       "history": self.history, "final_shift": b}

    # -- checkpoints -----------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        tensors = {f"w.{i}": w for i, w in enumerate(self.weights)}
        tensors["logits"] = self.alpha
        tensors["best_logits"] = self.best_logits
        tensors.update(ckpt.optimizer_tensors("opt_w", self.w_opt, {w: str(i) for i, w in enumerate(self.weights)}))
        tensors.update(ckpt.optimizer_tensors("opt_a", self.a_opt, {self.alpha: "0"}))
        tensors = ranks.whole(tensors)
        rng_t, rng_j = rng_state()
        tensors.update(rng_t)
        state = {"config": self.cfg.fingerprint(), "step": self.step, "best": self.best, "best_step": self.best_step,
                 "history": self.history, "done": self.done, "rng": rng_j, "weights": list(self.names)}
        return tensors, state

    def resume(self, path: Path) -> bool:
        """Continue from the checkpoint at `path` if there is one (it must be of the same settings)."""
        loaded = ckpt.load(path)
        if loaded is None:
            return False
        tensors, state = loaded
        diff = self.cfg.differences(state["config"])
        if diff:
            raise SearchError(f"{path} holds a search with other settings ({', '.join(diff)}); "
                              f"use another --output-dir or pass --fresh to start over")
        self.restore(tensors, state)
        return True

    def restore(self, tensors: dict, state: dict):
        if state["weights"] != list(self.names):
            raise SearchError("the search checkpoint was written for a different search space; pass --fresh")
        with torch.no_grad():
            for i, w in enumerate(self.weights):   # whole tensors; a sharded one takes this rank's slice
                w.copy_(dist.like(tensors[f"w.{i}"], w))
            self.alpha.copy_(tensors["logits"])
        self.best_logits = tensors["best_logits"].clone()
        ckpt.load_optimizer("opt_w", self.w_opt, {w: str(i) for i, w in enumerate(self.weights)}, tensors)
        ckpt.load_optimizer("opt_a", self.a_opt, {self.alpha: "0"}, tensors)
        set_rng_state(tensors, state["rng"])
        self.step, self.best, self.best_step = state["step"], state["best"], state["best_step"]
        self.history, self.done = state["history"], state["done"]


def search(cfg, backbone, space, budget, fixed, trn, dev, path: Path | None, logger) -> tuple[list, dict]:
    """Build the supernet, resume it from `path` (unless cfg.fresh), run the loop; returns the gate
    probabilities at the best dev step and the search's record. The supernet is detached afterwards."""
    s = Search(cfg, backbone, space, budget, fixed, trn, datalib.halves(len(trn), cfg.seed))
    try:
        if path is not None and not cfg.fresh:
            s.resume(path)
        s.loop(dev, path, logger)
        return s.outcome()
    finally:
        if not dist.is_sharded(backbone.model):   # a sharded supernet is dropped with its model (s3pet.run)
            s.handle.detach()
