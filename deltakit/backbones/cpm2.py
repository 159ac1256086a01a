"""CPM-2 (11B encoder-decoder, TsinghuaAI) from its Megatron model-parallel checkpoint into transformers' MT5.

Architecture facts, all from TsinghuaAI/CPM-2-Finetune `mpu/transformer_enc_dec.py` and
`model/enc_dec_modeling.py` (the same files exist in CPM-2-Pretrain `src/`):
  * T5 v1.1 blocks: pre-norm RMSNorm without bias (eps 1e-6), gated FFN `gelu(wi_0 x) * wi_1 x` with the
    tanh GELU (= transformers' "gelu_new"), no biases anywhere, dropout 0 (enc_dec_xlarge_config.json says
    feed_forward_proj "relu", but the code always uses the gated GELU).
  * Attention scores are NOT divided by sqrt(d_kv) ("We follow the implementation of Transformers to remove
    the scale"), exactly like transformers' T5/MT5 (`self.scaling = 1.0`).
  * T5 relative position bias in block 0 of each stack only, 32 buckets, max distance 128 (the default of
    `_relative_position_bucket`), bidirectional in the encoder, causal in the decoder; none in cross attention.
  * `word_embeds` is shared by encoder and decoder and NOT scaled; `lm_head` is a separate (untied)
    embedding and logits = final_layernorm(h) @ lm_head.T with NO d_model**-0.5 factor.
Checkpoint keys and how they are split over the 4 model-parallel ranks (CPM-2-Pretrain `init_ckpt.py`,
which re-shards the released checkpoint, and `mpu/layers.py`): `...self_attn.project.weight` fused qkv,
column-parallel with stride 3 (rank r holds [q_r; k_r; v_r]); `cross_attn.project_q` column;
`cross_attn.project_kv` column with stride 2; `wi_0`, `wi_1`, `word_embeds`, `lm_head` along dim 0;
`dense` (attention output), `wo` along dim 1; `relative_attention_bias` is an nn.Embedding(buckets,
heads_per_partition), so it is split along dim 1 (the heads), not replicated; layer norms replicated.
`ParallelTransformer` also registers the shared embedding as `encoder.word_embeds` / `decoder.word_embeds`,
so those duplicate keys appear in the state dict; they must equal `word_embeds` and are dropped.

What transformers cannot say: transformers 5 forces `tie_word_embeddings=True` in MT5Config/T5Config, so
MT5ForConditionalGeneration always ties lm_head to the input embedding. `CPM2ForConditionalGeneration` is
MT5ForConditionalGeneration with lm_head left out of `_tied_weights_keys` - the one-line fix; MT5's forward
never rescales the decoder output, which is what CPM-2 does. Reload a saved model with this class (or
`load_cpm2`), not with AutoModel/MT5ForConditionalGeneration, which would tie lm_head again.
Assumption: pad/eos/decoder-start ids keep MT5's defaults (0/1/0); set them from the CPM-2 vocab you use.
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch

from ..errors import CheckpointError
from . import megatron as mg

VOCAB = {"zh": 26240, "bilingual": 51967}   # bpe_cn/vocab.txt and bpe_cn_en/vocab.txt (CPM-2 READMEs)
SHAPE_11B = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24)
COMMON = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              dropout_rate=0.0, layer_norm_epsilon=1e-6)
TINY = dict(vocab_size=96, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2)

# How each key is split over model-parallel ranks (suffix regex -> Split), from init_ckpt.py / mpu.
MERGE_RULES = [
    (r"word_embeds\.weight", mg.VOCAB),
    (r"lm_head\.weight", mg.VOCAB),
    (r"self_attn\.project\.weight", mg.Split(0, stride=3)),
    (r"project_q\.weight", mg.COLUMN),
    (r"project_kv\.weight", mg.Split(0, stride=2)),
    (r"wi_[01]\.weight", mg.COLUMN),
    (r"(self_attn|cross_attn)\.dense\.weight", mg.ROW),
    (r"wo\.weight", mg.ROW),
    (r"relative_attention_bias\.weight", mg.Split(1)),
    (r"(layer_norm|final_layernorm)\.weight", mg.REPLICATED),
]

# Megatron key regex -> transformers key template(s); several templates = split dim 0 into that many parts.
# {s} = stack, {i} = block, {f} = index of the FFN sub-layer (1 in the encoder, 2 in the decoder).
_B = r"(?P<s>encoder|decoder)\.blocks\.(?P<i>\d+)\."
_HF = "{s}.block.{i}.layer."
KEY_MAP = [
    (r"word_embeds\.weight", ["shared.weight"]),
    (r"lm_head\.weight", ["lm_head.weight"]),
    (r"(?P<s>encoder|decoder)\.word_embeds\.weight", []),          # alias of word_embeds, checked then dropped
    (r"(?P<s>encoder|decoder)\.final_layernorm\.weight", ["{s}.final_layer_norm.weight"]),
    (_B + r"self_attn\.layer_norm\.weight", [_HF + "0.layer_norm.weight"]),
    (_B + r"self_attn\.self_attn\.project\.weight", [_HF + f"0.SelfAttention.{p}.weight" for p in "qkv"]),
    (_B + r"self_attn\.self_attn\.dense\.weight", [_HF + "0.SelfAttention.o.weight"]),
    (_B + r"self_attn\.self_attn\.relative_attention_bias\.weight",
     [_HF + "0.SelfAttention.relative_attention_bias.weight"]),
    (_B + r"cross_attn\.layer_norm\.weight", [_HF + "1.layer_norm.weight"]),
    (_B + r"cross_attn\.cross_attn\.project_q\.weight", [_HF + "1.EncDecAttention.q.weight"]),
    (_B + r"cross_attn\.cross_attn\.project_kv\.weight", [_HF + f"1.EncDecAttention.{p}.weight" for p in "kv"]),
    (_B + r"cross_attn\.cross_attn\.dense\.weight", [_HF + "1.EncDecAttention.o.weight"]),
    (_B + r"ff\.layer_norm\.weight", [_HF + "{f}.layer_norm.weight"]),
    (_B + r"ff\.dense_relu_dense\.(?P<w>wi_0|wi_1|wo)\.weight", [_HF + "{f}.DenseReluDense.{w}.weight"]),
]
_FFN_LAYER = {"encoder": 1, "decoder": 2}


@lru_cache(maxsize=None)
def _classes():
    from transformers import MT5Config, MT5ForConditionalGeneration

    class CPM2ForConditionalGeneration(MT5ForConditionalGeneration):
        """MT5 with an untied lm_head (transformers 5 always ties it; CPM-2 does not)."""
        _tied_weights_keys = {"encoder.embed_tokens.weight": "shared.weight",
                              "decoder.embed_tokens.weight": "shared.weight"}

    CPM2ForConditionalGeneration.__module__ = __name__
    return MT5Config, CPM2ForConditionalGeneration


def config_11b(vocab: str | int = "zh", **overrides):
    """MT5Config of CPM-2 11B; vocab "zh" (26240), "bilingual" (51967) or a number."""
    vocab_size = VOCAB[vocab] if isinstance(vocab, str) else vocab
    return _classes()[0](**{**SHAPE_11B, **COMMON, "vocab_size": vocab_size, **overrides})


def tiny_config(**overrides):
    """A CPM-2-shaped config small enough for tests (d_model 32, 2+2 layers, 4 heads)."""
    return _classes()[0](**{**COMMON, **TINY, "relative_attention_num_buckets": 8, **overrides})


def model_class():
    return _classes()[1]


def build(cfg, device="meta"):
    """CPM2ForConditionalGeneration with parameters on `device` (meta: no memory is allocated)."""
    with torch.device(device):
        return model_class()(cfg)


def convert_state_dict(megatron_sd: dict, config=None) -> dict:
    """Merged CPM-2 Megatron keys -> transformers MT5 keys (fused q/k/v and k/v projections are split)."""
    out = {}
    for key, t in megatron_sd.items():
        for pattern, templates in KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                break
        else:
            raise CheckpointError(f"unexpected CPM-2 tensor {key!r}: not part of the CPM-2 architecture "
                                  "(prompt embeddings or MoE experts are not supported)")
        if not templates:   # encoder./decoder.word_embeds: the shared embedding registered twice
            if "word_embeds.weight" in megatron_sd and not torch.equal(t, megatron_sd["word_embeds.weight"]):
                raise CheckpointError(f"{key!r} differs from 'word_embeds.weight'; CPM-2 shares one embedding")
            continue
        fields = {**m.groupdict(), "f": _FFN_LAYER.get(m.groupdict().get("s"))}
        if t.shape[0] % len(templates):
            raise CheckpointError(f"{key!r} of shape {tuple(t.shape)} cannot be split into {len(templates)} parts")
        for template, part in zip(templates, t.chunk(len(templates), 0)):
            out[template.format(**fields)] = part.contiguous()
    return out   # shapes are checked against the config by megatron.materialize when the model is filled


def load_cpm2(path, config=None, dtype: torch.dtype = torch.float32):
    """Load a CPM-2 Megatron checkpoint folder as CPM2ForConditionalGeneration (an MT5 model).

    `config` defaults to the 11B shape with the vocabulary size read from the checkpoint.
    """
    merged = mg.load_merged(path, MERGE_RULES, dtype)
    if config is None:
        rows = merged.get("word_embeds.weight")
        if rows is None:
            raise CheckpointError(f"{path} holds no 'word_embeds.weight': it is not a CPM-2 checkpoint")
        config = config_11b(rows.shape[0])
    model = build(config, "meta")
    return mg.materialize(model, convert_state_dict(merged, config), f"CPM-2 checkpoint {path}")
