"""Backbones the search can load. A loader takes (path, num_labels, seed) and returns a `Backbone`,
or None when the path is not its kind; the first loader that answers wins.

Built in: a Hugging Face folder (config.json + weights + tokenizer) loaded as a sequence
classifier. Extension point: a native CPM-Ant config/checkpoint (deltakit/backbones/cpmant.py)
will register a loader with `register_backbone` that wraps the model in a `Backbone` whose
`loss(batch)` / `logits(batch)` implement the task (e.g. verbaliser logits of the LM head).
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
    model: torch.nn.Module
    tokenizer: object
    prefix: str = ""                 # text prefix the model expects (e5: "query: ")
    fixed: str | None = "full@head"  # always-on deltas (a new task head), outside the budget
    device: torch.device = torch.device("cpu")   # where the model is; batches are built on the CPU

    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**{k: v.to(self.device) for k, v in batch.items()}).loss

    def logits(self, batch: dict) -> torch.Tensor:
        return self.model(**{k: v.to(self.device) for k, v in batch.items() if k != "labels"}).logits


LOADERS: list[Callable] = []


def register_backbone(loader: Callable) -> Callable:
    """Put a loader first in line: loader(path, num_labels, seed) -> Backbone | None."""
    LOADERS.insert(0, loader)
    return loader


def _hf_folder(path, num_labels, seed):
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.manual_seed(seed)   # the new classification head is drawn from torch's RNG
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot load a sequence classifier and tokenizer from {str(path)!r}: {e}") from None
    prefix = "query: " if "e5" in path.name.lower() else ""
    return Backbone(model, tokenizer, prefix)


def _native_cpm(path, num_labels, seed):
    p = Path(path)
    if p.suffix in (".pt", ".bin", ".safetensors") and p.is_file() or p.name.startswith("cpm-ant"):
        raise SearchError(f"{str(path)!r} looks like a native CPM-Ant config/checkpoint; the search does not load "
                          "those yet (deltakit/backbones/cpmant.py will register a loader via "
                          "search.models.register_backbone). Convert it with cpmant_convert.to_transformers "
                          "and save_pretrained, then pass that folder")
    return None


LOADERS.extend([_hf_folder, _native_cpm])


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


def load_backbone(path, num_labels: int, seed: int, device: str = "cpu") -> Backbone:
    if path is None:
        from deltakit.assets import e5_small_path
        path = e5_small_path()
    for loader in LOADERS:
        backbone = loader(path, num_labels, seed)
        if backbone is not None:
            backbone.device = resolve_device(device)
            backbone.model.to(backbone.device).train()
            return backbone
    raise SearchError(f"--model {str(path)!r} is not a Hugging Face model folder (no config.json there)")
