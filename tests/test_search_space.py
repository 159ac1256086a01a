"""The search space: candidates from a spec, and the spec a chosen structure is written as."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

import deltakit
import tiny_models as tm
from search.space import build_space


def test_chosen_structure_reapplies_also_for_positions_found_by_regex():
    model = tm.make("xlmr")
    space = build_space(model, r"lora(r=1)@attn.q; bitfit@re:classifier\.dense", fixed=None)
    regex = [c for c in space.candidates if c.position == "classifier.dense"]
    assert regex and regex[0].pattern == r"re:classifier\.dense"
    spec = space.spec_for(range(len(space)))
    h = deltakit.attach(model, spec)
    assert sorted(e.key for e in h.entries) == sorted(c.key for c in space.candidates)
    h.detach()


@pytest.mark.parametrize("preset", ["M", "L"])
def test_presets_plan_on_every_family_and_reapply(preset):
    for family in ("bert", "llama", "t5", "bart"):
        model = tm.make(family)
        space = build_space(model, preset)
        h = deltakit.attach(model, space.spec_for(range(0, len(space), 3)))
        assert len(h.entries) == len(range(0, len(space), 3))
        h.detach()
        assert deltakit.handles(model) == {}
        del model
