"""The settings of one S3PET run (`Config`, checked when it is made) and what the run returns
(`Result`). The command line (search/s3pet.py) is generated from Config's fields and types."""
from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .budget import Budget, parse_budget
from .errors import SearchError


@dataclass
class Config:
    budget: str | int | float = "0.01%"
    model: str | None = None        # HF folder or native CPM-Ant .pt/folder; default: multilingual-e5-small
    task: str = "sentiment"         # built-in, a JSONL file of {"text", "label"}, or cuge:<name> (search/cuge.py)
    data_dir: str | None = None     # cuge: tasks: the folder with DIR/<name>/ (benchmarks/cuge/data.py)
    verbalizer: str | None = None   # language-model backbones (CPM-Ant): one word per label, comma-separated
    space: str = "M"                # M, L, or a deltakit spec string of candidates
    fixed: str | None = "auto"      # always-on deltas outside the budget; auto: the backbone's choice (full@head)
    order: int = 1                  # 1: first-order, 2: DARTS second-order
    strategy: str = "search"        # search | random
    seed: int = 0
    n_train: int | None = 1600      # training examples (halved during the search); None: all
    n_dev: int = 200
    n_test: int = 500
    max_length: int | None = None   # tokens a row is cut to; None: 40 for text tasks, the CUGE recipe's max_len
                                    # per dataset for cuge: (on CPM-Ant its 32 prompt positions included)
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
    output_dir: str | None = "runs/s3pet"   # None: write nothing
    wandb: bool = False
    fresh: bool = False             # ignore an existing checkpoint
    progress: bool = True
    threads: int | None = None      # torch intra-op threads (default: torch's choice)
    device: str = "auto"            # auto (the GPU if there is one), cpu, cuda, cuda:N
    step_sleep: float = 0.0         # testing hook: seconds to sleep after each search step

    _RUN_ONLY = ("output_dir", "wandb", "fresh", "progress", "step_sleep", "threads", "device")

    def __post_init__(self):
        from .cuge import is_cuge
        if self.max_length is None and not is_cuge(self.task):
            self.max_length = 40   # what it always was for text tasks (so their checkpoints still resume)
        check(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from a dict (a JSON job, a notebook's settings); unknown names are a SearchError."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            from deltakit.errors import nearest
            raise SearchError(f"unknown search setting(s) {', '.join(unknown)}.{nearest(unknown[0], names)} "
                              f"The settings: {', '.join(names)}")
        return cls(**values)

    def fingerprint(self) -> dict:
        """The settings a resumed search must share with the one that wrote the checkpoint."""
        return {k: v for k, v in asdict(self).items() if k not in self._RUN_ONLY}

    def differences(self, saved: dict) -> list[str]:
        """The settings in which a checkpoint's fingerprint differs from this one; a setting added to
        Config after the checkpoint was written counts as its default there."""
        mine, theirs = self.fingerprint(), {**Config().fingerprint(), **saved}
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


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


# ---- checks: every setting is tested when a Config is made, so a bad one fails before any loading

CHOICES = {   # setting -> (allowed values, how to say them)
    "order": ((1, 2), "1 (first-order) or 2 (second-order DARTS)"),
    "strategy": (("search", "random"), "'search' or 'random'"),
    "jacobian": (("lr", "adamw"), "'lr' or 'adamw'"),
}
AT_LEAST = {   # setting -> its smallest value (None stays allowed where the type says so)
    "seed": 0, "n_train": 1, "n_dev": 1, "n_test": 1, "max_length": 2, "batch_size": 1, "search_steps": 1,
    "evals": 1, "retrain_evals": 1, "ckpt_every": 1, "threads": 1, "step_sleep": 0,
}
POSITIVE = ("search_epochs", "retrain_epochs", "lr_weights", "lr_fixed", "lr_logits", "retrain_lr", "beta", "clip")
NON_EMPTY = ("task", "space", "device")
FLOAT32_MAX = 3.4028234663852886e38   # rates and sizes become float32 tensors and optimizer settings
_ACCEPTS = {int: (int,), float: (int, float), bool: (bool,), str: (str,), type(None): (type(None),)}


def _types(hint) -> tuple:
    """Python types a value of annotation `hint` may have (an int is a float; a bool is not an int)."""
    return tuple(t for arg in (typing.get_args(hint) or (hint,)) for t in _ACCEPTS[arg])


def check(cfg: Config) -> None:
    hints = typing.get_type_hints(Config)
    for f in fields(cfg):
        value, kinds = getattr(cfg, f.name), _types(hints[f.name])
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(dict.fromkeys("None" if t is type(None) else t.__name__ for t in kinds))
            raise SearchError(f"{f.name}={value!r} ({type(value).__name__}) must be {names}")
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise SearchError(f"{f.name}={value!r} must be a finite number that float32 holds (below 3.4e38)")
    for name, (allowed, say) in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise SearchError(f"{name}={getattr(cfg, name)!r}: use {say}")
    for name, low in AT_LEAST.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise SearchError(f"{name}={value!r} must be at least {low}")
    for name in POSITIVE:
        if getattr(cfg, name) <= 0:
            raise SearchError(f"{name}={getattr(cfg, name)!r} must be positive")
    for name in NON_EMPTY:
        if not getattr(cfg, name).strip():
            raise SearchError(f"{name} is empty; see --help for what it takes")
    parse_budget(cfg.budget, 10 ** 15)     # a malformed or non-positive budget fails before any loading
    from .cuge import check as check_cuge
    check_cuge(cfg)                         # a cuge: task's dataset and --data-dir (nothing is read)

