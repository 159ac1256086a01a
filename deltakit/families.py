"""Position maps: one data table per backbone family, from raw module names to canonical names.

A family has
  * `stacks`: stack name ("" when the model has one stack) -> regex of the layer list (matched
    against the end of its path), whose next path segment is the layer index. Encoder-decoders
    name their stacks `encoder` / `decoder`; models with several towers name each tower
    (`text` / `vision`);
  * `layer`: canonical local name -> module path relative to one layer. A value may be
      - a string,
      - a tuple of strings (the first that exists in that layer wins; T5's FFN moves from
        `layer.1` in the encoder to `layer.2` in the decoder),
      - `Slice(path, i, n)`: part i of n equal output parts of a fused projection (GPT-2 c_attn),
      - `Sub(module, inp, out)`: a sub-block: `module` is what prefix deltas talk to, `inp` names
        the projection whose input is the sub-block input, `out` the projection whose output is
        the sub-block's residual branch (where sequential adapters go);
    `layer` may instead be a dict keyed by stack when stacks differ (T5 decoder has cross attention,
    LLaVA's towers are a CLIP encoder and a LLaMA decoder);
  * `top`: canonical name -> model-level path suffix (tuple = alternatives); `stack.name` puts a
    model-level position in one stack (`encoder.ln.final`, `vision.ln.final`);
  * `required`: the entries a layer must have where its table names them, unless the layer has
    nothing they could be (attention and FFN projections by default; LLaMA's FFN is optional, so
    mixture-of-experts decoders keep their attention positions);
  * how deltas reach the family where forward hooks on the named module are not enough (read by
    `deltakit/joins/`; defaults fit every other family):
      - `called_as`: model-level position -> the modules that run its parameters, when the named
        module itself is never called (T5's and BART's `shared` embedding: the stacks call their
        own `embed_tokens`, which hold the same weight);
      - `prefix_cache`: attention classes without transformers' attention interface whose cache
        update a stand-in cache carries prefixes through (transformers' CpmAnt);
      - `prompt_slots`: stack class -> its embedding module, whose output holds native prompt slots
        that prompt vectors fill (transformers' CpmAnt embeds `prompt_length` of them);
      - `weight_scale`: the attribute of a projection that scales its weight in forward,
        x (s W)^T (native CPM-Ant: 1/sqrt(fan_in)); a merge folds delta / s into W;
      - `counted_positions`: the stack numbers positions 0, 1, ... whatever the padding, so left
        padded rows get position ids counted from their first real token while a prefix or prompt
        is active (`joins/position_ids.py`);
      - `same_input`: groups of positions in a layer that read the same tensor (q, k, v), whose
        LoRAs share one matmul (`joins/shared_input.py`; checked at run time, so never wrong).

How a model's family is found (`positions.detect`): every list of numbered layers in the model is
read with every family's tables. A family fits when
  * in each layer list its stack regexes match, a layer lacks a required entry (or one that other
    layers have) only where it has no projection the table leaves unread: compressed CPM-Ant
    layers drop their attention or FFN and fit; a LLaMA table reading a BART layer lacks `attn.o`
    and leaves `out_proj`, `fc1`, `fc2` unread, so it does not fit;
  * each of its stacks is one layer list (two LLaMA towers under one "" stack could not be told apart);
  * every layer list that looks like a stack of transformer blocks (4+ projections in a layer) is
    one of its stacks, so no tower is left out.
Of the families that fit, the one that finds the most required entries wins (the list order only
breaks ties). When none fits, the model gets the generic table of raw names, and the table says
which family came closest and what it lacked, so a canonical pattern is refused instead of landing
on part of the model. CPM-Ant's native model (CPM-Live key names) and transformers' CpmAnt share
one table because the suffixes are the same.
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


# what a layer must have for a family to fit (each stack requires those its table names)
REQUIRED = ("attn.q", "attn.k", "attn.v", "attn.o", "cross.q", "cross.k", "cross.v", "cross.o", "ffn.in", "ffn.out")


# positions of one layer that read the same tensor: LoRAs there share their first matmul
SAME_INPUT = (("attn.q", "attn.k", "attn.v"), ("cross.k", "cross.v"), ("ffn.gate", "ffn.in"))


@dataclass(frozen=True)
class Family:
    name: str
    stacks: dict
    layer: dict
    top: dict = field(default_factory=dict)
    required: tuple = REQUIRED
    called_as: dict = field(default_factory=dict)
    prefix_cache: tuple = ()
    prompt_slots: dict = field(default_factory=dict)
    weight_scale: str | None = None
    counted_positions: bool = False
    same_input: tuple = SAME_INPUT

    def layer_table(self, stack: str) -> dict:
        per_stack = stack in self.layer and isinstance(self.layer[stack], dict)
        return self.layer[stack] if per_stack else self.layer

    def required_in(self, stack: str) -> tuple:
        table = self.layer_table(stack)
        return tuple(k for k in self.required if k in table)


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
    counted_positions=True,
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
    called_as={"embed": ("encoder.embed_tokens", "decoder.embed_tokens")},
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
    required=("attn.q", "attn.k", "attn.v", "attn.o"),   # MoE layers have experts instead of `mlp`
    counted_positions=True,
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
    prefix_cache=("CpmAntAttention",),                 # transformers' CpmAnt (native: a kv_prefix hook)
    prompt_slots={"CpmAntModel": "input_embedding"},   # transformers' CpmAnt (native: prompt@prompt)
    weight_scale="weight_scale",                       # native CPM-Ant's Linear
)

_BART_ATTN = {
    "attn": Sub("self_attn", "attn.q", "attn.o"),
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.out_proj",
    "ln.attn": "self_attn_layer_norm",
}
_BART_FFN = {
    "ffn": Sub(None, "ffn.in", "ffn.out"),
    "ffn.in": "fc1",
    "ffn.out": "fc2",
    "ln.ffn": "final_layer_norm",
}
_BART_CROSS = {
    "cross": Sub("encoder_attn", "cross.q", "cross.o"),
    "cross.q": "encoder_attn.q_proj",
    "cross.k": "encoder_attn.k_proj",
    "cross.v": "encoder_attn.v_proj",
    "cross.o": "encoder_attn.out_proj",
    "ln.cross": "encoder_attn_layer_norm",
}
BART = Family(
    "bart",  # BART and mBART (whose stacks end in an extra `layer_norm`); Pegasus and M2M100 read the same
    stacks={"encoder": r"encoder\.layers", "decoder": r"decoder\.layers"},
    layer={"encoder": {**_BART_ATTN, **_BART_FFN}, "decoder": {**_BART_ATTN, **_BART_CROSS, **_BART_FFN}},
    top={"embed": "shared", "encoder.ln.embed": "encoder.layernorm_embedding",
         "decoder.ln.embed": "decoder.layernorm_embedding", "encoder.ln.final": "encoder.layer_norm",
         "decoder.ln.final": "decoder.layer_norm", "head": ("lm_head", "classification_head", "qa_outputs")},
    called_as={"embed": ("encoder.embed_tokens", "decoder.embed_tokens")},
)

_CLIP_LAYER = {   # CLIP's (and SigLIP's) encoder layer, in both towers
    "attn": Sub("self_attn", "attn.q", "attn.o"),
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.out_proj",
    "ln.attn": "layer_norm1",
    "ffn": Sub("mlp", "ffn.in", "ffn.out"),
    "ffn.in": "mlp.fc1",
    "ffn.out": "mlp.fc2",
    "ln.ffn": "layer_norm2",
}
CLIP = Family(
    "clip",  # CLIPModel (two towers), CLIPTextModel / CLIPVisionModel (one)
    stacks={"text": r"text_model\.encoder\.layers", "vision": r"vision_model\.encoder\.layers"},
    layer=_CLIP_LAYER,
    top={"text.embed": "text_model.embeddings.token_embedding", "text.ln.final": "text_model.final_layer_norm",
         "vision.ln.embed": "vision_model.pre_layrnorm", "vision.ln.final": "vision_model.post_layernorm",
         "text.head": "text_projection", "vision.head": "visual_projection"},
)

LLAVA = Family(
    "llava",  # a CLIP vision tower, a projector, and a LLaMA-style language model
    stacks={"vision": r"vision_tower\.encoder\.layers", "text": r"language_model\.layers"},
    layer={"vision": _CLIP_LAYER, "text": LLAMA.layer},
    top={"text.embed": "language_model.embed_tokens", "text.ln.final": "language_model.norm",
         "vision.ln.embed": "vision_tower.pre_layrnorm",   # (the tower's post_layernorm: only its unused pooler)
         "projector": "multi_modal_projector", "head": "lm_head"},
    counted_positions=True,
)

# Detection scores every family (positions.detect); the order only breaks ties.
FAMILIES = [CPMANT, T5, BART, LLAMA, GPT2, BERT, CLIP, LLAVA]
