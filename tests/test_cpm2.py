"""CPM-2 from fake Megatron shards into transformers' MT5 (deltakit.backbones.cpm2).

The reference is written here from CPM-2-Finetune's `mpu/transformer_enc_dec.py`: it runs the model the way
the original runs it on `world` model-parallel ranks (each rank its own heads / FFN columns / vocab rows,
row-parallel outputs summed, logits gathered), straight from the shards."""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import deltakit
from deltakit.backbones import cpm2
from deltakit.backbones import megatron as mg
from deltakit.errors import CheckpointError

D, FF, KV, HEADS, LAYERS, BUCKETS, VOCAB = 32, 64, 8, 4, 2, 8, 96
# key -> (split dim, stride) as Megatron splits it; absent = replicated (CPM-2-Pretrain init_ckpt.py)
SPLIT = {"project": (0, 3), "project_q": (0, 1), "project_kv": (0, 2), "wi_0": (0, 1), "wi_1": (0, 1),
         "dense": (1, 1), "wo": (1, 1), "relative_attention_bias": (1, 1), "word_embeds": (0, 1), "lm_head": (0, 1)}


def reference_weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: std * torch.randn(*s, generator=g)
    inner = HEADS * KV
    sd = {"word_embeds.weight": r(VOCAB, D, std=1.0), "lm_head.weight": r(VOCAB, D)}
    for stack in ("encoder", "decoder"):
        sd[f"{stack}.final_layernorm.weight"] = 1 + r(D)
        for i in range(LAYERS):
            b = f"{stack}.blocks.{i}."
            sd[b + "self_attn.layer_norm.weight"] = 1 + r(D)
            sd[b + "self_attn.self_attn.project.weight"] = r(3 * inner, D)
            sd[b + "self_attn.self_attn.dense.weight"] = r(D, inner)
            if i == 0:
                sd[b + "self_attn.self_attn.relative_attention_bias.weight"] = r(BUCKETS, HEADS, std=1.0)
            if stack == "decoder":
                sd[b + "cross_attn.layer_norm.weight"] = 1 + r(D)
                sd[b + "cross_attn.cross_attn.project_q.weight"] = r(inner, D)
                sd[b + "cross_attn.cross_attn.project_kv.weight"] = r(2 * inner, D)
                sd[b + "cross_attn.cross_attn.dense.weight"] = r(D, inner)
            sd[b + "ff.layer_norm.weight"] = 1 + r(D)
            sd[b + "ff.dense_relu_dense.wi_0.weight"] = r(FF, D)
            sd[b + "ff.dense_relu_dense.wi_1.weight"] = r(FF, D)
            sd[b + "ff.dense_relu_dense.wo.weight"] = r(D, FF)
    return sd


def megatron_split(master, world, dim, stride):
    chunks = torch.split(master, master.shape[dim] // world // stride, dim=dim)
    return [torch.cat(chunks[r::world], dim=dim) for r in range(world)]


def shard(ref, world):
    ranks = [{} for _ in range(world)]
    for k, t in ref.items():
        how = SPLIT.get(k.split(".")[-2])
        parts = megatron_split(t, world, *how) if how else [t] * world
        for sd, p in zip(ranks, parts):
            sd[k] = p.clone()
    for sd in ranks:   # ParallelTransformer registers the shared embedding again under each stack
        sd["encoder.word_embeds.weight"] = sd["decoder.word_embeds.weight"] = sd["word_embeds.weight"].clone()
    return ranks


# ---- the original forward, model-parallel -----------------------------------------------------

def gelu(x):   # CPM-2's gelu_impl
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rms(x, w, eps=1e-6):   # CPM-2's LayerNorm: no mean, no bias, variance always in fp32
    return w * (x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps))


def bucket(rel, bidirectional, num_buckets=BUCKETS, max_distance=128):
    out = 0
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    exact = num_buckets // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).long()
    return out + torch.where(rel < exact, rel, torch.min(large, torch.full_like(large, num_buckets - 1)))


def attend(q, k, v, mask, bias):   # [b, s, n_p*KV] each; no 1/sqrt(d) (CPM-2 removed it)
    heads = lambda t: t.view(*t.shape[:2], -1, KV).permute(0, 2, 1, 3)
    scores = heads(q) @ heads(k).transpose(-1, -2)
    scores = scores * mask + (-10000.0 * (1.0 - mask) + bias)
    ctx = scores.softmax(-1) @ heads(v)
    return ctx.permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)


def stack_forward(shards, stack, x, enc=None):
    s = x.shape[1]
    rel = torch.arange(s)[None, :] - torch.arange(s)[:, None]
    mask = torch.tril(torch.ones(s, s)) if stack == "decoder" else torch.ones(s, s)
    key = f"{stack}.blocks.0.self_attn.self_attn.relative_attention_bias.weight"
    biases = [sd[key][bucket(rel, stack == "encoder")].permute(2, 0, 1)[None] for sd in shards]   # own heads only
    for i in range(LAYERS):
        b = f"{stack}.blocks.{i}."
        h = rms(x, shards[0][b + "self_attn.layer_norm.weight"])
        x = x + sum(attend(*(h @ sd[b + "self_attn.self_attn.project.weight"].T).chunk(3, -1), mask, bias)
                    @ sd[b + "self_attn.self_attn.dense.weight"].T for sd, bias in zip(shards, biases))
        if stack == "decoder":
            h = rms(x, shards[0][b + "cross_attn.layer_norm.weight"])
            x = x + sum(attend(h @ sd[b + "cross_attn.cross_attn.project_q.weight"].T,
                               *(enc @ sd[b + "cross_attn.cross_attn.project_kv.weight"].T).chunk(2, -1),
                               torch.ones(s, enc.shape[1]), 0.0) @ sd[b + "cross_attn.cross_attn.dense.weight"].T
                        for sd in shards)
        h = rms(x, shards[0][b + "ff.layer_norm.weight"])
        f = b + "ff.dense_relu_dense."
        x = x + sum((gelu(h @ sd[f + "wi_0.weight"].T) * (h @ sd[f + "wi_1.weight"].T)) @ sd[f + "wo.weight"].T
                    for sd in shards)
    return rms(x, shards[0][f"{stack}.final_layernorm.weight"])


def embed(shards, ids):   # VocabParallelEmbedding: each rank looks up its own rows, then all-reduce
    out, start = 0, 0
    for sd in shards:
        w = sd["word_embeds.weight"]
        inside = (ids >= start) & (ids < start + w.shape[0])
        out = out + w[(ids - start).clamp(0, w.shape[0] - 1)] * inside[..., None]
        start += w.shape[0]
    return out


def megatron_logits(shards, enc_ids, dec_ids):
    enc = stack_forward(shards, "encoder", embed(shards, enc_ids))
    dec = stack_forward(shards, "decoder", embed(shards, dec_ids), enc)
    return torch.cat([dec @ sd["lm_head.weight"].T for sd in shards], -1)   # gather_from_model_parallel_region


# ---- tests ------------------------------------------------------------------------------------

def ids(seed, b=2, s=7):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    ref = reference_weights()
    return ref, mg.save(tmp_path_factory.mktemp("cpm2") / "ckpt", shard(ref, 4), iteration=100000)


def test_merge_and_convert_match_the_original_forward(ckpt):
    ref, path = ckpt
    merged = mg.load_merged(path, cpm2.MERGE_RULES)
    aliases = {"encoder.word_embeds.weight", "decoder.word_embeds.weight"}
    assert set(merged) - aliases == set(ref) and all(torch.equal(merged[k], ref[k]) for k in ref)
    model = cpm2.load_cpm2(path, config=cpm2.tiny_config())
    assert model.lm_head.weight is not model.shared.weight and torch.equal(model.lm_head.weight, ref["lm_head.weight"])
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    enc_ids, dec_ids = ids(1), ids(2, s=5)
    with torch.no_grad():
        want = megatron_logits([ref], enc_ids, dec_ids)
        assert torch.allclose(megatron_logits(shard(ref, 4), enc_ids, dec_ids), want, atol=1e-5, rtol=0)
        got = model(input_ids=enc_ids, decoder_input_ids=dec_ids).logits
    assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    assert deltakit.positions(model)   # family "t5" recognises it


def test_two_ranks_and_default_config(tmp_path):
    ref = reference_weights(seed=3)
    path = mg.save(tmp_path / "ckpt", shard(ref, 2))
    model = cpm2.load_cpm2(path, config=cpm2.tiny_config(), dtype=torch.float64)
    assert model.shared.weight.dtype == torch.float64
    with torch.no_grad():
        want = megatron_logits([{k: v.double() for k, v in ref.items()}], ids(4), ids(5))
        assert (model(input_ids=ids(4), decoder_input_ids=ids(5)).logits - want).abs().max() < 1e-10
    with pytest.raises(CheckpointError, match=r"does not fit the model config.*shape mismatch"):
        cpm2.load_cpm2(path)   # the 11B shape does not fit tiny shards; vocab is read from the checkpoint


def test_errors(tmp_path):
    ref = reference_weights()
    ranks = shard(ref, 2)
    with pytest.raises(CheckpointError, match=r"d_ff|shape mismatch.*wi_0"):
        cpm2.load_cpm2(mg.save(tmp_path / "a", ranks), config=cpm2.tiny_config(d_ff=48))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder.prompt_embeds.weight'"):
        cpm2.load_cpm2(mg.save(tmp_path / "b", [{**sd, "encoder.prompt_embeds.weight": torch.ones(4, D)}
                                                for sd in ranks]), config=cpm2.tiny_config())
    bad = [dict(sd) for sd in ranks]
    for sd in bad:
        sd["decoder.word_embeds.weight"] = sd["decoder.word_embeds.weight"] + 1
    with pytest.raises(CheckpointError, match="differs from 'word_embeds.weight'"):
        cpm2.load_cpm2(mg.save(tmp_path / "c", bad), config=cpm2.tiny_config())
    missing = [{k: v for k, v in sd.items() if "blocks.1.ff" not in k} for sd in ranks]
    with pytest.raises(CheckpointError, match=r"missing \['decoder.block.1.layer.2"):
        cpm2.load_cpm2(mg.save(tmp_path / "d", missing), config=cpm2.tiny_config())


def test_lora_trains_on_converted_model(ckpt):
    _, path = ckpt
    model = cpm2.load_cpm2(path, config=cpm2.tiny_config())
    h = deltakit.attach(model, "lora(r=4)@attn.q,attn.v")
    assert h.num_trainable == 2 * LAYERS * 2 * 4 * (D + HEADS * KV)   # stacks x layers x {q,v} x r(in+out)
    enc_ids, labels = ids(6), ids(7, s=5)
    opt = torch.optim.Adam(h.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(input_ids=enc_ids, labels=labels).loss
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < losses[0] - 0.05, losses
    delta = {id(p) for p in h.parameters()}
    assert all(p.grad is not None for p in h.parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in delta)
    h.detach()


def test_11b_on_meta_device_counts():
    cfg = cpm2.config_11b()
    model = cpm2.build(cfg, "meta")
    d, ff, inner, V, L, B = 4096, 10240, 64 * 64, 26240, 24, 32
    enc_layer = 4 * d * inner + 3 * d * ff + 2 * d        # q k v o, wi_0 wi_1 wo, two RMSNorms
    dec_layer = 8 * d * inner + 3 * d * ff + 3 * d        # + cross q k v o and its norm
    want = 2 * V * d + L * (enc_layer + dec_layer) + 2 * B * 64 + 2 * d   # shared + untied lm_head, biases, finals
    got = sum(p.numel() for p in model.parameters())
    assert got == want and 11.0e9 < got < 11.1e9, got
    assert all(p.is_meta for p in model.parameters())
    assert cpm2.config_11b("bilingual").vocab_size == 51967
    h = deltakit.attach(model, "lora(r=8)@attn.q,attn.v")
    lora = 2 * L * 2 * 8 * (d + inner)
    assert lora == 6_291_456 and h.num_trainable == lora
    h.detach()
