"""The engine's guarantees, each a test that failed on the first engine: a delta is computed once,
the lifecycle corrupts nothing (load or materialize while merged, bf16 merge cycles, a failed
attach, a forward that raises), rebuilt specs re-apply, and hot paths do no per-forward work."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import deltakit
import tiny_models as tm
from deltakit import hf_compat
from test_families import assert_pristine, backbone_params, randomise


# ---- a reparameterised delta is computed once ---------------------------------------------------------

def test_full_on_attention_writes_each_token_once_into_the_cache():
    model = tm.make("llama")
    h = deltakit.attach(model, "full@layers.0.attn")
    randomise(h, std=0.05)
    ids = torch.randint(2, tm.VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = hf_compat.output_cache(model(ids, use_cache=True))
    assert cache.get_seq_length() == 5, "the attention ran twice and cached every token twice"
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert hf_compat.output_cache(out).get_seq_length() == 5 + 4 - 1


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.proj(x))


def test_lnfit_on_batchnorm_updates_its_statistics_once_per_forward():
    model = WithBatchNorm().train()
    bare = WithBatchNorm().train()
    bare.load_state_dict(model.state_dict())
    deltakit.attach(model, "lnfit@bn")
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    model(x)
    bare(x)
    assert int(model.bn.num_batches_tracked) == 1
    torch.testing.assert_close(model.bn.running_mean, bare.bn.running_mean, rtol=0, atol=0)


def test_full_on_the_head_runs_the_head_once():
    model = tm.make("xlmr")
    calls = []
    head = model.classifier
    forward = head.forward
    head.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    deltakit.attach(model, "full@head")
    with torch.no_grad():
        model(**tm.inputs("xlmr"))
    assert len(calls) == 1


@pytest.mark.parametrize("norm", ["gemma", "qwen3_next"])
def test_zero_lnfit_on_a_one_plus_w_norm_changes_nothing(norm):
    """Gemma-style norms scale by (1 + w): a zero delta must leave the output as it was."""
    if norm == "gemma":
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as Norm
    else:
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNorm as Norm
    model = nn.Sequential(nn.Linear(8, 8), Norm(8))
    with torch.no_grad():
        model[1].weight.normal_(std=0.3)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y0 = model(x)
        h = deltakit.attach(model, "lnfit@1")
        assert torch.equal(model(x), y0)
        h.entries[0].module.weight.fill_(0.5)   # and a delta d gives the norm with w + d
        want = Norm(8)
        want.weight.copy_(model[1].weight + 0.5)
        torch.testing.assert_close(model(x), want(model[0](x)), rtol=0, atol=0)


def test_zero_lnfit_on_a_gemma_model_changes_nothing():
    from transformers import GemmaConfig, GemmaForCausalLM
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(std=0.3)
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y0 = model(ids).logits
        h = deltakit.attach(model, "lnfit@ln.*")
        assert len(h.entries) == 2 * 2 + 1
        assert torch.equal(model(ids).logits, y0)


# ---- the lifecycle has no silent corruption -------------------------------------------------------------

def test_load_and_materialize_while_merged_are_refused():
    model = tm.make("bert")
    h = deltakit.attach(model, "lora(r=2)@attn.q")
    randomise(h)
    weights = {k: v.clone() for k, v in h.state_dict().items()}
    ref = {k: v.clone() for k, v in model.state_dict().items() if "deltakit" not in k}
    h.merge()
    with pytest.raises(deltakit.HandleError, match="unmerge"):
        h.load_state_dict({k: v * 3 for k, v in weights.items()})
    h.unmerge()
    for k, v in ref.items():
        assert torch.equal(model.state_dict()[k], v), k
    model2 = tm.make("bert")
    g = deltakit.attach(model2, "hyper(adapter,dim=4)@attn")
    g.merge()
    g.entries[0].merged = True   # an adapter never folds; pretend one did, as a merged lora would
    with pytest.raises(deltakit.HandleError, match="unmerge"):
        g.materialize(task=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["lora(r=4)@attn.q,attn.v,ffn.in; bitfit@attn.o; lnfit@ln.*",
                                  "lora@attn.q; full@ffn.out"])
def test_merge_unmerge_cycles_and_detach_are_bit_exact_in_half_precision(dtype, spec):
    model, ref = tm.make("llama", dtype=dtype), tm.make("llama", dtype=dtype)
    batch = tm.inputs("llama")
    h = deltakit.attach(model, spec)
    randomise(h, std=0.05)
    with torch.no_grad():
        live = tm.run(model, batch)
    for _ in range(10):
        h.merge()
        h.unmerge()
    for (n, p), (_, q) in zip(backbone_params(model), backbone_params(ref)):
        assert torch.equal(p, q), f"{n} moved after 10 merge/unmerge cycles"
    h.merge()
    with torch.no_grad():
        torch.testing.assert_close(tm.run(model, batch), live, rtol=0.05, atol=0.05)
    h.detach()
    assert_pristine(model, ref, batch)


def test_merge_without_originals_subtracts_and_costs_no_copy():
    model, ref = tm.make("llama"), tm.make("llama")
    h = deltakit.attach(model, "lora@attn.q,attn.v; lnfit@ln.attn")
    randomise(h)
    h.merge(keep_original=False)
    assert all(m is not model.model.layers[0].self_attn.q_proj for m, _ in h.originals), "lora kept a copy"
    assert any(n == "weight" for _, n in h.originals), "lnfit keeps its (small) originals"
    h.unmerge()
    for (n, p), (_, q) in zip(backbone_params(model), backbone_params(ref)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=n)


def test_handles_merged_into_the_same_weight_unmerge_in_reverse_order():
    model, ref = tm.make("bert"), tm.make("bert")
    a = deltakit.attach(model, "lora(r=2)@attn.q", name="a")
    b = deltakit.attach(model, "lora(r=3)@attn.q", name="b")
    randomise(a, seed=1)
    randomise(b, seed=2)
    a.merge()
    b.merge()
    with pytest.raises(deltakit.HandleError, match="before b"):
        a.unmerge()
    b.unmerge()
    a.unmerge()
    b.detach()
    a.detach()
    assert_pristine(model, ref, tm.inputs("bert"))


def _failing_type(after: int):
    """A delta type whose build fails at its (after+1)-th position."""
    from deltakit.deltas import DeltaType, lora
    built = []

    def build(opts, pos, target):
        built.append(pos.name)
        if len(built) > after:
            raise RuntimeError("build failed")
        return lora.build(opts, pos, target)
    return DeltaType("failing_lora", lora.Options, ("linear",), "parallel", lora.count, build, "attn.q")


@pytest.mark.parametrize("first", [True, False], ids=["first-attach", "second-handle"])
def test_a_failed_attach_leaves_nothing_behind(first):
    model, ref = tm.make("bert"), tm.make("bert")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    deltakit.register(_failing_type(after=1))
    try:
        if not first:
            other = deltakit.attach(model, "lora@attn.v", name="other")
        with pytest.raises(RuntimeError, match="build failed"):
            deltakit.attach(model, "failing_lora@attn.q")
        if first:
            assert deltakit.handles(model) == {}
            assert "_deltakit_state" not in model.__dict__, "per-model state of a failed first attach"
            assert_pristine(model, ref, tm.inputs("bert"), flags)
        else:
            assert list(deltakit.handles(model)) == ["other"]
            assert [e.key for e in other.entries] == ["layers.0.attn.v.lora", "layers.1.attn.v.lora"]
            other.detach()
            assert_pristine(model, ref, tm.inputs("bert"), flags)
    finally:
        deltakit.delta_types.pop("failing_lora")


def test_materialize_reapplies_positions_found_by_regex():
    model = tm.make("xlmr")
    h = deltakit.attach(model, r"hyper(adapter,dim=4)@attn; lora(r=2)@re:classifier\.dense")
    assert h.entries[-1].position.raw and h.entries[-1].position.pattern == r"re:classifier\.dense"
    randomise(h)
    batch = tm.inputs("xlmr")
    with torch.no_grad():
        y = tm.run(model, batch)
    plain = h.materialize(task=0)
    assert "re:classifier\\.dense" in plain.spec
    with torch.no_grad():
        torch.testing.assert_close(tm.run(model, batch), y, rtol=1e-5, atol=1e-5)
    plain.detach()


def test_regex_names_a_module_by_its_own_kind_when_it_is_two_positions():
    # BERT's output.dense is ffn.out and also where the ffn block ends: re: means the linear
    model = tm.make("bert")
    h = deltakit.attach(model, r"lora(r=2)@re:.*layer\.1\.output\.dense")
    assert [e.key for e in h.entries] == ["layers.1.ffn.out.lora"]


def test_backbone_state_dict_loads_strictly_after_attach():
    model = tm.make("gpt2")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    h = deltakit.attach(model, "lora@attn.q; adapter@ffn")
    with pytest.raises(RuntimeError, match="deltakit"):
        model.load_state_dict(original)   # the deltas are part of model.state_dict(): documented
    assert set(deltakit.backbone_state_dict(model)) == set(original)
    model.load_state_dict({**original, **{k: v for k, v in model.state_dict().items() if "deltakit" in k}})
    h.detach()


def test_a_call_the_hooks_cannot_bind_is_a_deltakit_error():
    model = tm.make("gpt2")
    deltakit.attach(model, "prompt(n=2)")
    ids = torch.randint(2, tm.VOCAB, (1, 4))
    with pytest.raises(deltakit.CallError, match="keyword|does not take"):
        model.transformer(ids, None, None, None, None, None, None, None, None, None, None, None, None, None)


# ---- a forward that raises halfway leaves no stale state ---------------------------------------------------

class Boom(Exception):
    pass


@pytest.mark.parametrize("spec", ["parallel_adapter(dim=4)@attn,ffn; lora@attn.q",
                                  "prompt(n=2)", "full@layers.0.attn; lnfit@ln.attn", "prefix(n=2)@attn"])
def test_a_forward_that_raises_halfway_leaves_no_stale_state(spec):
    model, ref = tm.make("llama"), tm.make("llama")
    h = deltakit.attach(model, spec)
    randomise(h, std=0.2)
    batch = tm.inputs("llama")
    with torch.no_grad():
        want = tm.run(model, batch)
    layer1 = model.model.layers[1]
    mlp = layer1.mlp
    mlp.forward, forward = (lambda *a, **kw: (_ for _ in ()).throw(Boom())), mlp.forward
    with pytest.raises(Boom), torch.no_grad():
        tm.run(model, batch)
    mlp.forward = forward
    for e in h.entries:
        assert e.seen is None, f"{e.key} kept a sub-block input"
    for m in model.modules():
        site = m.__dict__.get("_deltakit_site")
        if site is not None:
            assert not site.swapped
            assert all(p is None or isinstance(p, nn.Parameter) for p in m._parameters.values())
    prompt = model.__dict__.get("_deltakit_prompt_site")
    assert prompt is None or prompt.inserted is None
    with torch.no_grad():
        torch.testing.assert_close(tm.run(model, batch), want, rtol=0, atol=0)
    h.detach()
    assert_pristine(model, ref, batch)


# ---- no per-forward waste on hot paths -------------------------------------------------------------------

def test_hyper_finds_its_tasks_once_in_set_task(monkeypatch):
    model = tm.make("llama")
    h = deltakit.attach(model, "hyper(lora,r=2,tasks=3)@attn.q")
    h.set_task(torch.tensor([0, 2]))
    calls = []
    unique = torch.unique
    monkeypatch.setattr(torch, "unique", lambda *a, **kw: calls.append(1) or unique(*a, **kw))
    with torch.no_grad():
        tm.run(model, tm.inputs("llama"))
    assert calls == []
    h.set_task(1)
    assert calls == [1]


def test_bitfit_does_not_copy_its_input():
    model = tm.make("llama", dtype=torch.bfloat16)
    h = deltakit.attach(model, "bitfit@ffn.out")
    seen = []
    module = h.entries[0].module
    forward = module.forward
    module.forward = lambda x: seen.append(x.dtype) or forward(x)
    with torch.no_grad():
        tm.run(model, tm.inputs("llama"))
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize("spec", ["lora@attn.q,attn.v", "adapter(dim=4)@attn,ffn", "lnfit@ln.*", "bitfit@attn.o,ffn.*",
                                  "lora@attn.q; adapter(dim=4)@ffn; lnfit@ln.ffn; bitfit@attn.o; full@head",
                                  "prefix(n=2)@attn", "prompt(n=2)", "hyper(adapter,dim=4)@attn"])
def test_torch_compile_sees_no_graph_break(spec):
    """A padded batch on a tiny LLaMA: every delta type traces into one graph (README: Speed)."""
    import torch._dynamo
    torch._dynamo.reset()
    model = tm.make("llama")
    h = deltakit.attach(model, spec)
    randomise(h)
    batch = tm.inputs("llama")

    def logits(ids, mask):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    explained = torch._dynamo.explain(logits)(batch["input_ids"], batch["attention_mask"])
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    with torch.no_grad():
        want = logits(batch["input_ids"], batch["attention_mask"])
        compiled = torch.compile(logits, backend="eager")
        torch.testing.assert_close(compiled(batch["input_ids"], batch["attention_mask"]), want)
        with h.disabled():   # the guards follow disabled(): the bare model, not the traced deltas
            bare = logits(batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(compiled(batch["input_ids"], batch["attention_mask"]), bare)
        assert not torch.allclose(bare, want)
    torch._dynamo.reset()


# ---- every position a spec names is reached --------------------------------------------------------------

@pytest.mark.parametrize("family", tm.FAMILIES)
def test_full_on_the_embedding_changes_the_output_on_every_family(family):
    """T5's and BART's `shared` embedding is never called (their stacks call embed_tokens, which hold
    the same weight): a delta there must still reach the forward, and merge into the one weight."""
    model, ref = tm.make(family), tm.make(family)
    batch = tm.inputs(family)
    with torch.no_grad():
        bare = tm.run(model, batch)
    h = deltakit.attach(model, "full@embed")
    with torch.no_grad():
        for p in h.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
        live = tm.run(model, batch)
        assert not torch.allclose(live, bare, atol=1e-3), "full@embed does not reach the forward"
        h.merge()
        torch.testing.assert_close(tm.run(model, batch), live, rtol=1e-5, atol=1e-5)
    h.detach()
    assert_pristine(model, ref, batch)


def test_a_model_dropped_while_attached_is_freed():
    import gc
    import weakref
    model = tm.make("llama")
    deltakit.attach(model, "lora@attn.q; prefix(n=2)@attn")
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "deltakit keeps an attached model alive"


def test_saved_files_get_the_usual_permissions(tmp_path):
    """safetensors creates its file 0o600; a delta folder is as readable as any file the user writes."""
    model = tm.make("bert")
    h = deltakit.attach(model, "lora@attn.q")
    h.save(tmp_path / "d")
    h.save(tmp_path / "p", format="peft")
    (tmp_path / "plain.txt").write_text("x")
    want = (tmp_path / "plain.txt").stat().st_mode & 0o777
    for f in [*(tmp_path / "d").iterdir(), *(tmp_path / "p").iterdir()]:
        assert f.stat().st_mode & 0o777 == want, f


# ---- LoRAs that read one tensor share their first matmul --------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama", "t5", "cpmant"])
def test_loras_on_one_input_share_a_matmul_and_give_the_same_result(family, monkeypatch):
    model, alone = tm.make(family), tm.make(family)
    spec = "lora(r=2)@attn.q,attn.v" + (",cross.k,cross.v" if family == "t5" else "")
    h, g = deltakit.attach(model, spec), deltakit.attach(alone, spec)
    randomise(h, std=0.3)
    randomise(g, std=0.3)
    for e in g.entries:   # the reference computes every LoRA on its own
        e.shared_input = None
    assert all(e.shared_input is not None for e in h.entries)
    batch = tm.inputs(family)
    torch.testing.assert_close(tm.run(model, batch), tm.run(alone, batch), rtol=1e-5, atol=1e-5)
    from test_families import loss_of
    loss_of(tm.run(model, batch)).backward()
    loss_of(tm.run(alone, batch)).backward()
    for (n, p), (_, q) in zip(h.named_parameters(), g.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4 * float(q.grad.abs().max()), msg=n)
    widths = []
    mm = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: widths.append(b.shape[-1]) or mm(a, b))
    with torch.no_grad():
        tm.run(model, batch)
    assert 4 in widths and 2 not in widths, "q and v did not share x @ [A_q; A_v]^T"
    for e in h.entries:
        assert e.shared_input.x is None and not e.shared_input.parts, "a shared input outlived its forward"
