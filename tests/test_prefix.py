"""Prefix tuning on every family (and the helpers test_prompt.py / test_hyper.py share): attach,
forward, backward, closed-form counts, save/load, detach, padding, generation with a cache."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io

import pytest
import torch

import deltakit
from deltakit import hf_compat
import tiny_models as tm
from test_families import assert_pristine, backbone_params, loss_of, randomise

ENC_DEC = tm.ENC_DEC


def run(model, batch):
    with torch.no_grad():
        return tm.run(model, batch)


def attention_layout(family, cfg):
    """[(hidden, key width)] of every self/cross attention that `@attn` (and `@cross`) select."""
    if family in ("bert", "xlmr"):
        return [(cfg.hidden_size, cfg.hidden_size)] * cfg.num_hidden_layers, []
    if family == "gpt2":
        return [(cfg.n_embd, cfg.n_embd)] * cfg.n_layer, []
    if family in ("bart", "mbart"):
        d = cfg.d_model
        return [(d, d)] * (cfg.encoder_layers + cfg.decoder_layers), [(d, d)] * cfg.decoder_layers
    if family in ENC_DEC:
        inner = cfg.num_heads * cfg.d_kv
        return [(cfg.d_model, inner)] * (cfg.num_layers + cfg.num_decoder_layers), [(cfg.d_model, inner)] * cfg.num_decoder_layers
    if family == "llama":
        hd = cfg.hidden_size // cfg.num_attention_heads
        return [(cfg.hidden_size, cfg.num_key_value_heads * hd)] * cfg.num_hidden_layers, []
    if family == "cpmant":
        return [(cfg.hidden_size, cfg.num_attention_heads * cfg.dim_head)] * cfg.num_hidden_layers, []
    raise ValueError(family)


def check_lifecycle(family, spec, expected, tmp_path, std=0.3):
    """attach -> forward/backward (only deltas get gradients) -> count -> save/load -> disabled -> detach."""
    ref, model, batch = tm.make(family), tm.make(family), tm.inputs(family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    y0 = run(model, batch)
    planned = deltakit.plan(model, spec)
    h = deltakit.attach(model, spec)
    assert planned.num_params == h.num_trainable == h.num_params == expected
    randomise(h, std=std)
    y = tm.run(model, batch)
    assert y.shape == y0.shape
    assert not torch.allclose(y.detach(), y0, atol=1e-4), "the delta changes nothing"
    loss_of(y).backward()
    assert all(p.grad is None for _, p in backbone_params(model))
    for name, p in h.named_parameters():
        assert p.grad is not None, name
    with h.disabled():
        assert torch.equal(run(model, batch), y0)
    text = h.summary()
    assert f"{h.num_trainable:,}" in text
    buf = io.StringIO()
    deltakit.show(model, file=buf)
    assert "deltas" in buf.getvalue()

    h.save(tmp_path / "ckpt")
    y1 = run(model, batch)
    fresh = tm.make(family, fresh=True)
    g = deltakit.load(fresh, tmp_path / "ckpt")
    assert g.num_trainable == expected
    torch.testing.assert_close(run(fresh, batch), y1, rtol=1e-5, atol=1e-5)
    g.detach()

    assert h.merge() == [e.key for e in h.entries]   # nothing here folds into weights
    h.detach()
    assert "_deltakit_prefix_site" not in str([m.__dict__.keys() for m in model.modules()])
    assert all("_deltakit_prefix" not in m.__dict__ for m in model.modules())
    assert "_deltakit_prompt_site" not in model.__dict__
    assert all(getattr(getattr(m, "config", None), "_attn_implementation", None) != "deltakit_prefix"
               for m in model.modules()), "an attention module kept the wrapper's config"
    assert_pristine(model, ref, batch, flags)
    return h


# ---- lifecycle -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mlp", [0, 8], ids=["direct", "mlp"])
@pytest.mark.parametrize("family", tm.FAMILIES)
def test_prefix_lifecycle(family, mlp, tmp_path):
    spec = f"prefix(n=3,mlp={mlp})@attn" + (",cross" if family in ENC_DEC else "")
    attn, cross = attention_layout(family, tm.config(family))
    each = (lambda d, kv: 3 * d + d * mlp + mlp + mlp * 2 * kv + 2 * kv) if mlp else (lambda d, kv: 2 * 3 * kv)
    check_lifecycle(family, spec, sum(each(d, kv) for d, kv in attn + cross), tmp_path)


def test_prefix_refuses_projections():
    with pytest.raises(deltakit.KindError, match="attention"):
        deltakit.plan(tm.make("llama"), "prefix@attn.q")


# ---- padding: each example as if alone ----------------------------------------------------------

def _rows(family, side):
    """Two sequences of different lengths, padded on `side`, and each alone."""
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(2, tm.VOCAB, (7,), generator=g), torch.randint(2, tm.VOCAB, (4,), generator=g)
    pad = 0 if family in ("cpmant", "t5", "mt5") else 1
    width = len(long)
    ids = torch.full((2, width), pad)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, seq in enumerate((long, short)):
        sl = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[b, sl], mask[b, sl] = seq, 1
    return ids, mask, (long, short)


def _batch(family, ids, mask):
    if family in ENC_DEC:
        dec = torch.tensor([[0, 5, 9, 3]]).expand(ids.shape[0], -1)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    if family == "cpmant":
        return {"input_ids": ids}   # pads are id 0 on the left; CpmAnt masks them itself
    return {"input_ids": ids, "attention_mask": mask}


def _real(family, out, mask_row, side):
    """The outputs at a row's real tokens (all of them for sequence-level or decoder outputs)."""
    if family in ENC_DEC or out.dim() == 1:
        return out
    return out[mask_row.bool()]


PAD_SIDES = [(f, "right") for f in tm.FAMILIES if f != "cpmant"] + [("llama", "left"), ("gpt2", "left"), ("cpmant", "left")]


def check_padding(family, side, spec, std=0.3):
    model = tm.make(family)
    ids, mask, seqs = _rows(family, side)
    outs = {}
    for attached in (False, True):
        if attached:
            h = deltakit.attach(model, spec)
            randomise(h, std=std)
        batched = run(model, _batch(family, ids, mask))
        for b, seq in enumerate(seqs):
            if not attached and (family, side) == ("gpt2", "left"):
                continue   # bare GPT-2 numbers left pads as positions; with prefix deltas deltakit does not
            alone = run(model, _batch(family, seq[None], torch.ones(1, len(seq), dtype=torch.long)))[0]
            got = _real(family, batched[b], mask[b], side)
            torch.testing.assert_close(got, _real(family, alone, torch.ones(len(seq)), side), rtol=1e-4, atol=1e-4)
        outs[attached] = batched
    assert not torch.allclose(outs[True], outs[False], atol=1e-3)


@pytest.mark.parametrize("family,side", PAD_SIDES)
def test_prefix_padded_batch_equals_each_example_alone(family, side):
    check_padding(family, side, "prefix(n=3)@attn" + (",cross" if family in ENC_DEC else ""))


# ---- generation: with the cache as without -----------------------------------------------------------

def generate(model, ids, mask, use_cache):
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=use_cache, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    if mask is not None:
        kw["attention_mask"] = mask
    if model.config.is_encoder_decoder:
        kw["decoder_start_token_id"] = 0
    out = model.generate(ids, **kw)
    return out.sequences, torch.stack(out.scores)


def check_generation(family, spec, std=0.5, side="left"):
    model = tm.make(family)
    h = deltakit.attach(model, spec)
    randomise(h, std=std)
    ids, mask, seqs = _rows(family, side)
    with torch.no_grad():
        cached, cached_scores = generate(model, ids, mask, True)
        plain, plain_scores = generate(model, ids, mask, False)
        assert cached.tolist() == plain.tolist()
        torch.testing.assert_close(cached_scores, plain_scores, rtol=1e-4, atol=1e-4)
        with h.disabled():
            _, bare_scores = generate(model, ids, mask, True)
        for step, (bare, got) in enumerate(zip(bare_scores, cached_scores)):   # the join is in every step
            assert not torch.allclose(bare, got, atol=1e-3), f"the delta changes nothing at step {step}"
        if side == "left":   # left padding changes nothing either
            alone, alone_scores = generate(model, seqs[1][None], torch.ones(1, len(seqs[1]), dtype=torch.long), True)
            assert cached[1, -6:].tolist() == alone[0, -6:].tolist()
            torch.testing.assert_close(cached_scores[:, 1], alone_scores[:, 0], rtol=1e-4, atol=1e-4)


GENERATIVE = ("gpt2", "llama", "t5", "mt5", "bart", "mbart")   # tiny families with generate(); transformers' CpmAnt below


@pytest.mark.parametrize("family", GENERATIVE)
def test_prefix_generation_with_cache_equals_without(family):
    side = "right" if family in ENC_DEC else "left"
    check_generation(family, "prefix(n=3)@attn" + (",cross" if family in ENC_DEC else ""), side=side)


def check_cpmant_first_step(spec):
    """transformers' CpmAnt attends bidirectionally, so its own cached and uncached generation differ
    (the bare model's too); the delta must still give the cached step the full forward's logits,
    those logits must differ from the bare model's, and the cache holds the real tokens only."""
    model = tm.make("cpmant")
    ids = torch.randint(2, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bare = model(ids, use_cache=True).logits
    h = deltakit.attach(model, spec)
    randomise(h, std=0.5)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids, use_cache=True)
        torch.testing.assert_close(out.logits, full)
        assert not torch.allclose(out.logits, bare, atol=1e-3), "the delta changes nothing in the cached step"
        cache = hf_compat.output_cache(out)
        assert cache.get_seq_length() == model.config.prompt_length + 6, "the cache holds the prefix (or misses tokens)"
    h.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=True).logits, bare, rtol=0, atol=0)


def test_transformers_cpmant_first_step_matches_full_forward():
    check_cpmant_first_step("prefix(n=3)@attn")


# ---- native CPM-Ant: the kv_prefix hook point ----------------------------------------------------

def native_tiny():
    from test_cpmant import tiny
    return tiny()


def test_native_cpmant_prefix_joins_through_kv_prefix_and_generates_with_cache(tmp_path):
    from deltakit.backbones import cpmant_generate as gen
    model = native_tiny()
    ref = native_tiny()
    attn = model.encoder.layers[0].self_att.self_attention
    sources = [[5, 6, 7, 8, 9], [10, 11]]
    bare = gen.greedy(model, sources, max_new_tokens=6)
    h = deltakit.attach(model, "prefix(n=4)@attn")
    cfg = model.config
    assert h.num_trainable == cfg.num_layers * 2 * 4 * cfg.num_heads * cfg.dim_head
    assert callable(attn.kv_prefix)
    randomise(h, std=1.0)
    cached = gen.greedy(model, sources, max_new_tokens=6)
    assert cached != bare
    assert cached == gen.greedy(model, sources, max_new_tokens=6, use_cache=False)
    assert cached == [gen.greedy(model, [s], max_new_tokens=6)[0] for s in sources]   # padding changes nothing
    x = model.inputs(sources)
    loss_of(model(**x)[0]).backward()
    assert all(p.grad is not None for p in h.parameters())
    assert all(p.grad is None for _, p in backbone_params(model))
    h.detach()
    assert attn.kv_prefix is None
    assert gen.greedy(model, sources, max_new_tokens=6) == bare
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_kv_prefix_attribute_is_used_on_a_stand_in_module():
    """Any attention module with a `kv_prefix` attribute gets the prefix through it (data-driven)."""
    from deltakit.joins import prefix as pj
    native, llama, cpmant = native_tiny(), tm.make("llama"), tm.make("cpmant")
    fam = deltakit.positions(cpmant).family
    assert fam.prefix_cache == ("CpmAntAttention",)   # data in the family table, not a class check
    assert pj.prefix_joiner(native.encoder.layers[0].self_att.self_attention, fam) is pj.NativeSite
    assert pj.prefix_joiner(llama.model.layers[0].self_attn, deltakit.positions(llama).family) is pj.InterfaceSite
    assert pj.prefix_joiner(cpmant.cpmant.encoder.layers[0].self_att.self_attention, fam) is pj.CacheSite
    assert pj.prefix_joiner(cpmant.cpmant.encoder.layers[0].self_att.self_attention, None) is None


@pytest.mark.parametrize("spec", ["prefix(n=4)@attn", "prefix(n=4,mlp=16)@attn", "prompt(n=4)"])
def test_tiny_training_fits_labels(spec):
    """A few dozen steps of the deltas alone move a frozen tiny XLM-R to answer class 2 on inputs it
    classifies every way (the delta must reach the classifier through attention)."""
    torch.manual_seed(0)
    model = tm.make("xlmr")
    h = deltakit.attach(model, spec)
    ids = torch.randint(2, tm.VOCAB, (16, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.full((16,), 2)
    opt = torch.optim.Adam(h.parameters(), lr=0.1 if spec.startswith("prompt") else 3e-2)
    losses = []
    for _ in range(80):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if spec.startswith("prompt"):   # 4 input vectors through a 2-layer random model: a weaker lever
        assert losses[-1] < 0.75 * losses[0], (losses[0], losses[-1])
        return
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    with torch.no_grad():
        assert (model(input_ids=ids).logits.argmax(-1) == 2).float().mean() >= 0.9
