"""S3PET (sparse structure search for delta tuning) on top of deltakit's public API.

    python -m search.s3pet --budget 0.01%

Modules: config (Config, Result, their checks), budget (budget strings), space (candidates from a
spec), gates (shifted global sigmoid), bilevel (first/second-order updates), supernet (the gated
supernet and the search loop), discretize (greedy knapsack, random baseline), retrain (training a
structure, evaluation), data (tasks), backbone + models + cpm (backbones and their loaders),
prepare (what a run starts from), ckpt (resumable checkpoints), outputs (files, what wandb gets; deltakit.wandb_log
logs it), plots (heat map), extras (optional packages, checked first), seeds, tiny (test fixtures), s3pet (CLI + run).
Heavy imports (transformers, matplotlib, wandb) happen where they are used.
"""
from .budget import Budget, parse_budget
from .errors import BudgetError, DataError, SearchError

__all__ = ["Budget", "parse_budget", "BudgetError", "DataError", "SearchError"]
