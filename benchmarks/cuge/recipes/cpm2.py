"""CPM-2 (the 11B encoder-decoder) from its Megatron shards, tuned through the encoder-decoder path of
recipes/hf_lm.py with CPM-2's own tokenizer and start/end tokens, as TsinghuaAI/CPM-2-Finetune
formats each task (`CPM2Datasets.py`; see hf_lm.py for the layouts).

`--model` is the checkpoint folder as CPM-2-Finetune's README lays it out, with the vocab added:

    cpm2/latest_checkpointed_iteration.txt     "100000"
    cpm2/100000/mp_rank_0{0..3}_model_states.pt
    cpm2/vocab.txt                             bpe_cn/vocab.txt (or cpm2/bpe_cn/vocab.txt)
    cpm2/cpm2_config.json                      optional: configs/model/cpm2_config.json's shape keys;
                                               without it the 11B shape, vocab size from the shards

Decoder start <s>, <s_0>; targets end with <s_1>; padding <pad> (`deltakit.backbones.cpm2_tokenizer`).
Default delta: LoRA r=8 on the self-attention q and v of both stacks. CPM-2-Finetune's learning rates
(3e-6 to 5e-6, constant, clip 1.0, weight decay 0.01, no warm-up) are for full fine-tuning; a delta
gets 1e-3 under the same constant schedule. Batch sizes and epochs are its scripts/full_model ones.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CugeError
from .common import HParams, weights_dtype
from .hf_lm import Codec, Seq2SeqRecipe

NAME = "cpm-2"
_FT = dict(lr=1e-3, schedule="constant", warmup=0, clip=1.0, weight_decay=0.01, patience=10, max_len=512)
HPARAMS = {   # scripts/full_model/finetune_cpm2_*.sh: batch size, epochs, eval interval; C3 cut at 768 tokens
    "ccpm": HParams(batch_size=16, epochs=10, eval_every=50, **_FT),
    "c3": HParams(batch_size=4, epochs=10, eval_every=50, **{**_FT, "max_len": 768}),
    "lcsts": HParams(batch_size=16, epochs=10, eval_every=100, max_new=50, **_FT),
    "math23k": HParams(batch_size=16, epochs=20, eval_every=50, max_new=32, **_FT),
    "kdconv": HParams(batch_size=16, epochs=5, eval_every=50, max_new=50, **_FT),
    "sogou_log": HParams(batch_size=8, epochs=10, eval_every=200, **_FT),
    "wmt20_enzh": HParams(batch_size=16, epochs=1, eval_every=100, max_new=128, **_FT),
}
OTHER = HParams(batch_size=16, epochs=10, eval_every=50, **_FT)
SHAPE_KEYS = ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "layer_norm_epsilon",
              "relative_attention_num_buckets")


def is_checkpoint(path) -> bool:
    """A Megatron checkpoint folder: the iteration tracker, or the shards themselves."""
    from deltakit.backbones import megatron
    path = Path(path)
    return path.is_dir() and ((path / megatron.TRACKER).is_file()
                              or any(megatron.SHARD.fullmatch(p.name) for p in path.iterdir()))


def vocab_file(path: Path) -> Path:
    for candidate in (path / "vocab.txt", path / "bpe_cn" / "vocab.txt", path.parent / "vocab.txt"):
        if candidate.is_file():
            return candidate
    raise CugeError(f"no CPM-2 vocab for {path}: put CPM-2's bpe_cn/vocab.txt in it as vocab.txt "
                    f"(looked for {path / 'vocab.txt'} and {path / 'bpe_cn' / 'vocab.txt'})")


def config_overrides(path: Path) -> dict:
    """The shape keys of a CPM-2-Finetune model config JSON in the folder (there is at most one)."""
    found = []
    for p in sorted(path.glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CugeError(f"{p} is not valid JSON ({e}); a CPM-2 config holds d_model, d_ff, "
                            "num_heads, ...") from None
        if isinstance(data, dict) and "d_model" in data:
            found.append((p, {k: data[k] for k in SHAPE_KEYS if k in data}))
    if len(found) > 1:
        raise CugeError(f"{path} has several CPM-2 config files ({', '.join(p.name for p, _ in found)}); keep one")
    return found[0][1] if found else {}


def load(path, device="cpu") -> Seq2SeqRecipe:
    from deltakit.backbones import cpm2
    from deltakit.backbones.cpm2_tokenizer import CPM2Tokenizer
    path = Path(path)
    tok = CPM2Tokenizer(vocab_file(path))
    config = cpm2.config_11b(len(tok), **config_overrides(path))   # the vocab fixes the embedding rows
    model = cpm2.load_cpm2(path, config, dtype=weights_dtype(device)).to(device)
    codec = Codec(encode=tok.encode, decode=tok.decode, pad_id=tok.pad_id, unk_id=tok.unk_id, source_end=(),
                  prefix=tuple(tok.decoder_prefix), end_id=tok.end_id)
    recipe = Seq2SeqRecipe(model, codec, name=NAME, hparams=HPARAMS, other=OTHER)
    recipe.tokenizer = tok
    return recipe
