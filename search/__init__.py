"""S3PET (sparse structure search for delta tuning) on top of deltakit's public API.

    python -m search.s3pet --budget 0.01%

Modules: budget (budget strings), space (candidates from a spec), gates (shifted global sigmoid),
bilevel (first/second-order updates), discretize (greedy knapsack, random baseline), data (tasks),
models (backbone loaders), ckpt (resumable checkpoints), plots (heat map), s3pet (CLI + API).
Heavy imports (transformers, matplotlib, wandb) happen where they are used.
"""
from .budget import Budget, parse_budget
from .errors import BudgetError, DataError, SearchError

__all__ = ["Budget", "parse_budget", "BudgetError", "DataError", "SearchError"]
