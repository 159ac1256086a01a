"""What a run leaves behind: structure.json, structure.spec, metrics.json, the retrained deltas/,
gates.png (when matplotlib is installed), and the wandb log (when asked)."""
from __future__ import annotations

import resource
from dataclasses import asdict

from deltakit import distributed as dist
from deltakit.io import write_json, write_text

from deltakit.wandb_log import Run


def logger(cfg, out) -> Run:
    """The run's wandb log when --wandb (offline unless the user configured wandb), else a no-op."""
    return Run(cfg.wandb, "deltakit-s3pet", asdict(cfg), out, f"{cfg.strategy}-{cfg.budget}-s{cfg.seed}")


def log_result(log: Run, result, space, probs):
    """The end of a run in wandb: each candidate's gate probability at the best dev step, the scores and
    the chosen structure's size (summary), and the gate heat map as a picture."""
    if probs:
        log.log({f"gates/{c.key}": p for c, p in zip(space.candidates, probs)})
    log.summary({"cost": result.cost, "budget": result.budget.params, "num_chosen": len(result.chosen),
                 "spec": result.spec, **{f"test/{k}": v for k, v in result.test.items()},
                 **{f"dev/{k}": v for k, v in result.dev.items()}})
    if result.output_dir is not None:
        log.image("heatmap", result.output_dir / "gates.png", caption=result.structure_spec)


def metrics(cfg, setup, space, chosen, cost, handle, test, retrain, search_info, seconds) -> dict:
    """metrics.json without the search history (write_outputs adds it)."""
    budget, task = setup.budget, setup.task
    return {"test": test, "dev": retrain["dev"], "budget": budget.params, "budget_text": budget.text,
            "budget_fraction": budget.fraction, "backbone_params": budget.backbone, "cost": cost,
            "fixed_params": sum(p.numel() for n, p in handle.named_parameters()) - cost,
            "num_chosen": len(chosen), "num_candidates": len(space), "space_params": space.total,
            "strategy": cfg.strategy, "order": cfg.order, "seconds": seconds,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "search": {k: v for k, v in search_info.items() if k != "history"}, "retrain": retrain,
            "data": {"train": len(task.train), "dev": len(task.dev), "test": len(task.test),
                     **({"splits": task.splits} if task.splits else {})},   # which file each came from (CUGE)
            "config": asdict(cfg)}


def write_outputs(result, space, chosen, probs, search_info, handle, heatmap: bool = True):
    """Every output file into result.output_dir; the heat map last, and only when `heatmap`. Under
    torchrun every rank calls it: the deltas are gathered from all, rank 0 writes."""
    handle.save(result.output_dir / "deltas")
    dist.on_main(_write_files, result, space, chosen, probs, search_info, heatmap)


def _write_files(result, space, chosen, probs, search_info, heatmap: bool):
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
    write_text(out / "structure.spec", result.spec + "\n")
    full = dict(result.metrics)
    if search_info.get("history"):
        full["search_history"] = search_info["history"]
    write_json(out / "metrics.json", full)
    if not heatmap:
        return
    from .plots import heatmap as draw
    values = probs if probs else [1.0 if i in chosen_set else 0.0 for i in range(len(space))]
    title = (f"S3PET gates at the best dev step, budget {result.budget.text} ({result.budget.params:,} params); "
             f"red: chosen ({result.cost:,})" if probs else f"random structure, budget {result.budget.text}")
    draw(space.candidates, values, chosen, out / "gates.png", title)
