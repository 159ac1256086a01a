"""Convert CPM-Ant between CPM-Live's layout (our native model) and transformers' `CpmAntForCausalLM`.

The keys nearly match (transformers adds `cpmant.`), the values do not: transformers uses plain
nn.Linear/nn.Embedding, so the 1/sqrt(d) factors of CPM-Live's parameterisation move into the weights:
    W_hf = W_live / sqrt(fan_in)              every projection
    input_embedding_hf = [E_live; P_live] / sqrt(d)   vocab rows first, then the prompt rows
    segment_embedding_hf = S_live / sqrt(d);  lm_head = E_live / sqrt(d)   (untied copy)
Norm weights and the relative position bias are copied. Both directions are exact up to rounding
(checked against transformers' logits in tests/test_cpmant.py).
"""
from __future__ import annotations

import math

import torch

from ..errors import CheckpointError, DeltakitError
from .cpmant import CPMAnt, CPMAntConfig, build

# native config field -> transformers CpmAntConfig field (the others have the same name)
_RENAMED = {"dim_model": "hidden_size", "num_heads": "num_attention_heads", "num_layers": "num_hidden_layers"}
_PROJECTIONS = ("project_q", "project_k", "project_v", "attention_out", "w_0", "w_1", "w_out")


def to_hf_config(cfg: CPMAntConfig):
    from transformers import CpmAntConfig
    if cfg.mask_modules is not None and any(any(m) for m in cfg.mask_modules):
        raise DeltakitError("transformers' CpmAnt has no layers without attention or FFN: a compressed CPM-Ant "
                            "(mask_modules) cannot be converted; use the native model")
    fields = {k: v for k, v in cfg.__dict__.items() if k != "mask_modules"}
    return CpmAntConfig(**{_RENAMED.get(k, k): v for k, v in fields.items()})


def from_hf_config(hf) -> CPMAntConfig:
    names = [f for f in CPMAntConfig.__dataclass_fields__ if f != "mask_modules"]
    return CPMAntConfig(**{n: getattr(hf, _RENAMED.get(n, n)) for n in names})


def _fan_in(key: str, tensor) -> float | None:
    """sqrt(fan_in) for a projection weight, None for anything else."""
    parts = key.split(".")
    return math.sqrt(tensor.shape[1]) if len(parts) > 1 and parts[-2] in _PROJECTIONS else None


def to_hf_state_dict(state_dict: dict, cfg: CPMAntConfig) -> dict:
    """CPM-Live keys and values -> transformers CpmAntForCausalLM keys and values."""
    root = math.sqrt(cfg.dim_model)
    out = {}
    for key, t in state_dict.items():
        if key in ("input_embedding.weight", "prompt_embedding.weight"):
            continue
        scale = _fan_in(key, t)
        if key == "segment_embedding.weight":
            scale = root
        out["cpmant." + key] = t / scale if scale else t.clone()
    vocab, prompt = state_dict["input_embedding.weight"], state_dict["prompt_embedding.weight"]
    out["cpmant.input_embedding.weight"] = torch.cat([vocab, prompt]) / root
    out["lm_head.weight"] = vocab / root
    return out


def from_hf_state_dict(state_dict: dict, cfg: CPMAntConfig, check_head: bool = True) -> dict:
    """transformers CpmAntForCausalLM keys and values -> CPM-Live keys and values. CPM-Ant ties its
    output layer to the vocabulary rows; a `lm_head` that differs from them cannot be represented."""
    root = math.sqrt(cfg.dim_model)
    out = {}
    for key, t in state_dict.items():
        if not key.startswith("cpmant."):
            continue
        key = key[len("cpmant."):]
        scale = _fan_in(key, t)
        if key == "segment_embedding.weight":
            scale = root
        out[key] = t * scale if scale else t.clone()
    rows = out.pop("input_embedding.weight")   # still in transformers' scale: E / sqrt(d)
    if rows.shape[0] != cfg.vocab_size + cfg.prompt_types * cfg.prompt_length:
        raise CheckpointError(f"transformers input_embedding has {rows.shape[0]} rows, expected vocab "
                              f"{cfg.vocab_size} + {cfg.prompt_types}x{cfg.prompt_length} prompt rows")
    out["input_embedding.weight"], out["prompt_embedding.weight"] = (rows * root).split(
        [cfg.vocab_size, rows.shape[0] - cfg.vocab_size])
    head = state_dict.get("lm_head.weight")
    if check_head and head is not None and not torch.allclose(head, rows[:cfg.vocab_size], rtol=1e-3, atol=1e-6):
        raise CheckpointError("lm_head.weight is not the vocabulary embedding / sqrt(d): CPM-Ant ties them, so this "
                              "model cannot be converted exactly (pass check_head=False to drop the head)")
    return out


def to_transformers(model: CPMAnt):
    """The native model as a transformers CpmAntForCausalLM with the same weights (a copy)."""
    from transformers import CpmAntForCausalLM
    hf = CpmAntForCausalLM(to_hf_config(model.config))
    param = next(model.parameters())
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=True)
    return hf.to(param.dtype).eval()


def from_transformers(hf_model) -> CPMAnt:
    """A transformers CpmAntForCausalLM as the native model (a copy, same dtype)."""
    cfg = from_hf_config(hf_model.config)
    dtype = next(hf_model.parameters()).dtype
    model = build(cfg, dtype=dtype, device="meta")
    sd = from_hf_state_dict(hf_model.state_dict(), cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()
