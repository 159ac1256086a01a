"""What every recipe shares: the hyper-parameter row, the dtype rule, and how rows become text.

A recipe is an object with `model`, `default_delta`, `hparams(dataset)`, `loss(rows) -> scalar tensor`
and `predict(rows) -> list` (one prediction per row, in the form benchmarks/cuge/data.py gives for
the rows' kind). `rows` are canonical examples (dicts); `kind` is the registry's `kind_of(split)`,
since Sogou-Log trains on choice rows and predicts rank rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import CugeError

GENERATIVE = ("generate", "math", "tag")   # what a language model predicts by decoding text


@dataclass(frozen=True)
class HParams:
    """A recipe's defaults for one dataset; `run` overrides them from its command line."""
    batch_size: int = 16
    lr: float = 1e-3
    epochs: float = 10
    patience: int | None = 10     # evaluations without a better dev score before stopping
    eval_every: int = 50          # steps between dev evaluations
    max_len: int = 512            # tokens the model reads (CPM-Ant: the 32 prompt positions included)
    max_new: int | None = None    # generated tokens; None: the registry's max_target_len
    warmup: int = 50
    schedule: str = "noam"        # noam (CPM-Live), constant (CPM-2-Finetune), linear
    clip: float = 1.0
    weight_decay: float = 0.01

    def but(self, **changes) -> "HParams":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def weights_dtype(device) -> torch.dtype:
    """bf16 on a GPU (as CPM-Live and CPM-2 run in half precision), fp32 on a CPU, where bf16 is slow.
    Deltas are float32 either way (deltakit.attach)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def target_text(row: dict, kind: str) -> str:
    """What a language model learns to write for a row: the target (tag rows: the segmented line)."""
    if kind not in GENERATIVE:
        raise CugeError(f"{kind!r} rows have no text target")
    return row.get("target", "") or ""


def max_new_tokens(dataset, hp: HParams, rows, kind: str) -> int:
    """Generation length: the recipe's, else the registry's; segmentation writes the sentence again
    with spaces (and /POS), so it gets room for that."""
    if hp.max_new:
        return hp.max_new
    if kind == "tag":
        return 4 * max(len(r["input"]) for r in rows) + 8
    return dataset.max_target_len or 64


def check_kind(kind: str, supported, recipe: str):
    if kind not in supported:
        raise CugeError(f"the {recipe} recipe cannot take {kind!r} rows (it takes {', '.join(supported)}); "
                        f"use a backbone whose recipe does (see benchmarks/cuge/recipes/__init__.py)")


def pad(rows: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of right- (or left-) padded id lists."""
    width = max(map(len, rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            sl = slice(width - len(r), width) if left else slice(0, len(r))
            ids[b, sl] = torch.tensor(r, dtype=torch.long)
            mask[b, sl] = 1
    return ids, mask


def options_of(rows) -> tuple[list[tuple[int, int]], int]:
    """(row, option) pairs in order and the largest option count; a row without options is an error."""
    pairs = [(b, k) for b, r in enumerate(rows) for k in range(len(r["options"]))]
    empty = [r["id"] for r in rows if not r["options"]]
    if empty:
        raise CugeError(f"rows {empty[:3]} have no options to choose from")
    return pairs, max(len(r["options"]) for r in rows)


def scatter_options(scores: torch.Tensor, pairs, rows, width: int) -> torch.Tensor:
    """Flat per-(row, option) scores -> (rows, width), -inf where a row has fewer options."""
    out = torch.full((len(rows), width), float("-inf"), dtype=scores.dtype, device=scores.device)
    b = torch.tensor([p[0] for p in pairs], device=scores.device)
    k = torch.tensor([p[1] for p in pairs], device=scores.device)
    out[b, k] = scores
    return out


def choice_loss(scores: torch.Tensor, rows) -> torch.Tensor:
    labels = torch.tensor([r["label"] for r in rows], device=scores.device)
    bad = [r["id"] for r in rows if not 0 <= r["label"] < len(r["options"])]
    if bad:
        raise CugeError(f"rows {bad[:3]} have no valid label to train on (label -1 is a test row)")
    return torch.nn.functional.cross_entropy(scores.float(), labels)


def rank_loss(scores: torch.Tensor, rows) -> torch.Tensor:
    """The dev loss of rank rows: cross-entropy of the options' scores against the most relevant one
    (training reads (positive, negative) pairs; a ranked list has no single label)."""
    bad = [r["id"] for r in rows if len(r["relevance"]) != len(r["options"])]
    if bad:
        raise CugeError(f"rank rows {bad[:3]} have no relevance for each candidate (a test split?)")
    labels = torch.tensor([max(range(len(r["relevance"])), key=r["relevance"].__getitem__) for r in rows],
                          device=scores.device)
    return torch.nn.functional.cross_entropy(scores.float(), labels)
