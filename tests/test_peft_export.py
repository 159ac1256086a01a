"""h.save(path, format="peft"): PEFT loads the folder into a fresh copy of the backbone and gives
the same outputs as the deltakit-attached model."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import deltakit

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, SEED = 96, 1234


def _config(kind):
    tf = transformers
    if kind == "xlmr":
        return tf.XLMRobertaForSequenceClassification, tf.XLMRobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, type_vocab_size=1, num_labels=3, pad_token_id=1,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                 bos_token_id=0, eos_token_id=0)
    if kind == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
    if kind == "t5":
        return tf.T5ForConditionalGeneration, tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1)
    raise ValueError(kind)


def build(kind):
    """A tiny model with seeded random weights; two calls give identical weights."""
    cls, config = _config(kind)
    torch.manual_seed(SEED)
    model = cls(config)
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                    else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def batch(kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(2, VOCAB, (2, 5), generator=g)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def randomise(handle, seed=1):
    """Deltas start as no-ops (B = 0, full = 0): make them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(handle.named_parameters()):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def roundtrip(kind, spec, tmp_path, prepare=None):
    model = build(kind)
    with torch.no_grad():
        bare = model(**batch(kind)).logits
    h = deltakit.attach(model, spec)
    model.eval()   # the delta modules are built in training mode (dropout on) even on an eval model
    randomise(h)
    if prepare:
        prepare(h)
    with torch.no_grad():
        want = model(**batch(kind)).logits
    assert not torch.allclose(want, bare, atol=1e-3), "the deltas should change the outputs"
    h.save(tmp_path, format="peft")
    loaded = peft.PeftModel.from_pretrained(build(kind), str(tmp_path)).eval()
    with torch.no_grad():
        got = loaded(**batch(kind)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return json.loads((tmp_path / "adapter_config.json").read_text()), loaded


def test_xlmr_lora_and_full_head(tmp_path):
    config, loaded = roundtrip("xlmr", "lora@attn.q,attn.v; full@head", tmp_path)
    assert config["task_type"] == "SEQ_CLS" and config["peft_type"] == "LORA" and config["inference_mode"]
    assert config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == [f"roberta.encoder.layer.{i}.attention.self.{m}"
                                                for i in (0, 1) for m in ("query", "value")]


def test_xlmr_lora_only_saves_the_untouched_head(tmp_path):
    """PeftModelForSequenceClassification always wraps `classifier` and requires its weights."""
    config, _ = roundtrip("xlmr", "lora@attn.q", tmp_path)
    assert config["modules_to_save"] == ["classifier"]


def test_gpt2_fused_slices(tmp_path):
    config, loaded = roundtrip("gpt2", "lora@attn.q,attn.v", tmp_path)
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # q and v stacked: r = 8 + 8, same scale 16/8 kept as alpha / r
    assert (config["r"], config["lora_alpha"]) == (16, 32) and isinstance(config["lora_alpha"], int)
    assert not config["rank_pattern"] and not config["alpha_pattern"]


def test_gpt2_ranks_and_alphas_per_rule(tmp_path):
    config, _ = roundtrip("gpt2", "lora(r=4)@attn.q; lora(r=2,alpha=8)@attn.o", tmp_path)
    assert {config["r"], *config["rank_pattern"].values()} == {4, 2}
    assert config["rank_pattern"] and config["alpha_pattern"]


def test_gpt2_mixed_scales_gates_dropout(tmp_path):
    """Different scales on one fused module, scalar and per-feature gates: folded into B."""
    def gate(h):
        for i, e in enumerate(h.entries):
            e.gate = torch.tensor(0.5) if i % 2 else torch.linspace(-1, 1, e.position.shape[1])
    config, _ = roundtrip("gpt2", "lora(r=4,dropout=0.1)@attn.q; lora(r=2,alpha=3,dropout=0.1)@attn.v", tmp_path,
                          prepare=gate)
    assert config["lora_dropout"] == 0.1
    assert config["lora_alpha"] == config["r"] == 6   # scale folded: alpha = r


def test_llama(tmp_path):
    config, _ = roundtrip("llama", "lora@attn.q,attn.v; lora(r=4,alpha=4)@ffn.out", tmp_path)
    assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is False


def test_t5_encoder_and_cross_attention(tmp_path):
    config, _ = roundtrip("t5", "lora@encoder.attn.q,encoder.attn.v,decoder.cross.q,decoder.cross.v", tmp_path)
    assert config["task_type"] == "SEQ_2_SEQ_LM" and len(config["target_modules"]) == 8


def test_merged_handle_exports_the_same(tmp_path):
    roundtrip("xlmr", "lora@attn.q; full@head", tmp_path, prepare=lambda h: h.merge())


def test_non_lora_raises(tmp_path):
    h = deltakit.attach(build("gpt2"), "lora@attn.q; bitfit@ffn.out; adapter@attn")
    with pytest.raises(deltakit.CheckpointError) as err:
        h.save(tmp_path / "out", format="peft")
    msg = str(err.value)
    assert "layers.0.ffn.out (bitfit)" in msg and "layers.1.attn (adapter)" in msg
    assert "only lora" in msg
    assert not (tmp_path / "out").exists()   # nothing half-written


def test_full_alone_raises(tmp_path):
    """PEFT will not load a LoRA config whose target_modules match nothing."""
    h = deltakit.attach(build("xlmr"), "full@head")
    with pytest.raises(deltakit.CheckpointError, match="no lora deltas"):
        h.save(tmp_path, format="peft")
