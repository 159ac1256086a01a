"""Tiny random models of every family deltakit knows, built offline (no hub, no weights).

`make(family, **overrides)` builds a seeded fp32 model in eval mode (hidden 32, 2 layers);
calling it twice with the same arguments gives bit-identical weights. `inputs(family, model)`
gives a matching batch (decoder inputs too for encoder-decoders); `run(model, batch)` returns the
main output tensor (logits). `config(family, **overrides)` gives the config alone.
`TOWERS` ("clip", "llava") are models with two towers, made the same way but kept out of
`FAMILIES` (they take pixels, so the text-only tests parametrized over FAMILIES do not fit them).
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

FAMILIES = ("bert", "xlmr", "gpt2", "t5", "mt5", "bart", "mbart", "llama", "cpmant")
ENC_DEC = ("t5", "mt5", "bart", "mbart")
TOWERS = ("clip", "llava")
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
    if family in ("bart", "mbart"):   # mBART: pre-norm layers and a final norm per stack
        return dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=48,
                    max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                    forced_eos_token_id=None)   # a forced last token would hide what a delta does to it
    if family == "clip":
        return dict(text_config=_CLIP_TEXT, vision_config=_VISION, projection_dim=16)
    if family == "llava":   # a CLIP vision tower and a LLaMA language model; id 95 is the image token.
        # Features from the last vision layer: LLaVA's default (-2) leaves the last layer unused.
        return dict(vision_config=_VISION, text_config=_config_kwargs("llama"), image_token_index=VOCAB - 1,
                    projector_hidden_act="gelu", vision_feature_layer=-1)
    if family == "llama":   # GQA: 4 query heads share 2 key/value heads
        return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0,
                    bos_token_id=0, eos_token_id=0)
    if family == "cpmant":   # the embedding holds vocab + prompt_types * prompt_length rows; 3 prompt types are used
        return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, dim_head=8, dim_ff=64,
                    num_hidden_layers=LAYERS, dropout_p=0.0, position_bias_num_buckets=32,
                    position_bias_max_distance=64, prompt_types=4, prompt_length=4, segment_types=4)
    raise ValueError(f"unknown tiny family {family!r}; have {FAMILIES + TOWERS}")


IMAGE, PATCH = 16, 8   # a 16x16 image in 8x8 patches: 4 patch positions (+ CLIP's class position)
_VISION = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
               image_size=IMAGE, patch_size=PATCH, attention_dropout=0.0)
_CLIP_TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
                  num_attention_heads=4, max_position_embeddings=64, attention_dropout=0.0, pad_token_id=1,
                  bos_token_id=0, eos_token_id=2)


def config(family: str, **overrides):
    import transformers as tf
    cls = {"bert": tf.BertConfig, "xlmr": tf.XLMRobertaConfig, "gpt2": tf.GPT2Config, "t5": tf.T5Config,
           "mt5": tf.MT5Config, "bart": tf.BartConfig, "mbart": tf.MBartConfig, "llama": tf.LlamaConfig,
           "cpmant": tf.CpmAntConfig, "clip": tf.CLIPConfig, "llava": tf.LlavaConfig}[family]
    return cls(**{**_config_kwargs(family), **overrides})


def model_class(family: str):
    import transformers as tf
    return {"bert": tf.BertForMaskedLM, "xlmr": tf.XLMRobertaForSequenceClassification, "gpt2": tf.GPT2LMHeadModel,
            "t5": tf.T5ForConditionalGeneration, "mt5": tf.MT5ForConditionalGeneration,
            "bart": tf.BartForConditionalGeneration, "mbart": tf.MBartForConditionalGeneration,
            "llama": tf.LlamaForCausalLM, "cpmant": tf.CpmAntForCausalLM, "clip": tf.CLIPModel,
            "llava": tf.LlavaForConditionalGeneration}[family]


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
    """A batch for `family`: token ids (and a mask with a padded row), decoder ids for encoder-decoders,
    pixels for CLIP and LLaVA (whose ids start with one image token per patch)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    if family in ENC_DEC:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, VOCAB, (batch, 5), generator=g)}
    if family in TOWERS:
        pixels = torch.randn(batch, 3, IMAGE, IMAGE, generator=g)
        if family == "llava":   # the image token only where the patches go
            ids = ids.clamp(max=VOCAB - 2)
            ids[:, :(IMAGE // PATCH) ** 2] = VOCAB - 1
        return {"input_ids": ids, "pixel_values": pixels}
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
    if getattr(out, "image_embeds", None) is not None:   # CLIP: both towers' embeddings
        return torch.cat([out.text_embeds, out.image_embeds])
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _takes_cache(model) -> bool:
    return type(model).__name__ in ("GPT2LMHeadModel", "T5ForConditionalGeneration", "MT5ForConditionalGeneration",
                                    "BartForConditionalGeneration", "MBartForConditionalGeneration",
                                    "LlamaForCausalLM", "CpmAntForCausalLM", "LlavaForConditionalGeneration")
