"""deltakit.load(model, peft_folder): adapters trained with PEFT load as deltakit deltas that give
PEFT's outputs; settings deltakit cannot represent exactly are refused by name."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import deltakit
import tiny_models as tm
from deltakit.errors import CheckpointError

peft = pytest.importorskip("peft")


def randomise(module, seed=1):
    """PEFT starts B at zero (and prompts from the vocabulary): give every trainable tensor a value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def make(family):
    """tiny_models' model, or "bert_cls": a tiny BERT sequence classifier (two labels)."""
    if family != "bert_cls":
        return tm.make(family)
    import transformers
    torch.manual_seed(tm.SEED)
    model = transformers.BertForSequenceClassification(tm.config("bert"))
    tm._randomise(model, tm.SEED)
    return model.eval()


def inputs(family):
    return tm.inputs("bert" if family == "bert_cls" else family)


def peft_folder(family, config, tmp_path):
    """A PEFT adapter trained (here: randomised) on a tiny `family` model, saved by PEFT itself;
    returns (folder, PEFT's logits)."""
    model = peft.get_peft_model(make(family), config)
    randomise(model)
    model.save_pretrained(str(tmp_path))
    model.eval()
    with torch.no_grad():
        want = tm.run(model, inputs(family))
    return tmp_path, want


def load_and_run(family, folder):
    model = make(family)
    with torch.no_grad():
        bare = tm.run(model, inputs(family))
    h = deltakit.load(model, folder)
    model.eval()
    with torch.no_grad():
        got = tm.run(model, inputs(family))
    assert not torch.allclose(got, bare, atol=1e-3), "the adapter should change the outputs"
    return h, got


LORA_CASES = {
    "llama_qv": ("llama", dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.1)),
    "llama_rslora_patterns": ("llama", dict(target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True,
                                            rank_pattern={"layers.1.self_attn.k_proj": 2},
                                            alpha_pattern={"down_proj": 5})),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "t5_regex": ("t5", dict(target_modules=r".*(SelfAttention|EncDecAttention)\.(q|v)")),
    "llama_all_linear": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj"])),
    "bert_layers": ("bert", dict(target_modules=["query", "dense"], layers_to_transform=[1], layers_pattern="layer")),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_gives_peft_outputs(case, tmp_path):
    family, options = LORA_CASES[case]
    folder, want = peft_folder(family, peft.LoraConfig(r=4, lora_alpha=8, **options), tmp_path)
    h, got = load_and_run(family, folder)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert {e.type.name for e in h.entries} == {"lora"}
    if case == "gpt2_conv1d":   # whole fused c_attn modules, by raw name
        assert "re:transformer\\.h\\.0\\.attn\\.c_attn" in h.spec
    if case == "llama_qv":
        assert h.spec == "lora(r=4,alpha=8,dropout=0.1)@layers.0.attn.q,layers.0.attn.v,layers.1.attn.q,layers.1.attn.v"


def test_modules_to_save_become_full(tmp_path):
    """XLM-R sequence classification: PEFT saves the classifier whole; deltakit: full@head."""
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    folder, want = peft_folder("xlmr", config, tmp_path)
    h, got = load_and_run("xlmr", folder)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert h.spec.endswith("; full@head")
    # the head's weights are PEFT's trained ones, not the backbone's
    saved = h.state_dict()["head.full.value.out_proj__weight"]
    assert not torch.equal(saved, tm.make("xlmr").classifier.out_proj.weight)


def test_bin_file_through_weights_only(tmp_path):
    folder, want = peft_folder("llama", peft.LoraConfig(r=4, lora_alpha=8), tmp_path)
    from safetensors.torch import load_file
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    _, got = load_and_run("llama", folder)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bin_file_with_objects_is_refused(tmp_path):
    folder, _ = peft_folder("llama", peft.LoraConfig(r=4, lora_alpha=8), tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"weights": {}, "note": object.__new__(Exploit)}, folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        deltakit.load(tm.make("llama"), folder)
    assert not Exploit.ran


class Exploit:
    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True


REFUSALS = {
    "use_dora": (dict(use_dora=True), "use_dora"),
    "bias_all": (dict(bias="all"), "bias='all'"),
    "pissa": (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "embedding": (dict(target_modules=["embed_tokens", "q_proj"]), "embedding"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_inexact_settings_are_refused(case, tmp_path):
    options, message = REFUSALS[case]
    folder, _ = peft_folder("llama", peft.LoraConfig(r=4, lora_alpha=8, **options), tmp_path)
    model = tm.make("llama")
    with pytest.raises(CheckpointError, match=message):
        deltakit.load(model, folder)
    assert not deltakit.handles(model) and not any("deltakit" in n for n, _ in model.named_parameters())


def test_unknown_setting_and_mismatched_files_are_refused(tmp_path):
    folder, _ = peft_folder("llama", peft.LoraConfig(r=4, lora_alpha=8), tmp_path)
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    file.write_text(json.dumps({**config, "future_setting": {"on": True}}))
    with pytest.raises(CheckpointError, match="future_setting"):
        deltakit.load(tm.make("llama"), folder)
    file.write_text(json.dumps({**config, "r": 16}))
    with pytest.raises(CheckpointError, match="rank 4 in the file but 16"):
        deltakit.load(tm.make("llama"), folder)
    file.write_text(json.dumps({**config, "target_modules": ["k_proj"]}))
    with pytest.raises(CheckpointError, match="target_modules"):
        deltakit.load(tm.make("llama"), folder)
    file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has no module named"):
        deltakit.load(tm.make("gpt2"), folder)


def test_prefix_tuning_is_refused(tmp_path):
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    folder, _ = peft_folder("gpt2", config, tmp_path)
    with pytest.raises(CheckpointError, match="prefix tuning cannot be loaded exactly"):
        deltakit.load(tm.make("gpt2"), folder)


@pytest.mark.parametrize("family,task", [("gpt2", "CAUSAL_LM"), ("llama", "CAUSAL_LM"), ("t5", "SEQ_2_SEQ_LM"),
                                         ("mbart", "SEQ_2_SEQ_LM"), ("bert_cls", "SEQ_CLS")])
@pytest.mark.parametrize("kind", ["prompt", "p_tuning"])
def test_prompt_tuning_gives_peft_outputs(family, task, kind, tmp_path):
    n = 3
    if kind == "prompt":
        config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n)
    else:
        config = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, encoder_hidden_size=16)
    folder, want = peft_folder(family, config, tmp_path)
    h, got = load_and_run(family, folder)
    if task == "CAUSAL_LM":   # PEFT's logits keep the prompt positions, deltakit strips them; padding: no answer
        want, real = want[:, n:], inputs(family)["attention_mask"].bool()
        want, got = want[real], got[real]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert h.spec == f"prompt(n={n})@embed" + ("; full@head" if task == "SEQ_CLS" else "")


def test_prompt_on_xlmr_is_refused(tmp_path):
    """XLM-R counts positions from padding_idx + 1 over the ids; PEFT's inputs_embeds path does not."""
    folder, _ = peft_folder("xlmr", peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), tmp_path)
    with pytest.raises(CheckpointError, match="xlm-roberta"):
        deltakit.load(tm.make("xlmr"), folder)


@pytest.mark.parametrize("family,spec", [("gpt2", "lora(r=4)@attn.q,attn.v; lora(r=2,alpha=3)@ffn.out"),
                                         ("xlmr", "lora@attn.q; full@head")])
def test_round_trip_deltakit_peft_deltakit(family, spec, tmp_path):
    model = tm.make(family)
    h = deltakit.attach(model, spec)
    model.eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(h.named_parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        want = tm.run(model, tm.inputs(family))
    h.save(tmp_path, format="peft")
    again = tm.make(family)
    h2 = deltakit.load(again, tmp_path)
    again.eval()
    with torch.no_grad():
        got = tm.run(again, tm.inputs(family))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if family == "xlmr":   # no fused projection: the same deltas at the same positions, bit for bit
        assert h2.spec == "lora(r=8,alpha=16)@layers.0.attn.q,layers.1.attn.q; full@head"
        mine, theirs = h.state_dict(), h2.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # and back to PEFT's files: identical tensors
    h2.save(tmp_path / "again", format="peft")
    from safetensors.torch import load_file
    first, second = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(
        str(tmp_path / "again" / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for k in first:
        assert torch.equal(first[k], second[k]), k
