"""How each kind of backbone is tuned on CUGE: one module per kind, and the table below.

    recipe = recipes.load("cpm-ant-10b.pt", dataset, train_rows, device="cuda")
    recipe.model, recipe.default_delta, recipe.hparams(dataset)
    recipe.loss(rows, kind), recipe.predict(rows, kind)      # kind = dataset.kind_of(split)

| kind | `--model` | module | rows it takes |
|---|---|---|---|
| cpm-ant | native CPM-Ant: .pt/.bin/.safetensors (or its folder) + config JSON + ant.txt | cpmant | choice, rank, generate, math, tag |
| cpm-2 | CPM-2 Megatron folder (latest_checkpointed_iteration.txt, shards) + vocab.txt | cpm2 | choice, rank, generate, math, tag |
| hf-causal | Hugging Face folder of a causal LM (GPT-2, LLaMA, ...) | hf_lm | choice, rank, generate, math, tag |
| hf-seq2seq | Hugging Face folder of an encoder-decoder (T5, mT5, ...) | hf_lm | choice, rank, generate, math, tag |
| encoder | Hugging Face folder of an encoder (BERT, XLM-R, e5, ...) | encoder | choice, rank, tag |

Each module says, with file paths, which original recipe it follows (CPM-Live's cpm-ant examples,
CPM-2-Finetune's data code). Heavy imports happen when a recipe is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CugeError
from .common import GENERATIVE, HParams

KINDS = ("cpm-ant", "cpm-2", "hf-causal", "hf-seq2seq", "encoder")
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


def detect(path) -> str:
    """The backbone kind of a --model path, from the files there (nothing is loaded)."""
    from . import cpm2, cpmant
    path = Path(path)
    if not path.exists():
        raise CugeError(f"--model {path} does not exist")
    if cpmant.files(path) is not None:
        return "cpm-ant"
    if cpm2.is_checkpoint(path):
        return "cpm-2"
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        if data.get("is_encoder_decoder"):
            return "hf-seq2seq"
        if any(a.endswith(_CAUSAL_HEADS) for a in data.get("architectures") or ()):
            return "hf-causal"
        return "encoder"
    raise CugeError(f"--model {path} is none of: a native CPM-Ant checkpoint (.pt/.bin/.safetensors with its config "
                    f"JSON and ant.txt), a CPM-2 Megatron folder (latest_checkpointed_iteration.txt or "
                    f"mp_rank_XX_model_states.pt), a Hugging Face folder (config.json)")


def load(path, dataset, train_rows=None, device="cpu", kind: str | None = None, seed: int = 0):
    """The recipe of the backbone at `path` for `dataset` (a registry row); `kind` overrides detection."""
    kind = kind or detect(path)
    if kind not in KINDS:
        raise CugeError(f"unknown recipe {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "encoder" and dataset.kind in GENERATIVE and dataset.kind != "tag":
        raise CugeError(f"{dataset.title} is a generation dataset and {path} an encoder model, which cannot "
                        f"write text: use a causal or seq2seq LM, CPM-Ant or CPM-2")
    if kind == "cpm-ant":
        from . import cpmant
        return cpmant.load(path, device)
    if kind == "cpm-2":
        from . import cpm2
        return cpm2.load(path, device)
    if kind == "encoder":
        from . import encoder
        return encoder.load(path, dataset, train_rows, device, seed)
    from . import hf_lm
    return hf_lm.load(path, device, kind)


__all__ = ["KINDS", "HParams", "detect", "load"]
