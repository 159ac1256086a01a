"""Backbones the search can load. A loader takes (path, words, seed, device) and returns a `Backbone`,
or None when the path is not its kind; the first loader that answers wins. `words` are the task's
label words, one per class (a classifier only needs how many; a language model reads them).

Built in: a native CPM-Ant folder or checkpoint (search/cpm.py: the task read through the LM head,
verbaliser style) and a Hugging Face folder (config.json + weights + tokenizer) loaded as a
sequence classifier with a new head. Other models: `register_backbone(loader)`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import SearchError


@dataclass
class Backbone:
    """A sequence classifier: Hugging Face by default; other kinds override encode/pad_id/logits."""
    model: torch.nn.Module
    tokenizer: object
    prefix: str = ""                 # text prefix the model expects (e5: "query: ")
    fixed: str | None = "full@head"  # always-on deltas (a new task head), outside the budget
    device: torch.device = torch.device("cpu")   # where the model is; batches are built on the CPU

    def encode(self, texts: list[str], max_length: int) -> list[list[int]]:
        return self.tokenizer([self.prefix + t for t in texts], truncation=True, max_length=max_length)["input_ids"]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def logits(self, batch: dict) -> torch.Tensor:
        """(batch, classes) scores of a batch from `data.Encoded.batch`."""
        return self.model(**{k: v.to(self.device) for k, v in batch.items() if k != "labels"}).logits

    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss


LOADERS: list[Callable] = []


def register_backbone(loader: Callable) -> Callable:
    """Put a loader first in line: loader(path, words, seed, device) -> Backbone | None."""
    LOADERS.insert(0, loader)
    return loader


def _hf_folder(path, words, seed, device):
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(seed)   # the new classification head is drawn from torch's RNG
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(words))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot load a sequence classifier and tokenizer from {str(path)!r}: {e}") from None
    prefix = "query: " if "e5" in path.name.lower() else ""
    return Backbone(model, tokenizer, prefix)


def _native_cpmant(path, words, seed, device):
    from .cpm import load_cpmant_backbone   # only touches deltakit's CPM-Ant code when asked
    return load_cpmant_backbone(path, words, seed, device)


LOADERS.extend([_native_cpmant, _hf_folder])


def resolve_device(name: str) -> torch.device:
    """'auto': the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SearchError(f"device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SearchError(f"device {name!r}: this torch sees no GPU; use --device cpu")
    return device


def load_backbone(path, words, seed: int, device: str = "cpu") -> Backbone:
    """`words`: the label words (or a class count, for classifiers that need nothing more)."""
    if path is None:
        from deltakit.assets import e5_small_path
        path = e5_small_path()
    words = [str(i) for i in range(words)] if isinstance(words, int) else list(words)
    dev = resolve_device(device)
    for loader in LOADERS:
        backbone = loader(path, words, seed, dev)
        if backbone is not None:
            backbone.device = dev
            backbone.model.to(dev).train()
            return backbone
    raise SearchError(f"--model {str(path)!r} is neither a Hugging Face model folder (config.json, weights, "
                      "tokenizer) nor a native CPM-Ant folder/checkpoint (a CPM-Live config JSON, vocab and .pt)")
