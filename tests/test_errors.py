"""deltakit's exceptions: the class hierarchy, and messages that say what was wrong and what would be
right (nearest names, accepted kinds, valid options)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import functools  # noqa: E402
import inspect  # noqa: E402

import pytest  # noqa: E402

import deltakit  # noqa: E402
from deltakit import errors  # noqa: E402
from deltakit.errors import (CheckpointError, DeltakitError, HandleError, KindError, OptionError,  # noqa: E402
                             PatternError, SpecError, UnknownDeltaType, listing, nearest)


@functools.lru_cache(maxsize=None)
def tiny_bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                vocab_size=100)).eval()


def plan_error(spec, cls=DeltakitError) -> str:
    with pytest.raises(cls) as info:
        deltakit.plan(tiny_bert(), spec)
    assert type(info.value) is cls or cls is DeltakitError
    return str(info.value)


# ---- hierarchy -----------------------------------------------------------------------------------

def test_every_error_is_a_deltakit_error():
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, Exception)]
    assert set(classes) == {DeltakitError, SpecError, UnknownDeltaType, OptionError, PatternError, KindError,
                            CheckpointError, HandleError, errors.CallError}
    for cls in classes:
        assert issubclass(cls, DeltakitError)
    for cls in (UnknownDeltaType, OptionError, PatternError, KindError):
        assert issubclass(cls, SpecError)
    assert not issubclass(CheckpointError, SpecError) and not issubclass(HandleError, SpecError)


def test_spec_errors_are_value_errors():
    for cls in (SpecError, UnknownDeltaType, OptionError, PatternError, KindError):
        assert issubclass(cls, ValueError)
    with pytest.raises(ValueError):
        deltakit.plan(tiny_bert(), "lora@attn.query")
    assert not issubclass(CheckpointError, ValueError) and not issubclass(HandleError, ValueError)


def test_errors_are_exported():
    for name in ("DeltakitError", "SpecError", "UnknownDeltaType", "OptionError", "PatternError", "KindError",
                 "CheckpointError", "HandleError", "CallError"):
        assert getattr(deltakit, name) is getattr(errors, name)
        assert name in deltakit.__all__


# ---- unknown types and options -------------------------------------------------------------------

def test_unknown_type_suggests_the_nearest():
    msg = plan_error("lorra@attn.q", UnknownDeltaType)
    assert "'lorra'" in msg
    assert "Did you mean: lora?" in msg
    assert ("Known types: adapter, bitfit, full, hyper, lnfit, lora, lowrank_adapter, parallel_adapter, prefix, "
            "prompt") in msg


def test_unknown_type_with_nothing_close_lists_the_known_ones():
    msg = plan_error("zzzzzz@attn.q", UnknownDeltaType)
    assert "Did you mean" not in msg and "Known types: adapter" in msg


def test_unknown_option_names_it_suggests_and_lists():
    msg = plan_error("lora(rank=8)@attn.q", OptionError)
    assert "in rule 'lora(rank=8)@attn.q'" in msg
    assert "lora has no option 'rank'" in msg
    assert "Did you mean: r?" in msg
    assert "Valid options: alpha, dropout, init, r" in msg


@pytest.mark.parametrize("spec, fragment", [
    ("lora(drop=0.1)", "Did you mean: dropout?"),
    ("lora(alhpa=8)", "Did you mean: alpha?"),
    ("adapter(dims=8)", "Did you mean: dim?"),
    ("adapter(activation=gelu)", "Did you mean: act?"),
])
def test_option_typos_are_suggested(spec, fragment):
    assert fragment in plan_error(spec, OptionError)


@pytest.mark.parametrize("spec, fragment", [
    ("lora(r=0)", "lora option r=0 must be at least 1"),
    ("lora(r=2.5)", "lora option r=2.5 must be an integer"),
    ("lora(dropout=1.5)", "lora option dropout=1.5 must be in [0, 1)"),
    ("lora(init=foo)", "lora option init='foo' is not allowed; choose one of 'kaiming', 'gaussian'"),
    ("adapter(act=swish)", "adapter option act='swish' is not allowed; choose one of 'relu', 'gelu', 'silu', 'tanh'"),
    ("lora(r=__import__('os'))", "lora option r=\"__import__('os')\" must be an integer"),
])
def test_option_value_messages(spec, fragment):
    msg = plan_error(spec, OptionError)
    assert fragment in msg
    assert msg.startswith(f"in rule {spec!r}: ")


# ---- patterns ------------------------------------------------------------------------------------

def test_pattern_matching_nothing_suggests_names():
    msg = plan_error("lora@attn.query", PatternError)
    assert "'attn.query' matches no position of this BertModel" in msg
    assert "Did you mean: attn.q" in msg
    assert "Positions here: attn, attn.k, attn.o, attn.q, attn.v, embed, ffn" in msg
    assert "deltakit.positions(model)" in msg and "re:<regex>" in msg


def test_layer_out_of_range_matches_nothing():
    msg = plan_error("lora@layers.7.attn.q", PatternError)
    assert "'layers.7.attn.q' matches no position" in msg


@pytest.mark.parametrize("spec, fragment", [
    ("lora@attn..q", "'attn..q' is not a position pattern"),
    ("lora@.attn.q", "is not a position pattern"),
    ("lora@attn.q.", "is not a position pattern"),
    ("lora@attn/q", "is not a position pattern"),
    ("lora@layers.5-2.attn.q", "layer range '5-2' in 'layers.5-2.attn.q' is empty"),
    ("lora@re:(", "unclosed '('"),
    ("lora@re:)", "unbalanced ')'"),
    ("lora@re:[", "unclosed '['"),
    ("lora@attn.q]", "unbalanced ']'"),
    ("lora@re:(?P<)", "bad regular expression"),
    ("lora@re:a{2,1}", "bad regular expression"),
    ("lora@re:*", "bad regular expression"),
    ("lora@re:a{4294967296}", "bad regular expression"),          # OverflowError inside re
    ("lora@re:" + "(" * 2000 + ")" * 2000, "bad regular expression"),  # RecursionError inside re
    ("lora@re:", "empty regular expression"),
    ("lora@re:query", "matches no module name"),
])
def test_malformed_patterns(spec, fragment):
    assert fragment in plan_error(spec, PatternError)


def test_unbalanced_bracket_outside_a_pattern_is_a_plain_spec_error():
    msg = plan_error("lora(r=4@attn.q", SpecError)
    assert "unclosed '(' at character 4" in msg
    msg = plan_error("lora@attn.q; adapter(dim=4", SpecError)  # the open bracket is in the second rule's head
    assert "unclosed '('" in msg


def test_regex_bracket_error_says_how_to_escape():
    msg = plan_error("lora@re:.*(", PatternError)
    assert "backslash" in msg


# ---- kinds ---------------------------------------------------------------------------------------

def test_lora_on_a_norm_is_a_kind_error():
    msg = plan_error("lora@ln.attn", KindError)
    assert "lora cannot go at 'layers.0.ln.attn'" in msg
    assert "norm position" in msg
    assert "lora takes linear positions, such as attn.k, attn.o, attn.q, attn.v, ffn.in, ffn.out" in msg


def test_lnfit_on_a_projection_is_a_kind_error():
    msg = plan_error("lnfit@attn.q", KindError)
    assert "lnfit cannot go at 'layers.0.attn.q'" in msg and "linear position" in msg
    assert "lnfit takes norm positions, such as ln.attn, ln.embed, ln.ffn" in msg


def test_kind_error_names_every_accepted_kind():
    msg = plan_error("adapter@ln.ffn", KindError)
    assert "adapter takes attention, block, linear positions" in msg


def test_wildcard_with_no_position_of_the_right_kind_is_a_kind_error():
    msg = plan_error("lora@*", KindError)  # '*' hits attn, ffn, embed: none is linear
    assert "lora takes linear positions" in msg
    msg = plan_error(r"adapter@re:.*LayerNorm", KindError)
    assert "norm position" in msg


def test_exact_name_of_the_wrong_kind_is_an_error_even_when_others_fit():
    # 'layers.0.ln.attn' hit by an exact (non-wildcard) pattern must not be skipped silently
    plan_error("lora@attn.q,ln.attn", KindError)


# ---- the same delta twice ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    "lora@attn.q; lora(r=4)@attn.*",
    "lora@attn.q; lora@layers.0.attn.q",
    r"lora@attn.v; lora@re:.*\.value",
])
def test_same_delta_twice_from_two_rules(spec):
    msg = plan_error(spec, SpecError)
    assert "is asked for twice" in msg
    first, second = (r.strip() for r in spec.split(";"))
    assert repr(first) in msg and repr(second) in msg
    assert "name=" in msg  # says how to get two: a second handle


def test_different_types_at_one_position_are_fine():
    planned = deltakit.plan(tiny_bert(), "lora@attn.q; bitfit@attn.q")
    assert sorted(p.key for p in planned) == sorted(f"layers.{i}.attn.q.{t}" for i in (0, 1) for t in ("lora", "bitfit"))


def test_attach_raises_the_same_errors_and_leaves_the_model_alone():
    model = tiny_bert()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(OptionError, match="Did you mean: r"):
        deltakit.attach(model, "lora(rank=8)@attn.q", name="bad_spec")
    assert deltakit.handles(model).get("bad_spec") is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_full_on_a_parameterless_module_is_rejected():
    with pytest.raises(KindError, match="no parameters"):
        deltakit.plan(tiny_bert(), r"full@re:.*dropout")
    planned = deltakit.plan(tiny_bert(), r"full@re:.*attention\.(self|output\.dropout)")
    assert [p.position.local for p in planned] == ["attn"] * 2   # the dropouts are skipped, not planned empty


# ---- helpers -------------------------------------------------------------------------------------

def test_nearest():
    assert nearest("lorra", ["lora", "adapter", "bitfit"]) == " Did you mean: lora?"
    assert nearest("rank", ["r", "alpha", "dropout", "init"]) == " Did you mean: r?"  # prefix, too short for difflib
    assert nearest("drop", ["r", "alpha", "dropout", "init"]) == " Did you mean: dropout?"
    assert nearest("zzz", ["lora", "adapter"]) == ""
    assert nearest("", ["lora", "adapter"]) == ""
    assert nearest("attn.query", ["attn.q", "attn.k", "ffn.in"]).startswith(" Did you mean: attn.q")
    assert nearest("x", []) == ""


def test_listing():
    assert listing(["b", "a", "b"]) == "a, b"
    assert listing([]) == ""
    assert listing([str(i) for i in range(20)], limit=3) == "0, 1, 10, ... (17 more)"
