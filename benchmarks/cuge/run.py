"""Tune a delta per CUGE dataset, select it on dev, predict test, score, write the submission files.

    python -m benchmarks.cuge.run --task ccpm --model cpm-ant-10b.pt --data-dir DIR --delta SPEC --output-dir OUT
    python -m benchmarks.cuge.run --task lite --model cpm2/ --data-dir DIR --output-dir OUT    # the 7, OUT/<dataset>
    python -m benchmarks.cuge.score OUT                                                       # the CUGE table

--model: a native CPM-Ant checkpoint (.pt + config JSON + ant.txt), a CPM-2 Megatron folder (+ vocab.txt)
or a Hugging Face folder (causal LM, seq2seq LM or encoder); recipes/__init__.py has the table.
--delta: any deltakit spec, or a file holding one (the `structure.spec` the S3PET search writes, or
its output folder); default: the recipe's (CPM-Ant: LoRA r=8 on q,v as CPM-Live tunes it).

A run folder gets: metrics.json ({"model", "delta", "dataset", "split", "scores", ...}: the scores on
test when it has answers, else on dev; both are kept as dev_scores / test_scores), deltas/ (the
selected deltas, deltakit format), submission/ (submit.write), predictions/{dev,test}.jsonl,
loss.png, train.ckpt.safetensors (the resumable state: the same command after a crash resumes) and
train.json (the training history). Every split is loaded and checked before the model is.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from deltakit.errors import DeltakitError
from deltakit.io import write_json, write_text

from . import parallel, registry
from .errors import CugeError

NEEDS = {   # module -> pip package, per need; checked before any work starts
    "data": {"datasets": "datasets", "sacrebleu": "sacrebleu", "rouge_score": "rouge-score",
             "sklearn": "scikit-learn", "matplotlib": "matplotlib", "safetensors": "safetensors", "tqdm": "tqdm"},
    "cpm-ant": {"jieba": "jieba"},
    "cpm-2": {"jieba": "jieba", "transformers": "transformers"},
    "hf-causal": {"transformers": "transformers"},
    "hf-seq2seq": {"transformers": "transformers"},
    "encoder": {"transformers": "transformers"},
    "wandb": {"wandb": "wandb"},
}


def require(*needs: str):
    """A CugeError naming every missing package (and the extra that has them) before any work starts."""
    missing = sorted({pip for need in needs for mod, pip in NEEDS[need].items()
                      if importlib.util.find_spec(mod) is None})
    if missing:
        raise CugeError(f"this run needs {', '.join(missing)}: pip install {' '.join(missing)} "
                        f"(or pip install deltakit[cuge,cpm,wandb])")


def model_path(text: str) -> str:
    """--model: a path, or `e5-small` for deltakit's offline multilingual-e5-small (deltakit.assets)."""
    if text == "e5-small" and not Path(text).exists():
        from deltakit.assets import e5_small_path
        return str(e5_small_path())
    return text


def read_delta(text: str | None) -> str | None:
    """--delta: a spec, a file holding one (structure.spec), or a folder with structure.spec in it."""
    if text is None:
        return None
    path = Path(text)
    if path.is_dir():
        path = path / "structure.spec"
        if not path.is_file():
            raise CugeError(f"--delta {text}: a folder without structure.spec (the S3PET search writes one)")
    if path.is_file():
        spec = path.read_text(encoding="utf-8").strip()
        if not spec:
            raise CugeError(f"--delta {path} is empty; it should hold a deltakit spec")
        return spec
    return text


def labelled(rows, kind: str) -> bool:
    """Whether a split carries its answers (a released test split usually does not)."""
    column, empty = {"choice": ("label", -1), "rank": ("relevance", []), "math": ("answer", ""),
                     "generate": ("target", ""), "tag": ("target", "")}[kind]
    values = rows[column] if hasattr(rows, "column_names") else [r[column] for r in rows]
    return all(v != empty for v in values)


def predict(recipe, rows, kind: str, batch_size: int, desc: str, progress: bool, idle=None) -> list:
    """One prediction per row, in row order; batches are formed by input length (less padding).
    Under torchrun each rank predicts every world-th batch, its forwards (beam search steps too) in
    lockstep with the others' (`idle()`: one forward), and the predictions are gathered."""
    from tqdm.auto import tqdm
    from .train import take
    lengths = rows["input"] if hasattr(rows, "column_names") else [r["input"] for r in rows]
    order = sorted(range(len(lengths)), key=lambda i: len(lengths[i]))
    out = [None] * len(order)
    mine = []
    with parallel.lockstep(recipe.model, idle):
        for idx in tqdm(parallel.batches(len(order), batch_size), desc=desc, disable=not progress, file=sys.stderr):
            idx = [order[j] for j in idx]
            mine += zip(idx, recipe.predict(take(rows, idx), kind))
    for i, p in parallel.gathered([(i, _jsonable(p)) for i, p in mine] if parallel.active() else mine):
        out[i] = p
    return out


def _jsonable(p):
    return p.tolist() if torch.is_tensor(p) else p


def device_of(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def hparams(args, recipe, ds):
    """The recipe's defaults for `ds`, overridden by the command line (--patience 0: never stop)."""
    hp = recipe.hparams(ds).but(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, patience=args.patience,
                                eval_every=args.eval_every, max_len=args.max_len, max_new=args.max_new,
                                warmup=args.warmup, schedule=args.schedule)
    return replace(hp, patience=None) if args.patience == 0 else hp


def train_config(args, hp, n_train: int):
    from .train import TrainConfig
    steps = args.max_steps or max(1, round(hp.epochs * -(-n_train // hp.batch_size)))
    every = min(hp.eval_every, steps)
    return TrainConfig(lr=hp.lr, batch_size=hp.batch_size, max_steps=steps, eval_every=every,
                       save_every=args.save_every or every, patience=hp.patience, select=args.select,
                       schedule=hp.schedule, warmup=min(hp.warmup, steps), weight_decay=hp.weight_decay,
                       clip=hp.clip, seed=args.seed, eval_batch_size=args.eval_batch_size, step_sleep=args.step_sleep)


def run_one(args, name: str, out: Path) -> dict:
    """Train, select, predict and score one dataset into `out`; returns its metrics.json."""
    import deltakit
    from deltakit import distributed as dist
    from deltakit.wandb_log import Run

    from . import data, metrics, recipes, submit
    from .train import plot, take, train

    ds = registry.get(name)
    t0 = time.perf_counter()
    splits = parallel.main_first(lambda: {           # every file checked first (torchrun: cached by rank 0)
        split: data.load(ds.name, args.data_dir, split, max_n=limit)
        for split, limit in (("train", args.max_train), ("dev", args.max_dev), ("test", args.max_test))})
    device = dist.device() if parallel.active() else device_of(args.device)   # torchrun: this rank's
    torch.manual_seed(args.seed)                     # a new head (encoders) is drawn from it
    recipe = recipes.load(args.model, ds, splits["train"], device, kind=args.recipe, seed=args.seed)
    hp = hparams(args, recipe, ds)
    recipe.setup(ds, hp, splits["train"])
    spec = read_delta(args.delta) or recipe.default_delta
    torch.manual_seed(args.seed)                     # the deltas' initialisation
    handle = deltakit.attach(recipe.model, spec)
    parallel.shard(recipe.model)                     # torchrun: FSDP2, after attaching, before the optimizer
    cfg = train_config(args, hp, len(splits["train"]))
    fingerprint = {"dataset": ds.name, "model": str(Path(args.model).resolve()), "recipe": recipe.name,
                   "delta": spec, "data_dir": str(Path(args.data_dir).resolve()),
                   "rows": {s: len(r) for s, r in splits.items()}, "hparams": asdict(hp)}
    eval_bs = args.eval_batch_size or hp.batch_size
    progress = args.progress and dist.is_main()

    def idle():                                      # torchrun: a forward matching another rank's
        return recipe.loss(take(splits["train"], [0]), ds.kind_of("train"))

    def dev_metric():                                # --select metric: the dataset's CUGE score on dev
        preds = predict(recipe, splits["dev"], ds.kind, eval_bs, "dev", False, idle)
        return metrics.score(ds.name, preds, splits["dev"])[ds.score_metric]

    log = Run(args.wandb, "deltakit-cuge", {**fingerprint, "train": asdict(cfg)}, out, out.name)
    result = train(handle, lambda rows: recipe.loss(rows, ds.kind_of("train")), splits["train"], splits["dev"],
                   cfg, out, fingerprint, dev_metric=dev_metric if args.select == "metric" else None,
                   dev_loss_fn=lambda rows: recipe.loss(rows, ds.kind_of("dev")), logger=log,
                   progress=progress, fresh=args.fresh)
    handle.save(out / "deltas")                      # torchrun: every rank gathers, rank 0 writes
    parallel.on_main(write_json, out / "train.json", {**asdict(result), "config": asdict(cfg)})
    parallel.on_main(plot, result, out / "loss.png", f"{ds.title}: {recipe.name} [{spec}]")
    log.image("loss_curve", out / "loss.png")

    preds = {s: predict(recipe, splits[s], ds.kind, eval_bs, f"predict {s}", progress, idle) for s in ("dev", "test")}
    dev_scores = metrics.score(ds.name, preds["dev"], splits["dev"])
    test_scores = (metrics.score(ds.name, preds["test"], splits["test"]) if labelled(splits["test"], ds.kind)
                   else None)

    def write_predictions() -> Path:             # rank 0; returns the submission file
        for s, p in preds.items():
            write_text(out / "predictions" / f"{s}.jsonl", "".join(
                json.dumps({"id": i, "prediction": _jsonable(x)}, ensure_ascii=False) + "\n"
                for i, x in zip(splits[s]["id"], p)))
        return submit.write(ds.name, splits["test"], preds["test"], out / "submission")
    submission = parallel.on_main(write_predictions)
    report = {
        "model": args.model_name, "delta": spec, "dataset": ds.name,
        "split": "test" if test_scores else "dev", "scores": test_scores or dev_scores,
        "dev_scores": dev_scores, "test_scores": test_scores, "recipe": recipe.name,
        "trainable": handle.num_trainable, "submission": str(submission),
        "train": {"steps": result.steps, "best_step": result.best_step, "best": result.best,
                  "select": cfg.select, "stopped_early": result.stopped_early, "resumed_from": result.resumed_from},
        "hparams": asdict(hp), "rows": {s: len(r) for s, r in splits.items()}, "device": str(device),
        "seconds": {"train": result.seconds, "total": round(time.perf_counter() - t0, 1)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    parallel.on_main(write_json, out / "metrics.json", report)
    log.summary({**{f"dev/{k}": v for k, v in dev_scores.items()},
                 **{f"test/{k}": v for k, v in (test_scores or {}).items()},
                 "trainable": report["trainable"], "best_step": result.best_step})
    log.finish()
    if not parallel.active():                        # a sharded model cannot be detached; it is dropped
        handle.detach()
    return report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cuge.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help="a dataset (ccpm, c3, sogou_log, ...), a comma-separated list, "
                                                 "'lite' (the 7 lite datasets) or 'all'")
    p.add_argument("--model", required=True, help="CPM-Ant .pt, CPM-2 Megatron folder or Hugging Face folder "
                                                  "(e5-small: deltakit's offline multilingual-e5-small)")
    p.add_argument("--data-dir", required=True, help="DIR with DIR/<dataset>/ (see benchmarks/cuge/data.py)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--delta", help="deltakit spec, or a structure.spec file (default: the recipe's)")
    p.add_argument("--recipe", choices=("cpm-ant", "cpm-2", "hf-causal", "hf-seq2seq", "encoder"),
                   help="override the backbone kind found from --model's files")
    p.add_argument("--max-train", type=int, help="use only the first N training rows")
    p.add_argument("--max-dev", type=int)
    p.add_argument("--max-test", type=int)
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the recipe's epochs over the data)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--patience", type=int, help="evaluations without improvement before stopping (0: never stop)")
    p.add_argument("--select", choices=("dev_loss", "metric"), default="dev_loss",
                   help="keep the deltas of the best dev loss (CPM-Live) or of the best dev score")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", choices=("noam", "constant", "linear"), help="learning-rate schedule")
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--max-len", type=int, help="tokens the model reads")
    p.add_argument("--max-new", type=int, help="tokens generated (default: the registry's per dataset)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE is set or you are logged in)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --output-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)   # tests: slow steps
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.model_name, args.model = args.model, model_path(args.model)
    if not args.progress:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"   # read when datasets is first imported
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
    from deltakit import distributed as dist
    try:
        names = registry.names(args.task)
        from . import recipes
        kind = args.recipe or recipes.detect(args.model)
        require("data", kind, *(["wandb"] if args.wandb else []))
        parallel.start(args.device)   # under torchrun (WORLD_SIZE > 1): join the process group
        for name in names:
            parallel.check(kind, registry.get(name))
        out = Path(args.output_dir)
        reports = {}
        with dist.guard("the CUGE run"):   # a rank that died: an error here, not a hang
            for name in names:
                folder = out if len(names) == 1 else out / name
                reports[name] = run_one(args, name, folder)
                if dist.is_main():
                    print(json.dumps({"dataset": name, "split": reports[name]["split"],
                                      "scores": reports[name]["scores"], "output": str(folder)}, ensure_ascii=False))
            if len(names) > 1:
                from . import score
                parallel.on_main(score.leaderboard, [out / n for n in names], out)
                if dist.is_main():
                    print(f"leaderboard: {out / 'leaderboard.md'}")
    except DeltakitError as e:        # CugeError is one; a bad --delta spec raises deltakit's own
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if parallel.active():
            dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
