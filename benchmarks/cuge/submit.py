"""Submission files per CUGE dataset, in the format the dataset's own evaluation reads where it is
known, else JSONL of {"id", "prediction"}; each writer's assumptions are written next to it."""
from __future__ import annotations

from pathlib import Path

from .errors import CugeError
from .registry import get


def write(dataset_name: str, examples, predictions, out_dir) -> Path:
    """Write the submission file of `dataset_name` for `examples` (the canonical rows of the test
    split, with their `meta`) and `predictions` (one per row, as data.py says) into `out_dir`,
    atomically; returns its path."""
    raise NotImplementedError
