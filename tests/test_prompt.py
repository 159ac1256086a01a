"""Prompt tuning on every family: lifecycle, what happens to lengths, masks, labels, token types and
positions, padding, generation with a cache; native CPM-Ant's prompt rows."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import deltakit
import tiny_models as tm
from test_families import backbone_params, loss_of, randomise
from test_prefix import (ENC_DEC, GENERATIVE, PAD_SIDES, check_cpmant_first_step, check_generation, check_lifecycle,
                         check_padding, native_tiny, run)


def hidden(family):
    cfg = tm.config(family)
    return getattr(cfg, "d_model", None) or getattr(cfg, "n_embd", None) or cfg.hidden_size


@pytest.mark.parametrize("family", tm.FAMILIES)
def test_prompt_lifecycle(family, tmp_path):
    check_lifecycle(family, "prompt(n=3)", 3 * hidden(family), tmp_path, std=0.5)


@pytest.mark.parametrize("family,side", PAD_SIDES)
def test_prompt_padded_batch_equals_each_example_alone(family, side):
    check_padding(family, side, "prompt(n=3)", std=0.5)


@pytest.mark.parametrize("family", GENERATIVE)
def test_prompt_generation_with_cache_equals_without(family):
    check_generation(family, "prompt(n=3)", side="right" if family in ENC_DEC else "left")


def test_outputs_keep_the_callers_length_and_labels_work():
    model = tm.make("gpt2")
    ids = torch.randint(2, tm.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    h = deltakit.attach(model, "prompt(n=4)")
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert out.logits.shape == (2, 6, tm.VOCAB)
    assert all(hs.shape[1] == 6 for hs in out.hidden_states)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, tm.VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    assert h.parameters()[0].grad is not None
    assert all(p.grad is None for _, p in backbone_params(model))


def test_prompt_sees_inputs_and_token_types_are_shifted():
    """BERT with token types: the prompt is inserted after [CLS] with at=1, token types stay aligned."""
    model = tm.make("bert")
    ids = torch.randint(2, tm.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    types = torch.tensor([[0, 0, 0, 1, 1, 1]])
    seen = []
    emb = model.bert.embeddings
    probe = emb.register_forward_hook(lambda m, a, kw, o: seen.append(kw.get("token_type_ids")), with_kwargs=True)
    h = deltakit.attach(model, "prompt(n=2,at=1,init=normal)")
    with torch.no_grad():
        model(input_ids=ids, token_type_ids=types)
    probe.remove()
    assert seen[0].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    # at=1: the prompt goes after [CLS]; the insertion keeps every other row in order
    from deltakit.joins.prompt import insert
    x = torch.arange(6.)[None, :, None]
    got = insert(x, torch.tensor([1]), torch.full((1, 2, 1), -1.), 2)
    assert got[0, :, 0].tolist() == [0, -1, -1, 1, 2, 3, 4, 5]
    h.detach()


def test_prompt_init_from_ids_copies_embedding_rows():
    model = tm.make("llama")
    h = deltakit.attach(model, "prompt(n=4,ids=5-7)")
    rows = model.get_input_embeddings().weight[[5, 7, 5, 7]]
    assert torch.equal(h.entries[0].module.prompt.detach(), rows)
    with pytest.raises(deltakit.OptionError, match="ids"):
        deltakit.plan(model, "prompt(ids=a-b)")


def test_native_cpmant_prompt_rows_delta():
    from deltakit.backbones import cpmant_generate as gen
    model = native_tiny()
    cfg = model.config
    x = model.inputs([[5, 6, 7, 8]], task_id=1)
    y0 = run_native(model, x)
    h = deltakit.attach(model, "prompt@prompt")
    assert h.num_trainable == cfg.prompt_types * cfg.prompt_length * cfg.dim_model
    assert torch.equal(run_native(model, x), y0), "a zero delta changes nothing"
    randomise(h, std=0.5)
    y = run_native(model, x)
    assert not torch.allclose(y, y0, atol=1e-4)
    loss_of(model(**x)[0]).backward()
    grad = h.parameters()[0].grad
    P = cfg.prompt_length
    assert grad[P:2 * P].abs().sum() > 0 and grad[:P].abs().sum() == 0, "only task 1's rows are used"
    assert gen.greedy(model, [[5, 6, 7]], max_new_tokens=4) == gen.greedy(model, [[5, 6, 7]], max_new_tokens=4, use_cache=False)
    assert h.merge() == []
    torch.testing.assert_close(run_native(model, x), y, rtol=1e-5, atol=1e-5)
    h.unmerge()
    h.detach()
    assert torch.equal(run_native(model, x), y0) or torch.allclose(run_native(model, x), y0, atol=1e-6)


def run_native(model, x):
    with torch.no_grad():
        return model(**x)[0]


def test_transformers_cpmant_prompt_fills_its_native_slots():
    model = tm.make("cpmant")
    with pytest.raises(deltakit.OptionError):
        deltakit.plan(model, "prompt(n=0)")
    h = deltakit.attach(model, "prompt(n=2)")
    ids = torch.randint(2, tm.VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids).logits
    assert out.shape == (2, 5, tm.VOCAB)
    h.detach()
    check_cpmant_first_step("prompt(n=2)")
