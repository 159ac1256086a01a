"""CPM-1 from fake Megatron shards into transformers' GPT2LMHeadModel (deltakit.backbones.cpm1).

The reference runs Megatron GPT-2 as CPM-1-Generate's `mpu/transformer.py` does on `world` ranks: each rank
applies its [q_r; k_r; v_r] shard to its own heads, row-parallel outputs are summed before the (replicated)
bias, and the vocab-parallel logits are gathered."""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

import deltakit
from deltakit.backbones import cpm1
from deltakit.backbones import megatron as mg
from deltakit.errors import CheckpointError

H, HEADS, LAYERS, VOCAB, POS = 32, 4, 2, 96, 64
SPLIT = {"query_key_value": (0, 3), "dense_h_to_4h": (0, 1), "word_embeddings": (0, 1)}   # + row weights, dim 1
ROW = {"attention.dense.weight", "dense_4h_to_h.weight"}


def reference_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: std * torch.randn(*s, generator=g)
    sd = {"word_embeddings.weight": r(VOCAB, H, std=1.0), "position_embeddings.weight": r(POS, H, std=0.5),
          "transformer.final_layernorm.weight": 1 + r(H), "transformer.final_layernorm.bias": r(H)}
    for i in range(LAYERS):
        b = f"transformer.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + r(H), r(H)
        sd[b + "attention.query_key_value.weight"], sd[b + "attention.query_key_value.bias"] = r(3 * H, H), r(3 * H)
        sd[b + "attention.dense.weight"], sd[b + "attention.dense.bias"] = r(H, H), r(H)
        sd[b + "mlp.dense_h_to_4h.weight"], sd[b + "mlp.dense_h_to_4h.bias"] = r(4 * H, H), r(4 * H)
        sd[b + "mlp.dense_4h_to_h.weight"], sd[b + "mlp.dense_4h_to_h.bias"] = r(H, 4 * H), r(H)
    return sd


def megatron_split(master, world, dim, stride):
    chunks = torch.split(master, master.shape[dim] // world // stride, dim=dim)
    return [torch.cat(chunks[r::world], dim=dim) for r in range(world)]


def shard(ref, world):
    ranks = [{} for _ in range(world)]
    for k, t in ref.items():
        how = SPLIT.get(k.split(".")[-2]) or ((1, 1) if any(k.endswith(x) for x in ROW) else None)
        parts = megatron_split(t, world, *how) if how else [t] * world
        for sd, p in zip(ranks, parts):
            sd[k] = p.clone()
    return ranks


def gelu(x):   # Megatron's gelu_impl
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def megatron_logits(shards, ids):
    s, hn = ids.shape[1], H // HEADS
    ln = lambda x, key: F.layer_norm(x, (H,), shards[0][key + ".weight"], shards[0][key + ".bias"], 1e-5)
    out, start = 0, 0
    for sd in shards:   # VocabParallelEmbedding
        w = sd["word_embeddings.weight"]
        inside = (ids >= start) & (ids < start + w.shape[0])
        out, start = out + w[(ids - start).clamp(0, w.shape[0] - 1)] * inside[..., None], start + w.shape[0]
    x = out + shards[0]["position_embeddings.weight"][torch.arange(s)]
    mask = torch.tril(torch.ones(s, s))
    heads = lambda t: t.view(*t.shape[:2], -1, hn).permute(0, 2, 1, 3)
    for i in range(LAYERS):
        b = f"transformer.layers.{i}."
        h, attn = ln(x, b + "input_layernorm"), 0
        for sd in shards:
            q, k, v = (h @ sd[b + "attention.query_key_value.weight"].T
                       + sd[b + "attention.query_key_value.bias"]).chunk(3, -1)   # split_tensor_along_last_dim
            scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(hn)
            ctx = (scores * mask - 10000.0 * (1.0 - mask)).softmax(-1) @ heads(v)
            attn = attn + ctx.permute(0, 2, 1, 3).reshape(*ids.shape, -1) @ sd[b + "attention.dense.weight"].T
        x = x + attn + shards[0][b + "attention.dense.bias"]
        h = ln(x, b + "post_attention_layernorm")
        x = x + sum(gelu(h @ sd[b + "mlp.dense_h_to_4h.weight"].T + sd[b + "mlp.dense_h_to_4h.bias"])
                    @ sd[b + "mlp.dense_4h_to_h.weight"].T for sd in shards) + shards[0][b + "mlp.dense_4h_to_h.bias"]
    x = ln(x, "transformer.final_layernorm")
    return torch.cat([x @ sd["word_embeddings.weight"].T for sd in shards], -1)


def ids(seed, b=2, s=9):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("world", [2, 4])
def test_merge_and_convert_match_the_original_forward(tmp_path, world):
    ref = reference_weights(seed=world)
    path = mg.save(tmp_path / "ckpt", shard(ref, world), iteration=80000)
    merged = mg.load_merged(path, cpm1.MERGE_RULES)
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    model = cpm1.load_cpm1(path, config=cpm1.tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight   # tied, as in CPM-1
    with torch.no_grad():
        want = megatron_logits([ref], ids(1))
        assert (megatron_logits(shard(ref, world), ids(1)) - want).abs().max() < 1e-5
        got = model(ids(1)).logits
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    assert {p.name for p in deltakit.positions(model)} >= {"layers.0.attn.q", "layers.1.attn.v"}


def test_config_mismatch_and_unknown_keys(tmp_path):
    ranks = shard(reference_weights(), 2)
    path = mg.save(tmp_path / "a", ranks)
    with pytest.raises(CheckpointError, match=r"does not fit the model config.*shape mismatch.*c_fc"):
        cpm1.load_cpm1(path, config=cpm1.tiny_config(n_inner=64))
    with pytest.raises(CheckpointError, match=r"shape mismatch"):
        cpm1.load_cpm1(path)   # the 2.6B shape
    extra = [{**sd, "transformer.layers.0.attention.rotary.weight": torch.ones(2)} for sd in ranks]
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        cpm1.load_cpm1(mg.save(tmp_path / "b", extra), config=cpm1.tiny_config())


def test_lora_trains_on_converted_model(tmp_path):
    model = cpm1.load_cpm1(mg.save(tmp_path / "c", shard(reference_weights(), 2)), config=cpm1.tiny_config())
    h = deltakit.attach(model, "lora(r=4)@attn.q,attn.v")
    assert h.num_trainable == LAYERS * 2 * 4 * (H + H)
    batch = ids(3)
    opt = torch.optim.Adam(h.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    delta = {id(p) for p in h.parameters()}
    assert all(p.grad is not None for p in h.parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    h.detach()


def test_2_6b_on_meta_device_counts():
    model = cpm1.build(cpm1.config_2_6b(), "meta")
    h_, L, V, P = 2560, 32, 30000, 1024
    layer = (3 * h_ * h_ + 3 * h_) + (h_ * h_ + h_) + (4 * h_ * h_ + 4 * h_) + (4 * h_ * h_ + h_) + 4 * h_
    want = V * h_ + P * h_ + L * layer + 2 * h_   # lm_head is tied to wte
    got = sum(p.numel() for p in model.parameters())
    assert got == want and 2.55e9 < got < 2.65e9, got
    h = deltakit.attach(model, "lora(r=8)@attn.q,attn.v")
    assert h.num_trainable == L * 2 * 8 * (h_ + h_) == 2_621_440
    h.detach()


SENTENCES = ["清华大学的研究者发布了中文预训练语言模型。", "今天天气很好，我们去公园散步吧。",
             "北京是中国的首都，也是一座历史悠久的城市。", "人工智能正在改变世界。",
             "我爱自然语言处理 and deep learning."]


def test_tokenizer_matches_cpm1_generate(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("jieba")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES * 20), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=150,
                                   model_type="bpe", character_coverage=1.0, minloglevel=2,
                                   user_defined_symbols=["<eod>", "\u2582", "\u2583"])   # CPM-1's space/newline
    tok = cpm1.tokenizer(tmp_path / "sp.model")
    import jieba   # the original: CPM-1-Generate data_utils/tokenization_gpt2.py GPT2Tokenizer.tokenize
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    trans = str.maketrans(" \n", "\u2582\u2583")
    for text in SENTENCES + ["两个 空格\n换行"]:
        want = sp.encode(" ".join(w.translate(trans) for w in jieba.cut(text, cut_all=False)))
        assert tok.encode(text) == want
        assert tok(text)["input_ids"] == want
    text = "今天天气很好 北京\n人工智能"   # space and newline survive as U+2582 / U+2583
    assert tok.decode(tok.encode(text)) == text
