"""Position maps: one data table per backbone family, from raw module names to canonical names.

A family has
  * `stacks`: stack name ("" when the model has one stack) -> regex of the layer list, whose
    next path segment is the layer index;
  * `layer`: canonical local name -> module path relative to one layer. A value may be
      - a string,
      - a tuple of strings (the first that exists in that layer wins; T5's FFN moves from
        `layer.1` in the encoder to `layer.2` in the decoder),
      - `Slice(path, i, n)`: part i of n equal output parts of a fused projection (GPT-2 c_attn),
      - `Sub(module, inp, out)`: a sub-block: `module` is what prefix deltas talk to, `inp` names
        the projection whose input is the sub-block input, `out` the projection whose output is
        the sub-block's residual branch (where sequential adapters go);
    `layer` may instead be a dict keyed by stack when stacks differ (T5 decoder has cross attention);
  * `top`: canonical name -> model-level path suffix (tuple = alternatives).
The first family whose layer regex matches the model is used; CPM-Ant's native model (CPM-Live
key names) and transformers' CpmAnt share one table because the suffixes are the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Slice:
    path: str
    index: int
    parts: int


@dataclass(frozen=True)
class Sub:
    module: str | None
    inp: str
    out: str


@dataclass(frozen=True)
class Family:
    name: str
    stacks: dict
    layer: dict
    top: dict = field(default_factory=dict)

    def layer_table(self, stack: str) -> dict:
        per_stack = stack in self.layer and isinstance(self.layer[stack], dict)
        return self.layer[stack] if per_stack else self.layer


BERT = Family(
    "bert",  # also RoBERTa, XLM-R, ELECTRA, CamemBERT...: same module names
    stacks={"": r"encoder\.layer"},
    layer={
        "attn": Sub("attention.self", "attn.q", "attn.o"),
        "attn.q": "attention.self.query",
        "attn.k": "attention.self.key",
        "attn.v": "attention.self.value",
        "attn.o": "attention.output.dense",
        "ln.attn": "attention.output.LayerNorm",
        "ffn": Sub(None, "ffn.in", "ffn.out"),
        "ffn.in": "intermediate.dense",
        "ffn.out": "output.dense",
        "ln.ffn": "output.LayerNorm",
    },
    top={"embed": "embeddings.word_embeddings", "ln.embed": "embeddings.LayerNorm",
         "head": ("classifier", "qa_outputs", "lm_head", "cls")},
)

GPT2 = Family(
    "gpt2",
    stacks={"": r"h"},
    layer={
        "attn": Sub("attn", "attn.q", "attn.o"),
        "attn.q": Slice("attn.c_attn", 0, 3),
        "attn.k": Slice("attn.c_attn", 1, 3),
        "attn.v": Slice("attn.c_attn", 2, 3),
        "attn.o": "attn.c_proj",
        "ln.attn": "ln_1",
        "ffn": Sub("mlp", "ffn.in", "ffn.out"),
        "ffn.in": "mlp.c_fc",
        "ffn.out": "mlp.c_proj",
        "ln.ffn": "ln_2",
    },
    top={"embed": "wte", "ln.final": "ln_f", "head": ("lm_head", "score")},
)

_T5_ENC = {
    "attn": Sub("layer.0.SelfAttention", "attn.q", "attn.o"),
    "attn.q": "layer.0.SelfAttention.q",
    "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o",
    "ln.attn": "layer.0.layer_norm",
    "ffn": Sub("layer.1.DenseReluDense", "ffn.in", "ffn.out"),
    "ffn.gate": "layer.1.DenseReluDense.wi_0",          # gated FFN (T5 v1.1, MT5, CPM-2)
    "ffn.in": ("layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wi_1"),
    "ffn.out": "layer.1.DenseReluDense.wo",
    "ln.ffn": "layer.1.layer_norm",
}
_T5_DEC = {
    **{k: v for k, v in _T5_ENC.items() if not k.startswith(("ffn", "ln.ffn"))},
    "cross": Sub("layer.1.EncDecAttention", "cross.q", "cross.o"),
    "cross.q": "layer.1.EncDecAttention.q",
    "cross.k": "layer.1.EncDecAttention.k",
    "cross.v": "layer.1.EncDecAttention.v",
    "cross.o": "layer.1.EncDecAttention.o",
    "ln.cross": "layer.1.layer_norm",
    "ffn": Sub("layer.2.DenseReluDense", "ffn.in", "ffn.out"),
    "ffn.gate": "layer.2.DenseReluDense.wi_0",
    "ffn.in": ("layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wi_1"),
    "ffn.out": "layer.2.DenseReluDense.wo",
    "ln.ffn": "layer.2.layer_norm",
}
T5 = Family(
    "t5",  # T5, MT5, and CPM-2 in transformers' MT5 classes
    stacks={"encoder": r"encoder\.block", "decoder": r"decoder\.block"},
    layer={"encoder": _T5_ENC, "decoder": _T5_DEC},
    top={"embed": "shared", "encoder.ln.final": "encoder.final_layer_norm",
         "decoder.ln.final": "decoder.final_layer_norm", "head": "lm_head"},
)

LLAMA = Family(
    "llama",  # LLaMA, Mistral, Qwen2/3, Gemma...: the same module names
    stacks={"": r"layers"},
    layer={
        "attn": Sub("self_attn", "attn.q", "attn.o"),
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.o": "self_attn.o_proj",
        "ln.attn": "input_layernorm",
        "ffn": Sub("mlp", "ffn.in", "ffn.out"),
        "ffn.gate": "mlp.gate_proj",
        "ffn.in": "mlp.up_proj",
        "ffn.out": "mlp.down_proj",
        "ln.ffn": "post_attention_layernorm",
    },
    top={"embed": "embed_tokens", "ln.final": "norm", "head": ("lm_head", "score")},
)

CPMANT = Family(
    "cpmant",  # CPM-Live's CPM-Ant keys; transformers' CpmAnt adds a `cpmant.` prefix
    stacks={"": r"encoder\.layers"},
    layer={
        "attn": Sub("self_att.self_attention", "attn.q", "attn.o"),
        "attn.q": "self_att.self_attention.project_q",
        "attn.k": "self_att.self_attention.project_k",
        "attn.v": "self_att.self_attention.project_v",
        "attn.o": "self_att.self_attention.attention_out",
        "ln.attn": "self_att.layernorm_before_attention",
        "ffn": Sub("ffn.ffn", "ffn.in", "ffn.out"),
        "ffn.gate": "ffn.ffn.w_in.w_0",
        "ffn.in": "ffn.ffn.w_in.w_1",
        "ffn.out": "ffn.ffn.w_out",
        "ln.ffn": "ffn.layernorm_before_ffn",
    },
    top={"embed": "input_embedding", "prompt": "prompt_embedding",   # prompt rows: native model only
         "ln.final": "encoder.output_layernorm", "head": "lm_head"},
)

FAMILIES = [CPMANT, T5, LLAMA, GPT2, BERT]
