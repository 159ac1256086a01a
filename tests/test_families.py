"""Every delta type on a tiny random model of every supported family: attach, forward, backward,
closed-form parameter counts, save/load, detach, merge/unmerge, disabled()."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import warnings

import pytest
import torch

import deltakit
import tiny_models as tm

SPECS = {
    "lora": "lora(r=2,alpha=4)@attn.*,ffn.*",
    "adapter": "adapter(dim=8)",                          # default placement: attn,ffn
    "parallel_adapter": "parallel_adapter(dim=8)@attn,ffn",
    "lowrank_adapter": "lowrank_adapter(dim=8,rank=2)",   # default placement: attn,ffn
    "bitfit": "bitfit",                                   # default placement: attn.*,ffn.*,ln.*
    "lnfit": "lnfit",                                     # default placement: ln.*
    "full@head": "full@head",
    "mixed": ("lora(r=2,alpha=4)@attn.q,attn.o; bitfit@attn.o,ln.*; lnfit@ln.*; adapter(dim=4)@ffn; "
              "parallel_adapter(dim=4)@attn; lowrank_adapter(dim=4,rank=1)@ffn.out; full@head"),
}
SEQUENTIAL = {"adapter", "parallel_adapter", "lowrank_adapter"}   # never fold into the weights
CASES = [(f, d) for f in tm.FAMILIES for d in SPECS]


# ---- helpers -----------------------------------------------------------------------------------

def randomise(handle, seed=0, std=0.05):
    """Deltas start with zero effect; give them random values so every check below can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(handle.named_parameters()):
            p.copy_(std * torch.randn(p.shape, generator=g).to(p.dtype))


def loss_of(y):
    g = torch.Generator().manual_seed(99)
    return (y.float() * torch.randn(y.shape, generator=g)).sum()


def backbone_params(model):
    return [(n, p) for n, p in model.named_parameters() if "deltakit" not in n.split(".")]


def assert_pristine(model, ref, batch, flags=None):
    """`model` is exactly `ref`: outputs, state_dict, no hooks, no deltakit modules, flags."""
    assert deltakit.handles(model) == {}
    sd, rsd = model.state_dict(), ref.state_dict()
    assert list(sd) == list(rsd)
    for key in rsd:
        assert torch.equal(sd[key], rsd[key]), key
    for name, module in model.named_modules():
        assert "deltakit" not in name.split("."), name
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name!r}"
        assert not module._backward_hooks and not getattr(module, "_forward_hooks_with_kwargs", {}), name
        assert "_deltakit_site" not in module.__dict__, name
    if flags is not None:
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(tm.run(model, batch), tm.run(ref, batch))


# ---- closed-form parameter counts, from the config alone ----------------------------------------

def layout(family, cfg):
    """Per-stack (layers, {local: (in, out) for a projection | width for a norm}), the model-level
    norms, the hidden size, and the parameters of the head, all read from the HF config."""
    if family in ("bert", "xlmr"):
        d, ff, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        layer = {"attn.q": (d, d), "attn.k": (d, d), "attn.v": (d, d), "attn.o": (d, d), "ffn.in": (d, ff),
                 "ffn.out": (ff, d), "ln.attn": d, "ln.ffn": d}
        if family == "bert":   # MLM head: transform dense + LayerNorm, decoder (tied to the embedding) + bias
            head = d * d + d + 2 * d + V * d + V
        else:                  # RobertaClassificationHead: dense + out_proj
            head = d * d + d + d * cfg.num_labels + cfg.num_labels
        return {None: (cfg.num_hidden_layers, layer)}, {"ln.embed": d}, d, head
    if family == "gpt2":
        d, ff = cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd
        layer = {"attn.q": (d, d), "attn.k": (d, d), "attn.v": (d, d),   # the three slices of c_attn
                 "attn.o": (d, d), "ffn.in": (d, ff), "ffn.out": (ff, d), "ln.attn": d, "ln.ffn": d}
        return {None: (cfg.n_layer, layer)}, {"ln.final": d}, d, cfg.vocab_size * d
    if family in ("t5", "mt5"):
        d, inner, ff = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
        attn = {"attn.q": (d, inner), "attn.k": (d, inner), "attn.v": (d, inner), "attn.o": (inner, d),
                "ln.attn": d}
        ffn = {"ffn.in": (d, ff), "ffn.out": (ff, d), "ln.ffn": d}
        if cfg.is_gated_act:
            ffn["ffn.gate"] = (d, ff)
        cross = {"cross.q": (d, inner), "cross.k": (d, inner), "cross.v": (d, inner), "cross.o": (inner, d),
                 "ln.cross": d}
        stacks = {"encoder": (cfg.num_layers, {**attn, **ffn}),
                  "decoder": (cfg.num_decoder_layers, {**attn, **cross, **ffn})}
        return stacks, {"encoder.ln.final": d, "decoder.ln.final": d}, d, cfg.vocab_size * d
    if family in ("bart", "mbart"):   # mBART adds a final LayerNorm to each stack
        d, V = cfg.d_model, cfg.vocab_size
        attn = {"attn.q": (d, d), "attn.k": (d, d), "attn.v": (d, d), "attn.o": (d, d), "ln.attn": d}
        cross = {"cross.q": (d, d), "cross.k": (d, d), "cross.v": (d, d), "cross.o": (d, d), "ln.cross": d}
        ffn = lambda ff: {"ffn.in": (d, ff), "ffn.out": (ff, d), "ln.ffn": d}
        stacks = {"encoder": (cfg.encoder_layers, {**attn, **ffn(cfg.encoder_ffn_dim)}),
                  "decoder": (cfg.decoder_layers, {**attn, **cross, **ffn(cfg.decoder_ffn_dim)})}
        top = {f"{s}.ln.{n}": d for s in stacks for n in (("embed", "final") if family == "mbart" else ("embed",))}
        return stacks, top, d, V * d
    if family == "llama":
        d, ff, H, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or d // H
        layer = {"attn.q": (d, H * hd), "attn.k": (d, kv * hd), "attn.v": (d, kv * hd), "attn.o": (H * hd, d),
                 "ffn.gate": (d, ff), "ffn.in": (d, ff), "ffn.out": (ff, d), "ln.attn": d, "ln.ffn": d}
        return {None: (cfg.num_hidden_layers, layer)}, {"ln.final": d}, d, cfg.vocab_size * d
    if family == "cpmant":
        d, inner, ff = cfg.hidden_size, cfg.num_attention_heads * cfg.dim_head, cfg.dim_ff
        layer = {"attn.q": (d, inner), "attn.k": (d, inner), "attn.v": (d, inner), "attn.o": (inner, d),
                 "ffn.gate": (d, ff), "ffn.in": (d, ff), "ffn.out": (ff, d), "ln.attn": d, "ln.ffn": d}
        return {None: (cfg.num_hidden_layers, layer)}, {"ln.final": d}, d, cfg.vocab_size * d
    raise ValueError(family)


def per_layer(stacks, fn):
    """sum over every stack and layer of fn(stack, layer table)"""
    return sum(n * fn(stack, table) for stack, (n, table) in stacks.items())


def expected_count(family, delta, cfg):
    stacks, top_norms, d, head = layout(family, cfg)
    lin = lambda t, *pre: [v for k, v in t.items() if isinstance(v, tuple) and k.startswith(pre)]
    norms = lambda t: [v for k, v in t.items() if k.startswith("ln.")]
    lora = lambda r, shapes: sum(r * (i + o) for i, o in shapes)
    adapter = lambda dim: 2 * d * dim + dim + d
    parallel = lambda dim: d * dim + dim + dim * d + d
    lowrank = lambda dim, rank: 2 * rank * (d + dim) + dim + d
    if delta == "lora":
        return per_layer(stacks, lambda s, t: lora(2, lin(t, "attn.", "ffn.")))
    if delta == "adapter":        # attn and ffn sub-blocks (cross attention is not `attn`)
        return per_layer(stacks, lambda s, t: 2 * adapter(8))
    if delta == "parallel_adapter":
        return per_layer(stacks, lambda s, t: 2 * parallel(8))
    if delta == "lowrank_adapter":
        return per_layer(stacks, lambda s, t: 2 * lowrank(8, 2))
    if delta == "bitfit":         # output width of every attn./ffn. projection and every norm
        return (per_layer(stacks, lambda s, t: sum(o for _, o in lin(t, "attn.", "ffn.")) + sum(norms(t)))
                + sum(top_norms.values()))
    if delta == "lnfit":
        return per_layer(stacks, lambda s, t: sum(norms(t))) + sum(top_norms.values())
    if delta == "full@head":
        return head
    if delta == "mixed":
        return (per_layer(stacks, lambda s, t: lora(2, [t["attn.q"], t["attn.o"]]) + t["attn.o"][1]
                          + 2 * sum(norms(t)) + adapter(4) + parallel(4) + lowrank(4, 1))
                + 2 * sum(top_norms.values()) + head)
    raise ValueError(delta)


# ---- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family,delta", CASES)
def test_forward_backward_only_deltas_get_gradients(family, delta):
    model = tm.make(family)
    batch = tm.inputs(family)
    with torch.no_grad():
        y0 = tm.run(model, batch)
    h = deltakit.attach(model, SPECS[delta])
    assert all(not p.requires_grad for _, p in backbone_params(model))
    assert h.parameters() and all(p.requires_grad and p.dtype == torch.float32 for p in h.parameters())
    with torch.no_grad():
        assert torch.equal(tm.run(model, batch), y0), "a freshly attached delta must not change the output"
    randomise(h)
    y = tm.run(model, batch)
    assert not torch.allclose(y, y0, atol=1e-4), "random deltas must change the output"
    loss_of(y).backward()
    grads_of_backbone = [n for n, p in backbone_params(model) if p.grad is not None]
    assert grads_of_backbone == []
    for name, p in h.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in h.parameters()) > 0


@pytest.mark.parametrize("family,delta", CASES)
def test_num_trainable_matches_closed_form(family, delta):
    model = tm.make(family)
    want = expected_count(family, delta, model.config)
    assert sum(item.num_params for item in deltakit.plan(model, SPECS[delta])) == want
    h = deltakit.attach(model, SPECS[delta])
    assert h.num_trainable == want
    assert h.num_params == want
    assert sum(p.numel() for p in h.parameters()) == want


@pytest.mark.parametrize("family,delta", CASES)
def test_save_then_load_into_fresh_model(family, delta, tmp_path):
    model = tm.make(family)
    batch = tm.inputs(family)
    h = deltakit.attach(model, SPECS[delta], name="task")
    randomise(h, seed=3)
    with torch.no_grad():
        y = tm.run(model, batch)
    h.save(tmp_path / "ckpt")

    fresh = tm.make(family, fresh=True)   # constructed again from the seed, not copied
    with torch.no_grad():
        assert not torch.equal(tm.run(fresh, batch), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # same backbone: no fingerprint warning
        h2 = deltakit.load(fresh, tmp_path / "ckpt")
    assert h2.name == "task" and deltakit.get(fresh, "task") is h2
    assert [e.key for e in h2.entries] == [e.key for e in h.entries]
    sd, sd2 = h.state_dict(), h2.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(tm.run(fresh, batch), y)


@pytest.mark.parametrize("family,delta", CASES)
def test_detach_restores_the_model_exactly(family, delta):
    ref = tm.make(family)
    model = tm.make(family)
    model.get_input_embeddings().weight.requires_grad_(False)   # a user's own frozen part stays frozen
    ref.get_input_embeddings().weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(flags.values()) and any(flags.values())
    batch = tm.inputs(family)

    h = deltakit.attach(model, SPECS[delta])
    randomise(h)
    loss_of(tm.run(model, batch)).backward()
    with torch.no_grad():
        assert not torch.equal(tm.run(model, batch), tm.run(ref, batch))
    h.detach()
    assert h.entries == []
    assert_pristine(model, ref, batch, flags)
    with pytest.raises(deltakit.HandleError):
        h.detach()


def expected_live(model, h):
    """Keys merge() must leave live: adapters; bitfit where the module has no bias; a delta whose
    weight is shared with a module outside its own (a tied LM head: folding would move the embedding)."""
    live = []
    for e in h.entries:
        target = model.get_submodule(e.position.path)
        if e.type.name in SEQUENTIAL:
            live.append(e.key)
        elif e.type.name == "bitfit" and getattr(target, "bias", None) is None:
            live.append(e.key)
        elif e.type.name in ("full", "lora", "lnfit"):
            inside = {id(m) for m in target.modules()}
            outside = {id(p) for m in model.modules() if id(m) not in inside for p in m._parameters.values()
                       if p is not None}
            if any(id(p) in outside for p in target.parameters()):
                live.append(e.key)
    return live


@pytest.mark.parametrize("family,delta", CASES)
def test_merge_and_unmerge_keep_the_output(family, delta):
    model = tm.make(family)
    batch = tm.inputs(family)
    h = deltakit.attach(model, SPECS[delta])
    randomise(h)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = tm.run(model, batch)
    live = h.merge()
    want_live = expected_live(model, h)
    assert sorted(live) == sorted(want_live)
    folded = len(h.entries) - len(live)
    assert h.merged == (folded > 0)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert bool(changed) == (folded > 0), changed
    with torch.no_grad():
        torch.testing.assert_close(tm.run(model, batch), y, rtol=1e-5, atol=1e-5)
    assert h.merge() == live   # merging twice folds nothing twice
    h.unmerge()
    assert not h.merged
    with torch.no_grad():
        torch.testing.assert_close(tm.run(model, batch), y, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,delta", CASES)
def test_disabled_runs_the_bare_model(family, delta):
    model = tm.make(family)
    batch = tm.inputs(family)
    with torch.no_grad():
        y0 = tm.run(model, batch)
    h = deltakit.attach(model, SPECS[delta])
    randomise(h)
    with torch.no_grad():
        y = tm.run(model, batch)
        assert not torch.equal(y, y0)
        with h.disabled():
            assert not h.enabled
            assert torch.equal(tm.run(model, batch), y0)
        assert h.enabled
        assert torch.equal(tm.run(model, batch), y)
