"""The native CPM-Ant: published shape, prefix-LM causality, converters against transformers' CpmAnt,
checkpoint loading, cached generation, deltas end to end, OpenDelta LoRA import."""
import json

import pytest
import torch

import deltakit
from deltakit.backbones import cpmant, cpmant_convert as cv, cpmant_generate as gen
from deltakit.backbones.opendelta import load_opendelta_lora
from deltakit.errors import CheckpointError, DeltakitError


def tiny(seed=0, **overrides):
    """Tiny model with non-trivial norms and position bias (zeros would hide layout mistakes)."""
    torch.manual_seed(seed)
    cfg = cpmant.CPMAntConfig(**{**cpmant.CONFIGS["tiny"].__dict__, **overrides})
    model = cpmant.build(cfg).eval()
    with torch.no_grad():
        model.position_bias.relative_attention_bias.normal_()
        for emb in (model.input_embedding, model.prompt_embedding, model.segment_embedding):
            emb.weight.normal_()   # trained CPM-Ant embeddings are O(1): logits are not all ~0
        for n, p in model.named_parameters():
            if "layernorm" in n:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(**x)[0]


# ---- shape -------------------------------------------------------------------------------------

def test_10b_on_meta_has_the_published_shape_and_lora_count():
    model = cpmant.build("cpm-ant-10b", device="meta")
    sd = model.state_dict()
    assert sd["input_embedding.weight"].shape == (30720, 4096)
    assert sd["prompt_embedding.weight"].shape == (1024, 4096)
    assert sd["segment_embedding.weight"].shape == (32, 4096)
    assert sd["position_bias.relative_attention_bias"].shape == (32 * 32 + 512, 32)
    assert sd["encoder.layers.47.ffn.ffn.w_in.w_0.weight"].shape == (10240, 4096)
    assert sd["encoder.layers.47.self_att.self_attention.attention_out.weight"].shape == (4096, 4096)
    assert len(sd) == 48 * 9 + 5
    assert sum(p.numel() for p in model.parameters()) == cpmant.num_params(model.config) == 9_391_624_192
    assert deltakit.attach(model, "lora(r=8)@attn.q,attn.v").num_trainable == 6_291_456


@pytest.mark.parametrize("name", ["cpm-ant-7b", "cpm-ant-3b", "cpm-ant-1b", "cpm-ant-300m"])
def test_compressed_configs_drop_modules_and_count_in_closed_form(name):
    model = cpmant.build(name, device="meta")
    cfg = model.config
    for i, layer in enumerate(model.encoder.layers):
        assert hasattr(layer, "self_att") == cfg.layer_has(i)[0] and hasattr(layer, "ffn") == cfg.layer_has(i)[1]
    assert sum(p.numel() for p in model.parameters()) == cpmant.num_params(cfg)
    n_att = sum(cfg.layer_has(i)[0] for i in range(cfg.num_layers))
    h = deltakit.attach(model, "lora(r=8)@attn.q,attn.v")
    assert h.num_trainable == n_att * 2 * 8 * (cfg.dim_model + cfg.num_heads * cfg.dim_head)


def test_bf16_build_and_forward():
    model = cpmant.build("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = logits(model, model.inputs([[5, 6, 7]]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_config_json_from_cpm_live(tmp_path):
    path = tmp_path / "cpm-ant-10b.json"
    path.write_text(json.dumps({"vocab_size": 30720, "dim_model": 4096, "dim_ff": 10240, "num_layers": 48,
                                "num_heads": 32, "dim_head": 128, "dropout_p": 0.0, "position_bias_num_buckets": 512,
                                "position_bias_max_distance": 2048, "eps": 1e-6, "half": True,
                                "prompt_types": 32, "prompt_length": 32, "segment_types": 32}))
    assert cpmant.config(str(path)) == cpmant.CONFIGS["cpm-ant-10b"]
    path.write_text(json.dumps({"dim_modle": 4096}))
    with pytest.raises(DeltakitError, match="dim_modle"):
        cpmant.config(str(path))
    with pytest.raises(DeltakitError, match="cpm-ant-10b"):
        cpmant.config("cpm-ant-11b")


# ---- the mask ----------------------------------------------------------------------------------

def test_no_position_sees_a_later_non_context_token():
    model = tiny()
    P, n, n_ctx = model.config.prompt_length, 10, 4
    ids = torch.randint(10, 96, (n,)).tolist()
    base = logits(model, model.inputs([ids], context=[n_ctx]))
    for j in range(n_ctx, n):   # change a non-context token: nothing before it may move
        changed = ids.copy()
        changed[j] = 10 + (ids[j] - 9) % 86
        out = logits(model, model.inputs([changed], context=[n_ctx]))
        assert torch.equal(out[0, :P + j], base[0, :P + j]), j
        assert not torch.allclose(out[0, P + j:], base[0, P + j:])
    changed = ids.copy()   # a context token is seen by everybody, earlier positions included
    changed[n_ctx - 1] = 10 + (ids[n_ctx - 1] - 9) % 86
    out = logits(model, model.inputs([changed], context=[n_ctx]))
    assert not torch.allclose(out[0, :P + n_ctx - 1], base[0, :P + n_ctx - 1])


def test_the_mask_itself():
    context = torch.tensor([[1, 1, 0, 0]])
    valid, span = torch.ones(1, 4, dtype=torch.bool), torch.tensor([[0, 0, 0, 1]])
    see = cpmant.CPMAnt.attention_mask(valid, context, span)[0].int().tolist()
    assert see == [[1, 1, 0, 0],
                   [1, 1, 0, 0],
                   [1, 1, 1, 0],
                   [0, 0, 0, 1]]   # the last token is another span: it sees only itself


def test_padding_and_batching_do_not_change_a_sample():
    model = tiny()
    P = model.config.prompt_length
    a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13]
    alone = logits(model, model.inputs([b], context=[2]))
    batched = logits(model, model.inputs([a, b], context=[3, 2]))
    torch.testing.assert_close(batched[1, :P + 3], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batched).all()   # padded rows see themselves: no NaN


def test_packed_spans_do_not_see_each_other():
    model = tiny()
    P = model.config.prompt_length
    x = model.inputs([[5, 6, 7, 20, 21, 22]])
    x["span"] = torch.tensor([[0] * (P + 3) + [1] * 3])
    first = logits(model, x)[0, :P + 3]
    x["input"][0, -3:] = torch.tensor([30, 31, 32])
    torch.testing.assert_close(logits(model, x)[0, :P + 3], first, rtol=0, atol=0)


# ---- transformers ------------------------------------------------------------------------------

def test_matches_transformers_cpmant_on_all_context_input():
    model = tiny()
    hf = cv.to_transformers(model)
    ids = [[5, 6, 7, 8, 9, 10, 11]]
    ours = logits(model, model.inputs(ids, task_id=2))[:, model.config.prompt_length:]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    back = cv.from_transformers(hf)   # and back again
    torch.testing.assert_close(logits(back, back.inputs(ids, context=[3])), logits(model, model.inputs(ids, context=[3])),
                               rtol=1e-5, atol=1e-5)


def test_converter_round_trip_is_exact_when_scales_are_powers_of_two():
    model = tiny(dim_model=64, dim_ff=256, num_heads=4, dim_head=16)   # sqrt of every fan-in is 8 or 16
    sd = model.state_dict()
    back = cv.from_hf_state_dict(cv.to_hf_state_dict(sd, model.config), model.config)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_converter_refuses_what_it_cannot_express():
    with pytest.raises(DeltakitError, match="compressed"):
        cv.to_hf_config(cpmant.CONFIGS["cpm-ant-7b"])
    hf_sd = cv.to_hf_state_dict(tiny().state_dict(), cpmant.CONFIGS["tiny"])
    hf_sd["lm_head.weight"] = hf_sd["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head"):
        cv.from_hf_state_dict(hf_sd, cpmant.CONFIGS["tiny"])


# ---- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_an_official_style_checkpoint(tmp_path, fmt):
    model = tiny()
    path = tmp_path / f"cpm-ant-tiny.{fmt}"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if fmt == "pt":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    loaded = cpmant.load_cpmant(path, "tiny", dtype=torch.float32)
    x = model.inputs([[5, 6, 7, 8]], context=[2])
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_load_errors_name_the_problem(tmp_path):
    sd = tiny().state_dict()
    path = tmp_path / "bad.pt"
    torch.save({k: v for k, v in sd.items() if "layers.1." not in k}, path)
    with pytest.raises(CheckpointError, match="missing.*layers.1"):
        cpmant.load_cpmant(path, "tiny")
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="shapes"):
        cpmant.load_cpmant(path, cpmant.CPMAntConfig(**{**cpmant.CONFIGS["tiny"].__dict__, "dim_ff": 48}))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        cpmant.load_cpmant(tmp_path / "nope.pt", "tiny")


class Payload:   # any pickled object that is not a tensor container
    pass


def test_pickled_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Payload()}, path)
    with pytest.raises(CheckpointError, match="unpickle"):
        cpmant.read_state_dict(path)


# ---- generation --------------------------------------------------------------------------------

def test_incremental_decoding_gives_the_logits_of_a_full_forward():
    model = tiny()
    P = model.config.prompt_length
    src = [5, 6, 7, 8]
    generated = gen.greedy(model, [src], max_new_tokens=6)[0]
    assert generated == gen.greedy(model, [src], max_new_tokens=6, use_cache=False)[0]
    # a full forward over source + generated (the generated part causal) predicts the same tokens
    x = model.inputs([src + generated], context=[len(src)])
    full = logits(model, x)[0, P + len(src) - 1:-1]
    assert full.argmax(-1).tolist() == generated
    # and step by step the cached logits equal those of the full forward
    x = gen._batch(model, [src], 1, "cpu")
    out, cache = gen._step(model, x, None)
    steps = [out]
    for t in generated[:-1]:
        x = gen._grow(x, torch.tensor([t]))
        out, cache = gen._step(model, x, cache)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps), full, rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_one_by_one_and_beam_search_runs():
    model = tiny()
    sources = [[5, 6, 7, 8, 9], [10, 11]]
    batched = gen.greedy(model, sources, max_new_tokens=5)
    assert batched == [gen.greedy(model, [s], max_new_tokens=5)[0] for s in sources]
    beams = gen.beam_search(model, sources, beam_size=3, max_new_tokens=5)
    assert [len(b) for b in beams] == [5, 5]
    assert gen.beam_search(model, sources, beam_size=1, max_new_tokens=5) == batched   # one beam is greedy
    eos = batched[0][2]
    assert gen.greedy(model, sources[:1], max_new_tokens=5, eos_id=eos)[0] == batched[0][:batched[0].index(eos)]


# ---- deltas ------------------------------------------------------------------------------------

def test_lora_trains_end_to_end_and_merges_through_the_scaled_linear():
    model = tiny()
    P = model.config.prompt_length
    x = model.inputs([[5, 6, 7, 8, 9, 10, 11, 12]] * 2, context=[3, 3])
    h = deltakit.attach(model, "lora(r=4)@attn.q,attn.v,ffn.out; lnfit@ln.ffn")
    opt = torch.optim.AdamW(h.parameters(), lr=5e-2)

    def loss():
        out = model(**x)[0][:, P + 2:-1]
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), x["input"][:, P + 3:].flatten())

    first = loss().item()
    for _ in range(30):
        l = loss()
        l.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "deltakit" not in n)
        opt.step(); opt.zero_grad()
    assert loss().item() < first * 0.7
    with torch.no_grad():
        live = logits(model, x)
        h.merge()   # W_live += delta / weight_scale: the model computes scale * W
        torch.testing.assert_close(logits(model, x), live, rtol=1e-5, atol=1e-5)


def test_opendelta_lora_checkpoint_loads(tmp_path):
    model = tiny()
    r, out_dim = 2, model.config.num_heads * model.config.dim_head
    torch.manual_seed(1)
    sd = {}
    for i in range(2):
        for proj in ("project_q", "project_v"):
            key = f"encoder.layers.{i}.self_att.self_attention.{proj}.lora"
            sd[f"{key}.lora_A"], sd[f"{key}.lora_B"] = torch.randn(r, 32), torch.randn(out_dim, r)
    path = tmp_path / "lora.pt"
    torch.save(sd, path)
    x = model.inputs([[5, 6, 7, 8]], context=[2])
    base = logits(model, x)
    h = load_opendelta_lora(model, path)
    assert h.num_trainable == 4 * r * (32 + out_dim)
    # OpenDelta's LoRA: out += (alpha / r) * x A^T B^T on the module's input x
    q = model.encoder.layers[0].self_att.self_attention.project_q
    inp = torch.randn(3, 32)
    key = "encoder.layers.0.self_att.self_attention.project_q.lora"
    with torch.no_grad():
        torch.testing.assert_close(q(inp), q.weight_scale * inp @ q.weight.T + 8 * inp @ sd[f"{key}.lora_A"].T @ sd[f"{key}.lora_B"].T)
    assert not torch.allclose(logits(model, x), base)
    h.detach()
    with pytest.raises(CheckpointError, match="no OpenDelta LoRA"):
        load_opendelta_lora(model, {"encoder.output_layernorm.weight": torch.ones(32)})
