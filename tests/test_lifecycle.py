"""Handle lifecycle beyond one delta on one model: several named handles, fused-projection slices,
encoder/decoder targeting, layer ranges and regexes, a 10B CpmAnt plan on the meta device,
gradient checkpointing with a frozen backbone, summaries, wrong-backbone checkpoints, bf16."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import resource

import pytest
import torch

import deltakit
import tiny_models as tm
from test_families import assert_pristine, backbone_params, loss_of, randomise


def run(model, batch):
    with torch.no_grad():
        return tm.run(model, batch)


# ---- several named handles on one model ---------------------------------------------------------

@pytest.mark.parametrize("family", tm.FAMILIES)
def test_two_named_handles_detach_one_then_the_other(family):
    ref, model, batch = tm.make(family), tm.make(family), tm.inputs(family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    y0 = run(model, batch)
    a = deltakit.attach(model, "lora(r=2,alpha=4)@attn.q,attn.v", name="a")
    b = deltakit.attach(model, "adapter(dim=8)@attn,ffn", name="b")
    assert deltakit.handles(model) == {"a": a, "b": b} and deltakit.get(model, "b") is b
    with pytest.raises(deltakit.HandleError, match="already attached"):
        deltakit.attach(model, "bitfit", name="a")
    randomise(a, seed=1)
    randomise(b, seed=2)
    y_ab = run(model, batch)
    with a.disabled():
        y_b = run(model, batch)
    with b.disabled():
        y_a = run(model, batch)
    for x, z in ((y_ab, y_a), (y_ab, y_b), (y_a, y_b), (y_a, y0), (y_b, y0)):
        assert not torch.allclose(x, z, atol=1e-4)

    a_modules = {id(e.module) for e in a.entries}
    a.detach()
    assert deltakit.handles(model) == {"b": b}
    assert torch.equal(run(model, batch), y_b)
    assert all(not p.requires_grad for _, p in backbone_params(model)), "b still needs a frozen backbone"
    left = {id(m) for m in model.modules()}
    assert not a_modules & left and all(id(e.module) in left for e in b.entries)
    loss_of(tm.run(model, batch)).backward()
    assert all(p.grad is not None for p in b.parameters())
    assert all(p.grad is None for _, p in backbone_params(model))
    with b.disabled():
        assert torch.equal(run(model, batch), y0)

    b.detach()
    assert_pristine(model, ref, batch, flags)


def test_merged_handles_on_shared_sites_detach_cleanly():
    ref, model, batch = tm.make("t5"), tm.make("t5"), tm.inputs("t5")
    a = deltakit.attach(model, "lnfit@ln.*; lora(r=2)@cross.q", name="a")
    b = deltakit.attach(model, "bitfit@ln.*; lora(r=4)@cross.q", name="b")   # the same modules as `a`
    randomise(a, seed=1)
    randomise(b, seed=2)
    y_ab = run(model, batch)
    with b.disabled():
        y_a = run(model, batch)
    assert not torch.allclose(y_a, y_ab, atol=1e-4)
    assert a.merge() == [] and b.merge() == [e.key for e in b.entries if e.type.name == "bitfit"]
    torch.testing.assert_close(run(model, batch), y_ab, rtol=1e-5, atol=1e-5)
    b.detach()   # the later handle first, while `a` stays merged
    torch.testing.assert_close(run(model, batch), y_a, rtol=1e-5, atol=1e-5)
    with pytest.raises(deltakit.HandleError, match="unmerge"):
        with a.disabled():
            pass
    a.unmerge()
    torch.testing.assert_close(run(model, batch), y_a, rtol=1e-5, atol=1e-5)
    a.detach()
    for k, v in model.state_dict().items():   # un-merging is exact only up to float rounding
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=0, atol=1e-6)
    assert deltakit.handles(model) == {}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ---- GPT-2: q/k/v are slices of the fused c_attn --------------------------------------------------

def test_gpt2_lora_on_query_changes_only_the_query_slice():
    model, batch = tm.make("gpt2"), tm.inputs("gpt2")
    d = model.config.n_embd
    c_attn = model.transformer.h[0].attn.c_attn
    h = deltakit.attach(model, "lora(r=4,alpha=8)@attn.q")
    randomise(h)
    seen = []
    probe = c_attn.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        run(model, batch)
        with h.disabled():
            run(model, batch)
    finally:
        probe.remove()
    with_lora, bare = seen
    assert not torch.allclose(with_lora[..., :d], bare[..., :d])
    assert torch.equal(with_lora[..., d:], bare[..., d:]), "keys and values must not change"

    y = run(model, batch)
    w0 = c_attn.weight.detach().clone()   # HF Conv1D: (in, out), the query is columns [0, d)
    assert h.merge() == []
    dw = c_attn.weight.detach() - w0
    assert dw[:, :d].abs().max() > 0
    assert torch.equal(dw[:, d:], torch.zeros_like(dw[:, d:]))
    lora = h.entries[0].module
    torch.testing.assert_close(dw[:, :d], (lora.lora_B @ lora.lora_A).t().detach() * 8 / 4, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(model, batch), y, rtol=1e-5, atol=1e-5)


def test_gpt2_lora_on_q_k_v_merges_each_slice():
    model, batch = tm.make("gpt2"), tm.inputs("gpt2")
    d = model.config.n_embd
    h = deltakit.attach(model, "lora(r=2,alpha=6)@attn.q,attn.k,attn.v")
    assert len(h.entries) == 3 * model.config.n_layer
    randomise(h)
    y = run(model, batch)
    before = [blk.attn.c_attn.weight.detach().clone() for blk in model.transformer.h]
    assert h.merge() == []
    for layer, blk in enumerate(model.transformer.h):
        want = torch.zeros_like(before[layer])
        for part, name in enumerate(("q", "k", "v")):
            e = next(e for e in h.entries if e.position.name == f"layers.{layer}.attn.{name}")
            want[:, part * d:(part + 1) * d] = (e.module.lora_B @ e.module.lora_A).t().detach() * 3
        torch.testing.assert_close(blk.attn.c_attn.weight.detach() - before[layer], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(model, batch), y, rtol=1e-5, atol=1e-5)
    h.unmerge()
    torch.testing.assert_close(run(model, batch), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,spec", [("gpt2", "full@head"), ("gpt2", "lora(r=2)@head"),
                                         ("t5", "full@head"), ("bert", "full@head")])
def test_deltas_on_a_tied_head_stay_live_on_merge(family, spec):
    """The LM head shares its weight with the input embedding: folding a head delta into it would
    also move the embedding, so merge() leaves it live and the output stays the same."""
    model, batch = tm.make(family), tm.inputs(family)
    emb = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is emb
    h = deltakit.attach(model, spec)
    randomise(h)
    y = run(model, batch)
    before = emb.detach().clone()
    assert h.merge() == [e.key for e in h.entries]
    assert torch.equal(emb, before)
    torch.testing.assert_close(run(model, batch), y, rtol=1e-5, atol=1e-5)


# ---- T5/MT5: stacks and cross attention ----------------------------------------------------------

def _encode(model, batch):
    with torch.no_grad():
        return model.get_encoder()(input_ids=batch["input_ids"]).last_hidden_state


def _decode(model, batch, enc):
    with torch.no_grad():
        return model.get_decoder()(input_ids=batch["decoder_input_ids"], encoder_hidden_states=enc).last_hidden_state


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_t5_decoder_cross_targets_only_cross_attention(family):
    model, batch = tm.make(family), tm.inputs(family)
    h = deltakit.attach(model, "lora(r=2,alpha=4)@decoder.cross.*")
    L = model.config.num_decoder_layers
    assert sorted(e.position.name for e in h.entries) == sorted(
        f"decoder.layers.{i}.cross.{p}" for i in range(L) for p in "qkvo")
    assert all(".EncDecAttention." in e.position.path and e.position.path.startswith("decoder.") for e in h.entries)
    randomise(h)
    enc = _encode(model, batch)
    with h.disabled():
        assert torch.equal(_encode(model, batch), enc), "the encoder must not change"
        dec0 = _decode(model, batch, enc)
    assert not torch.allclose(_decode(model, batch, enc), dec0, atol=1e-4)
    # `cross.*` without a stack means the same positions; the encoder has no cross attention
    assert [p.position for p in deltakit.plan(model, "lora@cross.*")] == [e.position for e in h.entries]
    with pytest.raises(deltakit.PatternError):
        deltakit.plan(model, "lora@encoder.cross.q")


@pytest.mark.parametrize("family", ["t5", "mt5"])
def test_t5_encoder_pattern_targets_only_the_encoder(family):
    model, batch = tm.make(family), tm.inputs(family)
    h = deltakit.attach(model, "lora(r=2,alpha=4)@encoder.attn.q")
    assert [e.position.name for e in h.entries] == [f"encoder.layers.{i}.attn.q" for i in range(model.config.num_layers)]
    assert all(e.position.path.startswith("encoder.block.") and e.position.path.endswith("SelfAttention.q")
               for e in h.entries)
    randomise(h)
    enc = _encode(model, batch)
    with h.disabled():
        enc0 = _encode(model, batch)
        dec0 = _decode(model, batch, enc0)
    assert not torch.allclose(enc, enc0, atol=1e-4)
    assert torch.equal(_decode(model, batch, enc0), dec0), "the decoder must not change"
    # without a stack, attn.q is both stacks' self-attention (and never cross attention)
    both = [p.position.name for p in deltakit.plan(model, "lora@attn.q")]
    assert both == [f"{s}.layers.{i}.attn.q" for s in ("encoder", "decoder") for i in range(2)]


def test_mt5_gated_ffn_positions():
    model = tm.make("mt5")
    h = deltakit.attach(model, "lora(r=2)@decoder.ffn.gate,decoder.ffn.in")
    paths = sorted(e.position.path for e in h.entries)
    assert paths == sorted(f"decoder.block.{i}.layer.2.DenseReluDense.{w}" for i in range(2) for w in ("wi_0", "wi_1"))
    with pytest.raises(deltakit.PatternError):   # T5 v1.0 has one `wi`: no gate
        deltakit.plan(tm.make("t5"), "lora@ffn.gate")


# ---- layer ranges and regexes ---------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "cpmant", "gpt2", "t5"])
def test_layer_ranges_select_layers(family):
    model = tm.make(family)
    first = [(p.position.stack, p.position.layer) for p in deltakit.plan(model, "lora@layers.0-0.attn.q")]
    second = [(p.position.stack, p.position.layer) for p in deltakit.plan(model, "lora@layers.1.attn.q")]
    both = [p.position.layer for p in deltakit.plan(model, "lora@layers.0-1.attn.q")]
    stacks = ["encoder", "decoder"] if family == "t5" else [None]
    assert first == [(s, 0) for s in stacks]
    assert second == [(s, 1) for s in stacks]
    assert sorted(both) == sorted([0, 1] * len(stacks))
    with pytest.raises(deltakit.PatternError):
        deltakit.plan(model, "lora@layers.5.attn.q")


def test_layer_range_changes_only_later_layers():
    model, batch = tm.make("llama"), tm.inputs("llama")
    with torch.no_grad():
        bare = model(**batch, output_hidden_states=True).hidden_states
    for spec, first_changed in (("lora(r=2)@layers.0-0.attn.q", 1), ("lora(r=2)@layers.1.attn.q", 2)):
        h = deltakit.attach(model, spec)
        randomise(h)
        with torch.no_grad():
            hs = model(**batch, output_hidden_states=True).hidden_states
        for i in range(first_changed):
            assert torch.equal(hs[i], bare[i]), (spec, i)
        assert not torch.allclose(hs[first_changed], bare[first_changed], atol=1e-4), spec
        h.detach()


def test_regex_patterns_match_raw_module_paths():
    llama = tm.make("llama")
    h = deltakit.attach(llama, r"lora(r=2)@re:model\.layers\.1\.self_attn\.(q|v)_proj")
    assert [e.position.name for e in h.entries] == ["layers.1.attn.q", "layers.1.attn.v"]   # canonical names kept
    assert h.num_trainable == 2 * (32 + 32) + 2 * (32 + 16)

    t5 = tm.make("t5")
    names = [p.position.name for p in deltakit.plan(t5, r"bitfit@re:.*\.DenseReluDense\.wo")]
    assert names == [f"{s}.layers.{i}.ffn.out" for s in ("encoder", "decoder") for i in range(2)]

    xlmr, batch = tm.make("xlmr"), tm.inputs("xlmr")   # a module that no canonical position names
    h = deltakit.attach(xlmr, r"lora(r=2,alpha=4)@re:classifier\.dense")
    assert [e.position.path for e in h.entries] == ["classifier.dense"]
    assert h.num_trainable == 2 * (32 + 32)
    randomise(h)
    y = run(xlmr, batch)
    with h.disabled():
        assert not torch.allclose(run(xlmr, batch), y, atol=1e-4)
    with pytest.raises(deltakit.PatternError):
        deltakit.plan(xlmr, r"lora@re:classifier\.nothing")


# ---- a 10B CpmAnt on the meta device --------------------------------------------------------------

def test_cpmant_10b_lora_count_on_meta_device():
    import transformers as tf
    cfg = tf.CpmAntConfig(vocab_size=30720, hidden_size=4096, num_attention_heads=32, dim_head=128, dim_ff=10240,
                          num_hidden_layers=48, prompt_types=32, prompt_length=32, segment_types=32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    with torch.device("meta"):
        model = tf.CpmAntForCausalLM(cfg)
    spec = "lora(r=8,alpha=16)@attn.q,attn.v"
    want = 48 * 2 * 8 * (4096 + 32 * 128)   # layers x {q, v} x r * (in + out)
    assert want == 6_291_456
    assert sum(p.num_params for p in deltakit.plan(model, spec)) == want
    h = deltakit.attach(model, spec)
    assert h.num_trainable == want == h.num_params
    assert all(p.is_meta for p in h.parameters()) and all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for _, p in backbone_params(model)) > 9e9
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert grown_mib < 1024, f"{grown_mib:.0f} MiB: something was materialised"
    text = h.summary()
    assert "layers.0-47.attn.q" in text and "layers.0-47.attn.v" in text and "6,291,456" in text
    h.detach()


# ---- gradient checkpointing with a frozen backbone ---------------------------------------------

def _delta_grads(model, h, batch):
    """Delta gradients of one step, and how often an inner projection ran (2 when recomputed)."""
    for p in h.parameters():
        p.grad = None
    calls = []
    inner = model.get_submodule(h.entries[0].position.path)
    probe = inner.register_forward_hook(lambda *_: calls.append(1))
    try:
        loss_of(tm.run(model, batch)).backward()
    finally:
        probe.remove()
    assert all(p.grad is None for _, p in backbone_params(model))
    return {n: p.grad.clone() for n, p in h.named_parameters()}, len(calls)


@pytest.mark.parametrize("hf_input_grads", [True, False], ids=["hf-input-grads", "deltakit-only"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing_with_frozen_backbone(family, reentrant, hf_input_grads):
    model, batch = tm.make(family, train=True), tm.inputs(family)   # dropout is 0 in the tiny configs
    h = deltakit.attach(model, "lora(r=2,alpha=4)@attn.q,attn.v; parallel_adapter(dim=4)@attn; "
                               "adapter(dim=4)@ffn; lnfit@ln.ffn")
    randomise(h)
    want, runs = _delta_grads(model, h, batch)
    assert runs == 1
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if not hf_input_grads:   # transformers makes the embeddings' output require grad; without that
        model.disable_input_require_grads()   # hook, deltakit's own must keep reentrant checkpoints alive
    assert model.is_gradient_checkpointing
    got, runs = _delta_grads(model, h, batch)
    assert runs == 2, "the layer was not recomputed: checkpointing is not active"
    assert list(got) == list(want)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)
    model.gradient_checkpointing_disable()
    if hf_input_grads:   # transformers leaves its own embedding hook in place
        model.disable_input_require_grads()
    h.detach()
    assert all(not m._forward_hooks for m in model.modules())


# ---- summary, wrong backbones, bf16 --------------------------------------------------------------

def test_summary_names_positions_and_totals():
    model = tm.make("llama")
    h = deltakit.attach(model, "lora(r=4,alpha=8)@attn.q,attn.v; adapter(dim=8)@ffn; full@head")
    text = h.summary()
    for where in ("layers.0-1.attn.q", "layers.0-1.attn.v", "layers.0-1.ffn", "head"):
        assert where in text, where
    for word in ("lora", "adapter", "full", "r=4", "dim=8"):
        assert word in text, word
    backbone = sum(p.numel() for _, p in backbone_params(model))
    assert f"{h.num_trainable:,}" in text and f"{backbone:,}" in text
    # per layer: lora on q (32 -> 32) and on v (32 -> 16, GQA); adapter on ffn (d=32); head 32 x 96
    assert h.num_trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16) + 2 * 32 * 8 + 8 + 32) + 32 * 96


@pytest.mark.parametrize("other,what", [
    ({"num_hidden_layers": 3}, ["layers.2", "only here"]),
    ({"hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}, ["(32, 32)", "(48, 48)", "shapes"]),
])
def test_loading_into_a_different_backbone_says_what_differs(tmp_path, other, what):
    model = tm.make("llama")
    h = deltakit.attach(model, "lora(r=2,alpha=4)@attn.q,attn.v; lnfit@ln.*")
    randomise(h)
    h.save(tmp_path / "ckpt")
    target = tm.make("llama", **other)
    ref = tm.make("llama", **other)
    with pytest.raises(deltakit.CheckpointError) as err:
        deltakit.load(target, tmp_path / "ckpt")
    message = str(err.value)
    for word in what:
        assert word in message, (word, message)
    assert "LlamaForCausalLM" in message
    assert_pristine(target, ref, tm.inputs("llama"))   # a failed load leaves nothing behind


def test_bf16_llama_with_lnfit_and_lora():
    model, batch = tm.make("llama", dtype=torch.bfloat16), tm.inputs("llama")
    y0 = run(model, batch)
    h = deltakit.attach(model, "lnfit; lora(r=4,alpha=8)@attn.q,attn.v")
    assert {p.dtype for p in h.parameters()} == {torch.float32}
    assert {p.dtype for _, p in backbone_params(model)} == {torch.bfloat16}
    randomise(h, std=0.2)
    y = tm.run(model, batch)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert not torch.equal(y.detach(), y0)
    loss_of(y).backward()
    assert all(p.grad is None for _, p in backbone_params(model))
    for name, p in h.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    torch.optim.SGD(h.parameters(), lr=1e-2).step()
    assert {p.dtype for p in h.parameters()} == {torch.float32}
