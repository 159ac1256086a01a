"""Family detection: every family table is scored over every layer list of the model, and a spec
lands on every part of it or is refused. BART/mBART (encoder, decoder, cross attention), CLIP and
LLaVA (two towers named `text` / `vision`), models that a table fits only in part, and the
position tables of the families that existed before detection was rewritten (unchanged)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

import deltakit
import tiny_models as tm
from deltakit.joins import prefix as pj
from deltakit import families as F
from test_families import backbone_params, loss_of, randomise

P = sys.modules["deltakit.positions"]   # the module (deltakit.positions is the function)
R = 4                                   # LoRA rank in the counts below: r * (in + out) per projection


def run(model, batch):
    with torch.no_grad():
        return tm.run(model, batch)


def lora_count(shapes):
    return sum(R * (i + o) for i, o in shapes)


# ---- the tables of the families that existed before are unchanged -------------------------------

def reference_models():
    """The models whose tables tests/data/positions_v0.json holds (recorded with the first-hit
    detection of commit 6d19368, before this rewrite)."""
    import transformers as tf
    from test_cpmant import tiny
    out = {f: (lambda f=f: tm.make(f)) for f in ("bert", "xlmr", "gpt2", "t5", "mt5", "llama", "cpmant")}
    out["cpmant-native"] = tiny
    out["bert-bare"] = lambda: tf.BertModel(tm.config("bert"))
    out["t5-encoder"] = lambda: tf.T5EncoderModel(tm.config("t5"))
    out["llama-cls"] = lambda: tf.LlamaForSequenceClassification(tm.config("llama", pad_token_id=0))
    out["gpt2-cls"] = lambda: tf.GPT2ForSequenceClassification(tm.config("gpt2"))
    return out


RECORDED = json.loads((Path(__file__).parent / "data" / "positions_v0.json").read_text())


@pytest.mark.parametrize("name", sorted(reference_models()))
def test_existing_family_tables_are_unchanged(name):
    """Recorded with the first detection code; one deliberate change since: native CPM-Ant's prompt
    table is a position of kind `rows` (task rows picked by id), no longer `embed`."""
    model = reference_models()[name]()
    fields = RECORDED["fields"]
    got = [[list(v) if isinstance(v, tuple) else v for v in (asdict(p)[f] for f in fields)]
           for p in deltakit.positions(model)]
    want = RECORDED["tables"][name]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == w, (g, w)
    assert getattr(deltakit.positions(model), "note", None) is None


# ---- BART and mBART: two stacks, cross attention ---------------------------------------------------

@pytest.mark.parametrize("family", ["bart", "mbart"])
def test_bart_is_read_as_bart_with_both_stacks(family):
    model = tm.make(family)
    found = P.detect(model)
    assert found.family is F.BART and found.note is None
    assert found.stacks == {"encoder": "model.encoder.layers", "decoder": "model.decoder.layers"}
    h = deltakit.attach(model, f"lora(r={R})@attn.q,attn.v")
    # 2 stacks x 2 layers x {q, v}, each (32, 32); first-hit detection read BART as a LLaMA decoder
    # and placed this on the encoder only (1,024)
    assert h.num_trainable == 2 * 2 * lora_count([(32, 32), (32, 32)]) == 2048
    assert sorted((e.position.name, e.position.path) for e in h.entries) == [
        (f"{s}.layers.{i}.attn.{p}", f"model.{s}.layers.{i}.self_attn.{p}_proj")
        for s in ("decoder", "encoder") for i in range(2) for p in "qv"]
    batch = tm.inputs(family)
    enc = model.get_encoder()
    with torch.no_grad():
        e0 = enc(input_ids=batch["input_ids"]).last_hidden_state
        y0 = tm.run(model, batch)
    randomise(h)
    with torch.no_grad():
        assert not torch.allclose(enc(input_ids=batch["input_ids"]).last_hidden_state, e0, atol=1e-4)
    h_dec = deltakit.attach(model, f"lora(r={R})@decoder.attn.q", name="dec")
    randomise(h_dec, seed=1)
    with h.disabled():
        with torch.no_grad():
            assert torch.equal(enc(input_ids=batch["input_ids"]).last_hidden_state, e0), "decoder.* moved the encoder"
            assert not torch.allclose(tm.run(model, batch), y0, atol=1e-4)


@pytest.mark.parametrize("family", ["bart", "mbart"])
def test_bart_layer_positions_and_cross_attention(family):
    model = tm.make(family)
    table = {p.name: p for p in deltakit.positions(model)}
    enc = [n[len("encoder.layers.0."):] for n in table if n.startswith("encoder.layers.0.")]
    dec = [n[len("decoder.layers.0."):] for n in table if n.startswith("decoder.layers.0.")]
    assert enc == ["attn", "attn.q", "attn.k", "attn.v", "attn.o", "ln.attn", "ffn", "ffn.in", "ffn.out", "ln.ffn"]
    assert dec == ["attn", "attn.q", "attn.k", "attn.v", "attn.o", "ln.attn", "cross", "cross.q", "cross.k", "cross.v",
                   "cross.o", "ln.cross", "ffn", "ffn.in", "ffn.out", "ln.ffn"]
    base = "model.decoder.layers.1."
    cross = table["decoder.layers.1.cross"]
    assert (cross.kind, cross.path, cross.inp, cross.out, cross.kv) == (
        "attention", base + "encoder_attn", base + "encoder_attn.q_proj", base + "encoder_attn.out_proj", 32)
    assert table["decoder.layers.1.cross.o"].path == base + "encoder_attn.out_proj"
    assert table["decoder.layers.1.ln.cross"].path == base + "encoder_attn_layer_norm"
    assert table["decoder.layers.1.ffn.in"].shape == (32, 48) and table["encoder.layers.1.ffn.in"].shape == (32, 64)
    assert table["decoder.layers.1.ffn"].path == base + "fc2"   # no FFN module: the block ends at fc2
    top = {n: p.path for n, p in table.items() if p.layer is None}
    want = {"embed": "model.shared", "encoder.ln.embed": "model.encoder.layernorm_embedding",
            "decoder.ln.embed": "model.decoder.layernorm_embedding", "head": "lm_head"}
    if family == "mbart":   # pre-norm layers, and a final LayerNorm per stack
        want |= {"encoder.ln.final": "model.encoder.layer_norm", "decoder.ln.final": "model.decoder.layer_norm"}
    assert top == want
    # every self and cross attention joins prefixes through transformers' attention interface
    for layer in model.model.decoder.layers:
        assert pj.prefix_joiner(layer.self_attn, None) is pj.InterfaceSite
        assert pj.prefix_joiner(layer.encoder_attn, None) is pj.InterfaceSite
    assert pj.prefix_joiner(model.model.encoder.layers[0].self_attn, None) is pj.InterfaceSite


@pytest.mark.parametrize("family", ["bart", "mbart"])
def test_bart_cross_deltas_change_only_the_decoder(family):
    model, batch = tm.make(family), tm.inputs(family)
    h = deltakit.attach(model, f"lora(r={R})@cross.*; prefix(n=2)@cross")
    assert sorted(e.position.name for e in h.entries) == sorted(
        [f"decoder.layers.{i}.cross.{p}" for i in range(2) for p in "qkvo"] + [f"decoder.layers.{i}.cross" for i in range(2)])
    assert h.num_trainable == 2 * (lora_count([(32, 32)] * 4) + 2 * 2 * 32)
    randomise(h)
    enc = model.get_encoder()
    with torch.no_grad():
        e = enc(input_ids=batch["input_ids"]).last_hidden_state
        y = tm.run(model, batch)
        with h.disabled():
            assert torch.equal(enc(input_ids=batch["input_ids"]).last_hidden_state, e)
            assert not torch.allclose(tm.run(model, batch), y, atol=1e-4)
    with pytest.raises(deltakit.PatternError):
        deltakit.plan(model, "lora@encoder.cross.q")
    if family == "bart":
        with pytest.raises(deltakit.PatternError, match="ln.final"):   # BART has no final norms
            deltakit.plan(model, "lnfit@ln.final")


# ---- two towers: CLIP and LLaVA -----------------------------------------------------------------

TOWER_SPECS = ["lora(r=4)@attn.q,attn.v", "adapter(dim=4)", "parallel_adapter(dim=4)@attn,ffn", "bitfit", "lnfit",
               "full@head", "prefix(n=2)@attn", "lowrank_adapter(dim=4)@ffn; lora(r=2)@vision.ffn.in"]


def tower_layouts(family):
    """Per tower: {local: (in, out)} of one layer's projections, read from the config."""
    cfg = tm.config(family)
    v, d = cfg.vision_config, cfg.text_config
    clip = lambda c: {"attn.q": (c.hidden_size,) * 2, "attn.k": (c.hidden_size,) * 2, "attn.v": (c.hidden_size,) * 2,
                      "attn.o": (c.hidden_size,) * 2, "ffn.in": (c.hidden_size, c.intermediate_size),
                      "ffn.out": (c.intermediate_size, c.hidden_size)}
    if family == "clip":
        return {"text": clip(d), "vision": clip(v)}
    hd = d.hidden_size // d.num_attention_heads
    kv = d.num_key_value_heads * hd
    return {"vision": clip(v), "text": {"attn.q": (d.hidden_size, d.hidden_size), "attn.k": (d.hidden_size, kv),
                                        "attn.v": (d.hidden_size, kv), "attn.o": (d.hidden_size, d.hidden_size),
                                        "ffn.gate": (d.hidden_size, d.intermediate_size),
                                        "ffn.in": (d.hidden_size, d.intermediate_size),
                                        "ffn.out": (d.intermediate_size, d.hidden_size)}}


@pytest.mark.parametrize("family,table,stacks", [
    ("clip", "CLIP", {"text": "text_model.encoder.layers", "vision": "vision_model.encoder.layers"}),
    ("llava", "LLAVA", {"vision": "model.vision_tower.encoder.layers", "text": "model.language_model.layers"}),
])
def test_towers_are_named_stacks(family, table, stacks):
    model = tm.make(family)
    found = P.detect(model)
    assert found.family is getattr(F, table) and found.note is None and found.stacks == stacks
    layouts = tower_layouts(family)
    plan = deltakit.plan(model, f"lora(r={R})@attn.q,attn.v")
    # a pattern without a stack is every tower's
    assert plan.num_params == sum(2 * lora_count([t["attn.q"], t["attn.v"]]) for t in layouts.values())
    assert sorted({p.position.stack for p in plan}) == ["text", "vision"]
    assert [p.position.path for p in plan if p.position.name == "vision.layers.1.attn.v"] == [
        f"{stacks['vision']}.1.self_attn.v_proj"]
    one = deltakit.plan(model, f"lora(r={R})@vision.layers.*.attn.q")
    assert [p.position.name for p in one] == ["vision.layers.0.attn.q", "vision.layers.1.attn.q"]
    assert [p.position.name for p in deltakit.plan(model, "lora@text.layers.0.attn.q")] == ["text.layers.0.attn.q"]
    assert [p.position.path for p in deltakit.plan(model, "lora@text.layers.0.ffn.out")] == [
        f"{stacks['text']}.0.{'mlp.fc2' if family == 'clip' else 'mlp.down_proj'}"]
    top = {p.name: p.path for p in deltakit.positions(model) if p.layer is None}
    if family == "clip":
        assert top == {"text.embed": "text_model.embeddings.token_embedding",
                       "text.ln.final": "text_model.final_layer_norm", "vision.ln.embed": "vision_model.pre_layrnorm",
                       "vision.ln.final": "vision_model.post_layernorm", "text.head": "text_projection",
                       "vision.head": "visual_projection"}
    else:
        assert top == {"text.embed": "model.language_model.embed_tokens", "text.ln.final": "model.language_model.norm",
                       "vision.ln.embed": "model.vision_tower.pre_layrnorm", "projector": "model.multi_modal_projector",
                       "head": "lm_head"}


def _tower_outputs(model, family, batch):
    """What each tower computes: text and image embeddings (CLIP); image features and logits (LLaVA)."""
    with torch.no_grad():
        if family == "clip":
            out = model(**batch)
            return {"text": out.text_embeds, "vision": out.image_embeds}
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return {"vision": feats, "text": model(**batch).logits}


@pytest.mark.parametrize("family", tm.TOWERS)
@pytest.mark.parametrize("tower", ["text", "vision"])
def test_a_tower_pattern_changes_only_that_tower(family, tower):
    model, batch = tm.make(family), tm.inputs(family)
    bare = _tower_outputs(model, family, batch)
    h = deltakit.attach(model, f"lora(r={R})@{tower}.attn.q,{tower}.ffn.out")
    assert {e.position.stack for e in h.entries} == {tower} and len(h.entries) == 4
    randomise(h)
    got = _tower_outputs(model, family, batch)
    assert not torch.allclose(got[tower], bare[tower], atol=1e-4)
    other = "vision" if tower == "text" else "text"
    if family == "clip" or other == "vision":   # LLaVA's logits read the image features: only vision stays
        assert torch.equal(got[other], bare[other]), f"{tower}.* changed the {other} tower"


@pytest.mark.parametrize("family", tm.TOWERS)
@pytest.mark.parametrize("spec", TOWER_SPECS)
def test_tower_lifecycle(family, spec, tmp_path):
    """Every delta lands on both towers, changes the output, trains, saves, loads, merges, detaches."""
    ref, model, batch = tm.make(family), tm.make(family), tm.inputs(family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    y0 = run(model, batch)
    h = deltakit.attach(model, spec)
    stacks = {e.position.stack for e in h.entries}
    assert stacks == ({None} if spec == "full@head" and family == "llava" else {"text", "vision"})
    if not spec.startswith("prefix"):   # every other delta starts with no effect
        assert torch.equal(run(model, batch), y0)
    randomise(h, std=0.3)
    y = tm.run(model, batch)
    assert not torch.allclose(y.detach(), y0, atol=1e-4)
    loss_of(y).backward()
    assert all(p.grad is None for _, p in backbone_params(model))
    dead = [n for n, p in h.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == [], f"deltas at positions the output does not depend on: {dead}"

    h.save(tmp_path / "ckpt")
    fresh = tm.make(family, fresh=True)
    g = deltakit.load(fresh, tmp_path / "ckpt")
    assert g.num_trainable == h.num_trainable
    torch.testing.assert_close(run(fresh, batch), y.detach(), rtol=1e-5, atol=1e-5)
    g.merge()
    torch.testing.assert_close(run(fresh, batch), y.detach(), rtol=1e-5, atol=1e-5)
    g.unmerge()
    torch.testing.assert_close(run(fresh, batch), y.detach(), rtol=1e-5, atol=1e-5)
    h.detach()
    run(ref, batch)
    assert_restored(model, ref, batch, flags)


def hooks(module):
    return sorted(f.__qualname__ for d in (module._forward_hooks, module._forward_pre_hooks) for f in d.values())


def assert_restored(model, ref, batch, flags):
    """test_families.assert_pristine, for models where transformers leaves hooks of its own (LLaVA's
    vision tower captures hidden states): the same hooks as on the bare model, and nothing else."""
    assert deltakit.handles(model) == {}
    sd, rsd = model.state_dict(), ref.state_dict()
    assert list(sd) == list(rsd) and all(torch.equal(sd[k], rsd[k]) for k in rsd)
    refs = dict(ref.named_modules())
    for name, module in model.named_modules():
        assert "deltakit" not in name.split("."), name
        assert hooks(module) == hooks(refs[name]), f"hook left on {name!r}"
        assert not any(k.startswith("_deltakit") for k in module.__dict__), name
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(run(model, batch), run(ref, batch))


def test_tower_counts_in_closed_form():
    for family in tm.TOWERS:
        model, layouts = tm.make(family), tower_layouts(family)
        assert deltakit.plan(model, f"lora(r={R})@attn.*,ffn.*").num_params == sum(
            2 * lora_count(t.values()) for t in layouts.values())
        assert deltakit.plan(model, "adapter(dim=4)@ffn").num_params == sum(
            2 * (2 * 4 * t["attn.q"][0] + 4 + t["attn.q"][0]) for t in layouts.values())
    llava = tm.make("llava")
    proj = llava.model.multi_modal_projector
    assert deltakit.plan(llava, "full@projector").num_params == sum(p.numel() for p in proj.parameters())


def test_clip_refuses_a_prompt_and_llava_left_padding_with_a_prefix_is_exact():
    with pytest.raises(deltakit.KindError, match="inputs_embeds"):   # CLIPModel: no input embeddings to extend
        deltakit.attach(tm.make("clip"), "prompt(n=2)")
    model = tm.make("llava")
    h = deltakit.attach(model, "prefix(n=3)@text.attn")
    randomise(h, std=0.5)
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(2, tm.VOCAB - 1, (7,), generator=g), torch.randint(2, tm.VOCAB - 1, (4,), generator=g)
    ids, mask = torch.full((2, 7), 1), torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 3:], mask[1, 3:] = short, 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=short[None], attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
        with h.disabled():
            bare = model(input_ids=short[None], attention_mask=torch.ones(1, 4, dtype=torch.long)).logits
    torch.testing.assert_close(batched[1, 3:], alone[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(alone, bare, atol=1e-3)


# ---- refusals: a table that fits only part of the model ----------------------------------------------

@pytest.fixture
def without(monkeypatch):
    """Detection as if a family table did not exist."""
    def drop(family):
        monkeypatch.setattr(P, "FAMILIES", [f for f in P.FAMILIES if f is not family])
    return drop


def refused(model, pattern="attn.q"):
    table = deltakit.positions(model)
    assert table.note and all(p.layer is None for p in table), "a family was read into part of the model"
    with pytest.raises(deltakit.PatternError) as err:
        deltakit.plan(model, f"lora@{pattern}")
    assert table.note in str(err.value) and "re:" in str(err.value)
    assert table.note in str(table)   # printing the table says why it has raw names only
    return table.note


def test_llava_without_its_table_is_refused_not_read_as_one_llama_tower(without):
    without(F.LLAVA)
    model = tm.make("llava")
    note = refused(model)
    assert "llama" in note and "'model.vision_tower.encoder.layers' only in part" in note and "'attn.o'" in note
    # raw names still work, on either tower
    h = deltakit.attach(model, r"lora(r=2)@re:model\.(vision_tower\.encoder|language_model)\.layers\.0\.self_attn\.q_proj")
    assert len(h.entries) == 2


def test_bart_without_its_table_is_refused(without):
    without(F.BART)
    note = refused(tm.make("bart"))
    assert "'model.encoder.layers' only in part" in note


def test_clip_without_its_table_is_refused(without):
    without(F.CLIP)
    note = refused(tm.make("clip"))
    assert "'text_model.encoder.layers' only in part" in note


def test_layers_that_differ_are_refused():
    model = tm.make("llama")
    model.model.layers[1].mlp = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))   # e.g. a MoE layer
    note = refused(model, "ffn.in")
    assert "layer 1 of 2 lacks 'ffn' but has projections it does not read ('model.layers.1.mlp.0', ...)" in note
    refused(model, "attn.q")   # not even the attention: the model is not what the table says
    model = tm.make("llama")
    attn = model.model.layers[0].self_attn
    attn.out_proj = attn.o_proj   # the same projection under another name
    del attn.o_proj
    assert "layer 0 of 2 lacks 'attn.o' but has projections it does not read" in refused(model)


def test_layers_without_a_sub_block_are_fine():
    """Compressed CPM-Ant layers drop their attention or FFN: what exists gets the spec, everywhere."""
    from deltakit.backbones import cpmant
    model = cpmant.build("cpm-ant-300m", device="meta")
    has = [model.config.layer_has(i) for i in range(model.config.num_layers)]
    assert not all(a for a, _ in has) and not all(f for _, f in has)
    assert P.detect(model).family.name == "cpmant"
    plan = deltakit.plan(model, "lora(r=2)@attn.q,ffn.out")
    assert sorted({(p.position.layer, p.position.local) for p in plan}) == sorted(
        [(i, "attn.q") for i, (a, _) in enumerate(has) if a] + [(i, "ffn.out") for i, (_, f) in enumerate(has) if f])


def test_the_same_optional_entries_missing_everywhere_is_fine():
    """A LLaMA whose every layer has experts instead of `mlp` keeps its attention positions."""
    model = tm.make("llama")
    for layer in model.model.layers:
        layer.mlp = nn.ModuleDict({"experts": nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 32)])})
    assert P.detect(model).family.name == "llama"
    assert deltakit.plan(model, "lora(r=2)@attn.q").num_params == 2 * 2 * 64
    with pytest.raises(deltakit.PatternError, match="ffn.in"):
        deltakit.plan(model, "lora@ffn.in")


class TwoTowers(nn.Module):
    def __init__(self, second):
        super().__init__()
        self.a = tm.make("llama").model
        self.b = second


class Block(nn.Module):   # a transformer block no family table knows
    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.fc1, self.fc2 = nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, 64), nn.Linear(64, 32)


def test_towers_no_table_tells_apart_are_refused():
    note = refused(TwoTowers(tm.make("llama").model))
    assert "2 layer lists (a.layers, b.layers)" in note
    blocks = nn.Module()
    blocks.blocks = nn.ModuleList([Block(), Block(), Block()])
    note = refused(TwoTowers(blocks))
    assert "no stack for 'b.blocks' (3 layers)" in note


def test_small_lists_are_not_towers_and_unknown_models_stay_generic():
    heads = nn.Module()
    heads.heads = nn.ModuleList([nn.Linear(32, 2), nn.Linear(32, 3)])   # a list of heads is no stack of blocks
    model = TwoTowers(heads)
    assert P.detect(model).family.name == "llama"
    assert deltakit.plan(model, "lora(r=2)@attn.q").num_params == 2 * 2 * 64
    unknown = nn.Module()
    unknown.blocks = nn.ModuleList([Block(), Block()])
    table = deltakit.positions(unknown)
    assert table.note is None and P.detect(unknown).family is None
    assert "blocks.0.qkv" in table.names()
    assert deltakit.plan(unknown, r"lora(r=2)@re:blocks\.\d+\.qkv").num_params == 2 * 2 * (32 + 96)
    with pytest.raises(deltakit.PatternError, match="Positions here"):   # no family came close: raw names suggested
        deltakit.plan(unknown, "lora@attn.q")
