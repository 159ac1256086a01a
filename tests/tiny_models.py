"""Tiny random models of every family deltakit knows, built offline (no hub, no weights).

`make(family, **overrides)` builds a seeded fp32 model in eval mode (hidden 32, 2 layers);
calling it twice with the same arguments gives bit-identical weights. `inputs(family, model)`
gives a matching batch (decoder inputs too for T5/MT5); `run(model, batch)` returns the main
output tensor (logits). `config(family, **overrides)` gives the config alone.
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

FAMILIES = ("bert", "xlmr", "gpt2", "t5", "mt5", "llama", "cpmant")
HIDDEN, LAYERS, VOCAB = 32, 2, 96
SEED = 1234


def _config_kwargs(family: str) -> dict:
    if family in ("bert", "xlmr"):
        kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
        if family == "bert":
            return {**kw, "type_vocab_size": 2}
        return {**kw, "type_vocab_size": 1, "num_labels": 3, "pad_token_id": 1}
    if family == "gpt2":
        return dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    if family in ("t5", "mt5"):   # T5 v1.0: relu FFN with one `wi`; MT5: gated-gelu with wi_0 / wi_1
        return dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
                    num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                    feed_forward_proj="relu" if family == "t5" else "gated-gelu", decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1)
    if family == "llama":   # GQA: 4 query heads share 2 key/value heads
        return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
                    bos_token_id=0, eos_token_id=0)
    if family == "cpmant":   # the embedding holds vocab + prompt_types * prompt_length rows; 3 prompt types are used
        return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, dim_head=8, dim_ff=64,
                    num_hidden_layers=LAYERS, dropout_p=0.0, position_bias_num_buckets=32,
                    position_bias_max_distance=64, prompt_types=4, prompt_length=4, segment_types=4)
    raise ValueError(f"unknown tiny family {family!r}; have {FAMILIES}")


def config(family: str, **overrides):
    import transformers as tf
    cls = {"bert": tf.BertConfig, "xlmr": tf.XLMRobertaConfig, "gpt2": tf.GPT2Config, "t5": tf.T5Config,
           "mt5": tf.MT5Config, "llama": tf.LlamaConfig, "cpmant": tf.CpmAntConfig}[family]
    return cls(**{**_config_kwargs(family), **overrides})


def model_class(family: str):
    import transformers as tf
    return {"bert": tf.BertForMaskedLM, "xlmr": tf.XLMRobertaForSequenceClassification, "gpt2": tf.GPT2LMHeadModel,
            "t5": tf.T5ForConditionalGeneration, "mt5": tf.MT5ForConditionalGeneration,
            "llama": tf.LlamaForCausalLM, "cpmant": tf.CpmAntForCausalLM}[family]


def _randomise(model, seed):
    """Random weights everywhere (norm weights too, so bias/norm deltas are not hidden by ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(remove_duplicate=True)):
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def build(family: str, seed: int = SEED, **overrides):
    """Construct and randomise a tiny model from scratch (fp32, eval mode)."""
    torch.manual_seed(seed)
    model = model_class(family)(config(family, **overrides))
    _randomise(model, seed)
    return model.eval()


_PRISTINE: dict = {}


def make(family: str, seed: int = SEED, dtype=torch.float32, train: bool = False, fresh: bool = False, **overrides):
    """A tiny random model of `family`, deterministic in `seed` and the config overrides.

    Models are built once and deep-copied (tied weights stay tied), which keeps the suite fast;
    fresh=True constructs a new one from the seed instead (for save/load into a fresh model).
    """
    if fresh:
        model = build(family, seed, **overrides)
    else:
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in _PRISTINE:
            _PRISTINE[key] = build(family, seed, **overrides)
        model = copy.deepcopy(_PRISTINE[key])
    return model.to(dtype).train(train)


def inputs(family: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """A batch for `family`: token ids (and a mask with a padded row), decoder ids for T5/MT5."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    if family in ("t5", "mt5"):
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, VOCAB, (batch, 5), generator=g)}
    if family == "cpmant":   # CpmAnt builds its own mask and prompt positions from the ids
        return {"input_ids": ids}
    mask = torch.ones_like(ids)
    mask[-1, -2:] = 0   # the last row is padded
    return {"input_ids": ids, "attention_mask": mask}


def run(model, batch: dict) -> torch.Tensor:
    """The model's main output: logits, or the last hidden state of a bare encoder."""
    out = model(**batch, use_cache=False) if _takes_cache(model) else model(**batch)
    if isinstance(out, tuple):
        return out[0]
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _takes_cache(model) -> bool:
    return type(model).__name__ in ("GPT2LMHeadModel", "T5ForConditionalGeneration", "MT5ForConditionalGeneration",
                                    "LlamaForCausalLM", "CpmAntForCausalLM")
