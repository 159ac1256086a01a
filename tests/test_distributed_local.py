"""deltakit.distributed in this one process: where the units go, what shard() refuses before it
shards anything, the helpers at world size 1, the checkpoint conversion, and FSDP at world size 1
(a process group of one, as on a single GPU)."""
import pytest
import torch

import deltakit
from deltakit import distributed as dist
from deltakit.backbones import cpm2, cpmant
from deltakit.errors import HandleError

import tiny_models as tm


@pytest.mark.parametrize("family, expected", [
    ("bert", ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
    ("gpt2", ["transformer.h.0", "transformer.h.1"]),
    ("llama", ["model.layers.0", "model.layers.1"]),
    ("t5", ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]),
    ("cpmant", ["cpmant.encoder.layers.0", "cpmant.encoder.layers.1"]),
])
def test_blocks_come_from_the_family_tables(family, expected):
    assert dist.find_blocks(tm.make(family)) == expected


def test_blocks_of_the_cpm_backbones():
    assert dist.find_blocks(cpmant.build("tiny", device="meta")) == ["encoder.layers.0", "encoder.layers.1"]
    assert dist.find_blocks(cpm2.build(cpm2.tiny_config(), "meta")) == [
        "encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]


def test_a_block_that_carries_deltas_or_hooks_is_refused():
    model = tm.make("llama")
    deltakit.attach(model, "lora@attn.q; full@re:model\\.layers\\.1")
    with pytest.raises(dist.DistributedError, match="q_proj holds deltas"):
        dist.shard(model, blocks=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(dist.DistributedError, match="model.layers.1 holds deltas"):
        dist.shard(model, blocks=["model.layers.1"])
    assert not dist.is_sharded(model)


def test_a_delta_run_outside_its_block_is_refused():
    model = tm.make("llama")
    deltakit.attach(model, "prompt(n=2)")   # its vectors live under model.embed_tokens; the model's input hook runs them
    with pytest.raises(dist.DistributedError, match="prompt belongs to block 'model' but runs in 'the root'"):
        dist.shard(model, blocks=["model"])


def test_trainable_parameters_mixing_dtypes_in_a_block_are_named():
    model = tm.make("llama").to(torch.bfloat16)
    deltakit.attach(model, "lora@attn.q")
    model.model.layers[1].input_layernorm.weight.requires_grad_(True)   # an unfrozen bf16 norm next to fp32 LoRA
    with pytest.raises(dist.DistributedError) as e:
        dist.shard(model)
    assert "model.layers.1" in str(e.value) and "model.layers.1.input_layernorm.weight" in str(e.value)
    assert "bfloat16" in str(e.value) and "float32" in str(e.value)


def test_bad_layouts_and_options_say_what_to_do():
    model = tm.make("llama")
    with pytest.raises(dist.DistributedError, match="offload"):
        dist.shard(model, offload="disk")
    with pytest.raises(dist.DistributedError, match="not a module"):
        dist.shard(model, blocks=["model.layerz.0"])
    with pytest.raises(dist.DistributedError, match="non-nested"):
        dist.shard(model, blocks=["model.layers.0", "model.layers.0.mlp"])
    generic = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(dist.DistributedError, match="pass blocks="):
        dist.shard(generic)


def test_helpers_at_world_size_one():
    assert not dist.is_distributed() or dist.world_size() == 1
    assert dist.rank() == 0 and dist.is_main()
    assert dist.split([3, 1, 2]) == [3, 1, 2]
    assert dist.reduce({"correct": 3, "total": 4}) == {"correct": 3.0, "total": 4.0}
    assert dist.gather({"a": [1, "好"]}) == [{"a": [1, "好"]}]
    assert dist.on_main(lambda x: x + 1, 1) == 2
    calls = []
    with dist.lockstep(torch.nn.Linear(2, 2), idle=lambda: calls.append(1)):
        pass
    assert calls == []
    with pytest.raises(ValueError):
        with dist.guard():
            raise ValueError("not a collective")   # passes through unchanged


def test_guard_names_a_failed_collective():
    with pytest.raises(dist.DistributedError, match="rank 0 of 1: training stopped .*Run the same command again"):
        with dist.guard("training"):
            raise RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")


def test_to_safetensors_converts_and_unshares(tmp_path):
    qkv = torch.randn(6, 4)
    q, k, v = qkv.chunk(3)   # views of one storage, as a fused projection split in three
    path = dist.to_safetensors({"q": q, "k": k, "v": v, "n": torch.arange(3)}, tmp_path / "x.safetensors",
                               dtype=torch.bfloat16)
    back = dist.read_checkpoint(path)
    assert back["q"].dtype == torch.bfloat16 and back["n"].dtype == torch.int64
    torch.testing.assert_close(back["v"], v.to(torch.bfloat16))


@pytest.fixture
def group_of_one():
    """A process group of this one process (no torchrun environment), left again afterwards."""
    was = dist.is_distributed()
    dist.init()
    yield
    if not was:
        dist.shutdown()


def test_fsdp_at_world_size_one_trains_like_the_plain_model(group_of_one, tmp_path):
    batch = {"input_ids": torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(0))}
    batch["labels"] = batch["input_ids"]
    losses = []
    for sharded in (False, True):
        model = tm.make("llama")
        torch.manual_seed(0)
        h = deltakit.attach(model, "lora(r=4)@attn.q,attn.v; prompt(n=2)")
        if sharded:
            dist.shard(model, checkpointing=True)
            assert dist.is_sharded(model) and all(dist.is_dtensor(p) for p in h.parameters())
            with pytest.raises(HandleError, match="attach the deltas first"):
                deltakit.attach(model, "bitfit@ffn.out", name="late")
        opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
        for _ in range(2):
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        h.save(tmp_path / str(sharded))
        dist.save_state(tmp_path / f"{sharded}.state", h, opt, step=2)
    assert losses[:2] == pytest.approx(losses[2:], abs=1e-6)
    plain, shard = (deltakit.checkpoint.read_tensors(tmp_path / s) for s in ("False", "True"))
    for k in plain:
        torch.testing.assert_close(shard[k], plain[k], rtol=0, atol=1e-6)
    model = tm.make("llama")   # the state of the sharded run resumes in a plain model
    h = deltakit.attach(model, "lora(r=4)@attn.q,attn.v; prompt(n=2)")
    opt = torch.optim.AdamW(h.parameters(), lr=1e-2)
    state = dist.load_state(tmp_path / "True.state", h, opt)
    assert state["step"] == 2 and state["world_size"] == 1
    assert set(opt.state[h.parameters()[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    for k, v in h.state_dict().items():
        torch.testing.assert_close(v, plain[k], rtol=0, atol=1e-6)
    assert dist.load_state(tmp_path / "none.state", h, opt) is None
