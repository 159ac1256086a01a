"""Tiny backbones for the CUGE tests and notebook, written in each backbone's own file layout, with a vocabulary of
every character of the data they will read (so nothing is <unk>): a native CPM-Ant (CPM-Live's
.pt + config JSON + ant.txt), a CPM-2 Megatron checkpoint (2 model-parallel shards + vocab.txt +
config JSON), a Hugging Face GPT-2 and a Hugging Face XLM-R encoder with a character tokenizer."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# what the recipes' templates add to the data's own text
TEMPLATE_CHARS = "是否正确[]选项：、；文章相关问题标题查询历史图谱分词一二三四五六七八九十"


def chars_of(*roots) -> list[str]:
    """Every character of every file below `roots` (the fixtures), and of the templates; no whitespace."""
    seen = set(TEMPLATE_CHARS)
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and ".cuge_cache" not in path.parts:
                seen |= set(path.read_text(encoding="utf-8"))
    return sorted(c for c in seen if not c.isspace())


def _normal_embeddings(*embeddings):
    with torch.no_grad():
        for e in embeddings:
            e.weight.normal_()   # trained embeddings are O(1): logits are not all ~0


def make_cpmant(folder, chars, seed: int = 0) -> Path:
    from deltakit.backbones import cpmant
    from deltakit.backbones.cpmant_tokenizer import SPECIALS
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(SPECIALS) + [c for c in chars if c not in SPECIALS]
    (folder / "ant.txt").write_text("\n".join(vocab), encoding="utf-8")
    cfg = cpmant.CPMAntConfig(**{**cpmant.CONFIGS["tiny"].__dict__, "vocab_size": len(vocab)})
    cfg.to_json(folder / "cpm-ant-tiny.json")
    torch.manual_seed(seed)
    model = cpmant.build(cfg)
    _normal_embeddings(model.input_embedding, model.prompt_embedding, model.segment_embedding)
    torch.save(model.state_dict(), folder / "cpm-ant-tiny.pt")
    return folder / "cpm-ant-tiny.pt"


CPM2_HEAD = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", ",", "\u2582"]
CPM2_SHAPE = dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                  relative_attention_num_buckets=8)


def cpm2_megatron_weights(vocab: int, seed: int = 0) -> dict:
    """Random CPM-2 weights under CPM-2's own (Megatron) key names, shaped by CPM2_SHAPE."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: std * torch.randn(*s, generator=g)   # noqa: E731
    d, ff, inner, heads = CPM2_SHAPE["d_model"], CPM2_SHAPE["d_ff"], CPM2_SHAPE["num_heads"] * CPM2_SHAPE["d_kv"], \
        CPM2_SHAPE["num_heads"]
    sd = {"word_embeds.weight": r(vocab, d, std=1.0), "lm_head.weight": r(vocab, d)}
    for stack in ("encoder", "decoder"):
        sd[f"{stack}.final_layernorm.weight"] = 1 + r(d)
        for i in range(CPM2_SHAPE["num_layers"]):
            b = f"{stack}.blocks.{i}."
            sd[b + "self_attn.layer_norm.weight"] = 1 + r(d)
            sd[b + "self_attn.self_attn.project.weight"] = r(3 * inner, d)
            sd[b + "self_attn.self_attn.dense.weight"] = r(d, inner)
            if i == 0:
                sd[b + "self_attn.self_attn.relative_attention_bias.weight"] = r(
                    CPM2_SHAPE["relative_attention_num_buckets"], heads, std=1.0)
            if stack == "decoder":
                sd[b + "cross_attn.layer_norm.weight"] = 1 + r(d)
                sd[b + "cross_attn.cross_attn.project_q.weight"] = r(inner, d)
                sd[b + "cross_attn.cross_attn.project_kv.weight"] = r(2 * inner, d)
                sd[b + "cross_attn.cross_attn.dense.weight"] = r(d, inner)
            sd[b + "ff.layer_norm.weight"] = 1 + r(d)
            sd[b + "ff.dense_relu_dense.wi_0.weight"] = r(ff, d)
            sd[b + "ff.dense_relu_dense.wi_1.weight"] = r(ff, d)
            sd[b + "ff.dense_relu_dense.wo.weight"] = r(d, ff)
    return sd


def make_cpm2(folder, chars, seed: int = 0, world: int = 2) -> Path:
    """CPM-2-Finetune's checkpoint layout (tracker + iteration folder of mp_rank shards) + vocab.txt + config."""
    from deltakit.backbones import cpm2
    from deltakit.backbones import megatron as mg
    folder = Path(folder)
    vocab = CPM2_HEAD + [c for c in chars if c not in CPM2_HEAD] + [f"<s_{i}>" for i in range(190)]
    mg.save(folder, mg.split(cpm2_megatron_weights(len(vocab), seed), world, cpm2.MERGE_RULES), iteration=1000)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    (folder / "cpm2_config.json").write_text(json.dumps({**CPM2_SHAPE, "feed_forward_proj": "relu",
                                                         "dropout_rate": 0.0}), encoding="utf-8")
    return folder


def _char_tokenizer(chars, specials):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {t: i for i, t in enumerate(specials + [c for c in chars if c not in specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")   # one token per character
    tok.decoder = decoders.Fuse()
    return tok, vocab


def make_gpt2(folder, chars, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    folder = Path(folder)
    tok, vocab = _char_tokenizer(chars, ["<pad>", "<unk>", "<eos>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=512, n_embd=32, n_layer=2, n_head=4, bos_token_id=2,
                     eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def make_encoder(folder, chars, seed: int = 0) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel
    folder = Path(folder)
    tok, vocab = _char_tokenizer(chars, ["<s>", "<pad>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>", cls_token="<s>", sep_token="</s>").save_pretrained(folder)
    cfg = XLMRobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=520, type_vocab_size=1, pad_token_id=1,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    XLMRobertaModel(cfg).save_pretrained(folder)
    return folder
