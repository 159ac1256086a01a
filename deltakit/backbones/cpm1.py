"""CPM-1 (2.6B GPT-2, TsinghuaAI) from its Megatron model-parallel checkpoint into transformers' GPT2LMHeadModel.

Architecture (TsinghuaAI/CPM-1-Generate `model/gpt2_modeling.py`, `mpu/transformer.py`): Megatron GPT-2 -
learned position embeddings added to word embeddings, pre-LN blocks (LayerNorm eps 1e-5 with bias),
attention scores divided by sqrt(head_dim), tanh GELU (= transformers' "gelu_new"), a final LayerNorm,
logits = h @ word_embeddings.T (tied head). 32 layers, hidden 2560, 32 heads, 1024 positions, vocab 30000
(CPM-1-Generate README / scripts/generate_text.sh). That is GPT2LMHeadModel exactly.

Checkpoint keys (module names of GPT2Model) and how the model-parallel ranks split them, from the fixed
`change_mp.py` of CPM-1-Generate (commit 166ae79) and Megatron's `mpu/layers.py`:
  word_embeddings.weight                                   vocab-parallel, dim 0
  position_embeddings.weight                               replicated (a plain nn.Embedding)
  transformer.layers.N.input_layernorm.{weight,bias}       replicated
  transformer.layers.N.attention.query_key_value.{w,b}     column-parallel with stride 3: rank r holds
                                                           [q_r; k_r; v_r] (its heads), so a plain concat
                                                           would interleave q/k/v; merged as [q; k; v]
  transformer.layers.N.attention.dense.weight / .bias      row-parallel dim 1 / bias replicated
  transformer.layers.N.post_attention_layernorm.*          replicated
  transformer.layers.N.mlp.dense_h_to_4h.{weight,bias}     column-parallel, dim 0
  transformer.layers.N.mlp.dense_4h_to_h.weight / .bias    row-parallel dim 1 / bias replicated
  transformer.final_layernorm.{weight,bias}                replicated
Inside one (merged) qkv weight the rows are [all q heads | all k heads | all v heads], heads in order
(`split_tensor_along_last_dim(mixed_x_layer, 3)` then a view to (heads, head_dim)) - the layout of GPT-2's
`c_attn` output. GPT-2 uses Conv1D, whose weight is the transpose of nn.Linear's (CPM-1-Generate
`utils.py::load_weights` transposes for the same reason).

Assumptions: eos/bos = 7, the `<eod>` id of CPM-1's vocabulary (`tokenization_gpt2.py` maps id 7 to
<eod>); dropout 0.1 as in Megatron's defaults (switch the model to eval() for inference).
"""
from __future__ import annotations

import re
import sys
from functools import lru_cache
from types import SimpleNamespace
from unittest import mock

import torch

from ..errors import CheckpointError
from . import megatron as mg

SHAPE_2_6B = dict(vocab_size=30000, n_positions=1024, n_embd=2560, n_layer=32, n_head=32)
COMMON = dict(activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
              bos_token_id=7, eos_token_id=7)
TINY = dict(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

MERGE_RULES = [
    (r"word_embeddings\.weight", mg.VOCAB),
    (r"position_embeddings\.weight", mg.REPLICATED),
    (r"query_key_value\.(weight|bias)", mg.Split(0, stride=3)),
    (r"dense_h_to_4h\.(weight|bias)", mg.COLUMN),
    (r"(attention\.dense|dense_4h_to_h)\.weight", mg.ROW),
    (r"(attention\.dense|dense_4h_to_h)\.bias", mg.REPLICATED),
    (r"layernorm\.(weight|bias)", mg.REPLICATED),
]

# Megatron key regex -> (transformers key template, transpose?) ; Conv1D weights are transposed.
_L = r"transformer\.layers\.(?P<i>\d+)\."
_H = "transformer.h.{i}."
KEY_MAP = [
    (r"word_embeddings\.weight", "transformer.wte.weight", False),
    (r"position_embeddings\.weight", "transformer.wpe.weight", False),
    (r"transformer\.final_layernorm\.(?P<p>weight|bias)", "transformer.ln_f.{p}", False),
    (_L + r"input_layernorm\.(?P<p>weight|bias)", _H + "ln_1.{p}", False),
    (_L + r"post_attention_layernorm\.(?P<p>weight|bias)", _H + "ln_2.{p}", False),
    (_L + r"attention\.query_key_value\.weight", _H + "attn.c_attn.weight", True),
    (_L + r"attention\.query_key_value\.bias", _H + "attn.c_attn.bias", False),
    (_L + r"attention\.dense\.weight", _H + "attn.c_proj.weight", True),
    (_L + r"attention\.dense\.bias", _H + "attn.c_proj.bias", False),
    (_L + r"mlp\.dense_h_to_4h\.weight", _H + "mlp.c_fc.weight", True),
    (_L + r"mlp\.dense_h_to_4h\.bias", _H + "mlp.c_fc.bias", False),
    (_L + r"mlp\.dense_4h_to_h\.weight", _H + "mlp.c_proj.weight", True),
    (_L + r"mlp\.dense_4h_to_h\.bias", _H + "mlp.c_proj.bias", False),
]


def config_2_6b(**overrides):
    from transformers import GPT2Config
    return GPT2Config(**{**SHAPE_2_6B, **COMMON, **overrides})


def tiny_config(**overrides):
    from transformers import GPT2Config
    return GPT2Config(**{**COMMON, **TINY, "bos_token_id": 0, "eos_token_id": 0, **overrides})


def build(cfg, device="meta"):
    from transformers import GPT2LMHeadModel
    with torch.device(device):
        return GPT2LMHeadModel(cfg)


def convert_state_dict(megatron_sd: dict, config=None) -> dict:
    """Merged CPM-1 Megatron keys -> GPT2LMHeadModel keys (Conv1D weights transposed; lm_head is tied)."""
    out = {}
    for key, t in megatron_sd.items():
        for pattern, template, transpose in KEY_MAP:
            m = re.fullmatch(pattern, key)
            if m:
                out[template.format(**m.groupdict())] = t.t().contiguous() if transpose else t
                break
        else:
            raise CheckpointError(f"unexpected CPM-1 tensor {key!r}: not part of Megatron GPT-2")
    return out


def load_cpm1(path, config=None, dtype: torch.dtype = torch.float32):
    """Load a CPM-1 Megatron checkpoint folder as GPT2LMHeadModel (default config: the 2.6B shape,
    vocabulary size read from the checkpoint)."""
    merged = mg.load_merged(path, MERGE_RULES, dtype)
    if config is None:
        rows = merged.get("word_embeddings.weight")
        if rows is None:
            raise CheckpointError(f"{path} holds no 'word_embeddings.weight': it is not a CPM-1 checkpoint")
        config = config_2_6b(vocab_size=rows.shape[0])
    return mg.materialize(build(config, "meta"), convert_state_dict(merged, config), f"CPM-1 checkpoint {path}")


# ---- tokenizer ------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _tokenizer_class():
    from transformers import CpmTokenizer

    class CPM1Tokenizer(CpmTokenizer):
        """transformers' CpmTokenizer, made to tokenize like CPM-1-Generate's `data_utils/tokenization_gpt2.py`:
        jieba.cut(text, cut_all=False) (HMM on), space -> U+2582 and newline -> U+2583 inside each word,
        words joined by spaces, then SentencePiece. (transformers 5's slow CpmTokenizer only does the
        SentencePiece step; its fast one uses rjieba with HMM off.) No <sep>/<cls> is appended: CPM-1
        was trained on raw token streams separated by <eod>."""

        def _tokenize(self, text: str) -> list[str]:
            import jieba
            words = [w.translate(self.translator) for w in jieba.cut(text, cut_all=False)]
            return self.sp_model.encode(" ".join(words), out_type=str)

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            return token_ids_0 + (token_ids_1 or [])

        def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
            return [0] * len(token_ids_0 + (token_ids_1 or []))

        def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
            return [0] * len(token_ids_0 + (token_ids_1 or []))

    CPM1Tokenizer.__module__ = __name__
    return CPM1Tokenizer


def tokenizer(model_file, **kwargs):
    """The CPM-1 tokenizer from its SentencePiece model (`bpe_3w_new/chinese_vocab.model`)."""
    import jieba
    jieba.setLogLevel(60)   # jieba prints its dictionary-loading chatter at INFO
    cls = _tokenizer_class()
    # CpmTokenizer.__init__ insists on importing rjieba although our _tokenize uses jieba: lend it a
    # jieba-backed stand-in for the duration of the constructor only, if rjieba is not installed.
    stand_in = SimpleNamespace(cut=lambda text, hmm=True: list(jieba.cut(text, HMM=hmm)))
    patch = {} if "rjieba" in sys.modules or _has("rjieba") else {"rjieba": stand_in}
    with mock.patch.dict(sys.modules, patch):
        return cls(vocab_file=str(model_file), **kwargs)


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None
