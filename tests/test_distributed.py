"""deltakit.distributed under real process groups: 2 (and 4) gloo processes on the CPU, started here
as torchrun starts them (tests/distributed_launch.py), each one tests/distributed_worker.py.

Each spawned scenario runs once per module (fixtures) and writes reports; the tests below assert on
them. Every spawn has a timeout, so a hang fails instead of blocking the suite.
"""
import json

import pytest
import torch

import deltakit
from deltakit import checkpoint
from deltakit import distributed as dist
from deltakit.backbones import cpm2, cpmant
from deltakit.backbones import megatron as mg

import distributed_worker as w
from distributed_launch import launch

TOL = 1e-5


def spawned(scenario, world, out, **kw):
    run = launch(scenario, world, out, **kw)
    assert run.ok, f"{scenario} with {world} ranks failed or hung:\n{run.explain()}"
    return run


# ---- 2 ranks: gradients, saving, guards, lockstep, helpers --------------------------------------

@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity")
    run = spawned("parity", 2, out)
    return out, run.reports


def test_loss_and_delta_gradients_equal_one_process(parity):
    _, reports = parity
    for rank_report in reports:
        cases = rank_report["cases"]
        assert {(c["model"], c["type"], c["checkpointing"]) for c in cases} == {
            (m, t, ac) for m in w.MODELS for t in ("lora", "adapter", "prefix", "prompt", "bitfit") for ac in (False, True)}
        for c in cases:
            where = f"{c['model']} {c['type']} checkpointing={c['checkpointing']}"
            assert c["sharded"], f"{where}: a delta parameter is not sharded"
            assert abs(c["loss"] - c["ref_loss"]) < TOL * max(1.0, abs(c["ref_loss"])), where
            assert c["grad_scale"] > 1e-3, f"{where}: the gradients are ~0, the comparison would prove nothing"
            assert c["grad_diff"] < TOL * c["grad_scale"], where
            assert c["step_diff"] < TOL, f"{where}: AdamW over the shards moved the deltas elsewhere"
            assert c["first_linear_calls"] == (2 if c["checkpointing"] else 1), f"{where}: recomputed or not?"


def test_a_one_process_checkpoint_loads_into_the_shards(parity):
    _, reports = parity
    assert all(c["loaded_diff"] == 0.0 for r in reports for c in r["cases"])


def _files(folder):
    return checkpoint.read_tensors(folder), json.loads((folder / checkpoint.CONFIG).read_text())


@pytest.mark.parametrize("model", list(w.MODELS))
def test_saved_deltas_equal_a_one_process_save(parity, model):
    out, _ = parity
    sharded, sharded_cfg = _files(out / f"sharded-{model}")
    single, single_cfg = _files(out / f"single-{model}")
    assert sorted(sharded) == sorted(single)
    for k in single:
        torch.testing.assert_close(sharded[k], single[k], rtol=0, atol=TOL)
    for key in ("spec", "entries", "shared", "fingerprint"):
        assert sharded_cfg[key] == single_cfg[key], key
    from safetensors.torch import load_file
    peft_sharded = load_file(out / f"sharded-{model}-peft" / "adapter_model.safetensors")
    peft_single = load_file(out / f"single-{model}-peft" / "adapter_model.safetensors")
    assert sorted(peft_sharded) == sorted(peft_single)
    for k in peft_single:
        torch.testing.assert_close(peft_sharded[k], peft_single[k], rtol=0, atol=TOL)
    assert json.loads((out / f"sharded-{model}-peft" / "adapter_config.json").read_text()) == \
        json.loads((out / f"single-{model}-peft" / "adapter_config.json").read_text())


@pytest.mark.parametrize("model", list(w.MODELS))
def test_a_two_rank_checkpoint_loads_in_one_process(parity, model):
    out, _ = parity
    make, batch_fn, loss_fn, _ = w.MODELS[model]
    losses = []
    for folder in (f"sharded-{model}", f"single-{model}"):
        m = make()
        h = deltakit.load(m, out / folder)
        assert not any(dist.is_dtensor(p) for p in h.parameters())
        with torch.no_grad():
            losses.append(loss_fn(m, batch_fn()).item())
    assert losses[0] == pytest.approx(losses[1], abs=TOL)


def test_late_attach_and_other_changes_are_refused(parity):
    _, reports = parity
    for r in reports:
        g = r["guards"]
        assert g["attach"].startswith("HandleError") and "attach the deltas first" in g["attach"]
        assert g["load"].startswith("HandleError") and "attach the deltas first" in g["load"]
        assert g["detach"].startswith("HandleError") and "sharded" in g["detach"]
        assert g["merge"].startswith("HandleError") and "sharded" in g["merge"]
        assert "sharded already" in g["shard_twice"]
        assert g["late_params"] == 0   # the refused attach left no unmanaged parameter behind


def test_bf16_backbone_with_fp32_deltas(parity):
    _, reports = parity
    for r in reports:
        mp = r["mixed_precision"]
        assert mp["backbone_dtypes"] == ["torch.bfloat16"]
        assert mp["delta_dtypes"] == ["torch.float32"] and mp["grad_dtypes"] == ["torch.float32"]
        assert mp["loss"] == pytest.approx(mp["ref_loss"], rel=1e-2)
        assert mp["grad_rel_err"] < 0.1   # bf16 compute against the fp32 single-process run


def test_beam_search_with_different_batch_lengths_finishes_in_lockstep(parity):
    _, reports = parity
    for r in reports:
        assert r["beam"]["got"] == r["beam"]["expected"]
    assert [len(r["beam"]["got"]) for r in reports] == [2, 1]   # rank 0 ran two batches, rank 1 one


def test_sampler_split_reduce_gather_and_rank0_writing(parity):
    out, reports = parity
    h0, h1 = reports[0]["helpers"], reports[1]["helpers"]
    assert (h0["split"], h1["split"]) == ([0, 2, 4], [1, 3])   # every item on exactly one rank
    assert h0["gathered"] == h1["gathered"] == [[0, 2, 4], [1, 3]]
    assert h0["total"] == h1["total"] == 5 and h0["max"] == h1["max"] == 1
    assert sorted(h0["sampler"] + h1["sampler"]) == [0, 0, 1, 2, 3, 4]   # DistributedSampler evens out
    assert (out / "written-by.txt").read_text() == "0" and h0["on_main_result"] > 0 and h1["on_main_result"] is None
    assert h0["on_main_failure"] == "OSError: disk full"
    assert h1["on_main_failure"].startswith("DistributedError") and "rank 0 failed" in h1["on_main_failure"]


# ---- 2 ranks: loading without the whole model on any rank ------------------------------------------

@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    out = tmp_path_factory.mktemp("load")
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.rand(v.shape, generator=g) + 0.5 if "layernorm" in k else v   # not exact in bf16
          for k, v in w.cpmant_model(seed=3).state_dict().items()}
    torch.save(sd, out / "cpmant.pt")                                     # as CPM-Live ships it, in fp32
    dist.to_safetensors({k: v for k, v in sd.items() if k != "encoder.layers.1.ffn.ffn.w_out.weight"},
                        out / "cpmant-missing.safetensors")
    from test_cpm2 import reference_weights
    mg.save(out / "cpm2-megatron", mg.split(reference_weights(), 2, cpm2.MERGE_RULES))   # two model-parallel shards
    merged = mg.load_merged(out / "cpm2-megatron", cpm2.MERGE_RULES)
    dist.to_safetensors(cpm2.convert_state_dict(merged), out / "cpm2.safetensors")    # the one-time conversion
    run = spawned("load", 2, out)
    return run.reports


@pytest.mark.parametrize("model", ["cpmant", "cpm2"])
def test_load_sharded_equals_one_process_load_and_attach(loaded, model):
    for r in loaded:
        c = r[model]
        assert c["same_names"] and c["on_meta"] == []
        assert c["backbone_diff"] == 0.0
        assert c["delta_diff"] == 0.0   # the same seed gives the same deltas as load + attach in one process
        assert c["max_local_fraction"] <= 0.5 + 1e-9   # each rank holds half of every backbone tensor (or less)
        assert c["loss"] == pytest.approx(c["single_loss"], rel=1e-2 if model == "cpmant" else 1e-5)


def test_load_sharded_names_a_missing_tensor(loaded):
    for r in loaded:
        assert r["missing"].startswith("CheckpointError") and "encoder.layers.1.ffn.ffn.w_out.weight" in r["missing"]


# ---- 4 ranks: 2 "nodes" x 2, and CPU offload ----------------------------------------------------------

@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    out = tmp_path_factory.mktemp("hsdp")
    run = spawned("hsdp", 4, out, per_node=2, timeout=300)
    return run.reports


@pytest.mark.parametrize("kind", ["hsdp", "offload"])
def test_hybrid_and_offloaded_sharding_equal_one_process(hybrid, kind):
    for r in hybrid:
        c = r[kind]
        assert abs(c["loss"] - c["ref_loss"]) < TOL * max(1.0, abs(c["ref_loss"]))
        assert c["grad_scale"] > 1e-3 and c["grad_diff"] < TOL * c["grad_scale"]
    placements = hybrid[0]["hsdp"]["placements"]
    assert placements == ["(Replicate(), Shard(dim=0))"]
    assert hybrid[0]["offload"]["devices"] == ["cpu"]


def test_only_delta_gradients_cross_the_replicate_dimension(hybrid):
    per_node = {}
    for r in hybrid:
        c = r["hsdp"]
        assert c["replicate_calls"] == ["all_reduce"]   # no all-gather of the backbone across nodes
        assert c["replicate_bytes"] == c["local_trainable_bytes"]   # this rank's shard of the delta gradients
        per_node.setdefault(tuple(c["shard_group"]), 0)
        per_node[tuple(c["shard_group"])] += c["replicate_bytes"]
    trainable = hybrid[0]["hsdp"]["num_trainable"]
    assert set(per_node.values()) == {4 * trainable}   # a node sends the delta gradients once, in fp32
    assert 4 * trainable < hybrid[0]["hsdp"]["backbone_bytes"] / 20
    assert all(r["hsdp"]["shard_bytes"] > 0 for r in hybrid)   # the backbone is gathered inside a node


# ---- faults: a killed rank ends the run with an error; the same command resumes ------------------------

def test_a_killed_rank_ends_the_run_with_an_error_and_the_run_resumes(tmp_path):
    reference = spawned("train", 1, tmp_path / "one", args=["--steps", 4])

    run = launch("train", 2, tmp_path / "two", args=["--steps", 4, "--kill-step", 2, "--timeout", 30], timeout=120)
    assert run.codes[1] == -9   # rank 1 killed itself in step 2
    assert run.codes[0] not in (0, None), f"rank 0 should have failed, not {'hung' if run.codes[0] is None else 'passed'}"
    assert "DistributedError" in run.logs[0] and "Run the same command again" in run.logs[0]
    assert not (tmp_path / "two" / "final").exists()

    resumed = spawned("train", 2, tmp_path / "two", args=["--steps", 4])   # the same command, again
    assert [r["start"] for r in resumed.reports] == [2, 2]
    final, expected = (checkpoint.read_tensors(p / "final") for p in (tmp_path / "two", tmp_path / "one"))
    for k in expected:   # two ranks, killed and resumed = one process, uninterrupted
        torch.testing.assert_close(final[k], expected[k], rtol=0, atol=TOL)
    assert resumed.reports[0]["losses"] == pytest.approx(reference.reports[0]["losses"][2:], abs=TOL)


def test_a_rank_that_stops_answering_ends_the_run_after_the_timeout(tmp_path):
    run = launch("train", 2, tmp_path, args=["--steps", 4, "--hang-step", 1, "--timeout", 4], timeout=120)
    assert run.codes[1] == 3   # it slept twice the timeout, then left
    assert run.codes[0] not in (0, None)
    assert "DistributedError" in run.logs[0] and "Timed out" in run.logs[0]


# ---- the README's training script, on two CPU processes ----------------------------------------------

def documented_script(tmp_path):
    from pathlib import Path
    text = (Path(__file__).parent.parent / "docs" / "distributed.md").read_text(encoding="utf-8")
    section = text.split("## A training script", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "train.py"
    path.write_text(code, encoding="utf-8")
    return path


def test_the_documented_training_script_trains_saves_and_resumes(tmp_path):
    script = documented_script(tmp_path)
    dist.to_safetensors(w.cpmant_model().state_dict(), tmp_path / "tiny.safetensors")
    g = torch.Generator().manual_seed(0)
    lines = [json.dumps({"ids": torch.randint(8, 96, (int(n),), generator=g).tolist()})
             for n in torch.randint(3, 9, (10,), generator=g)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--checkpoint", tmp_path / "tiny.safetensors", "--config", "tiny", "--data", tmp_path / "train.jsonl",
            "--out", tmp_path / "run", "--batch", 2, "--save-every", 2]
    for steps in (3, 5):   # the second command resumes from the state the first one saved
        run = launch("script", 2, tmp_path / "logs", args=[*args, "--steps", steps], script=script)
        assert run.ok, run.explain()
        from safetensors import safe_open
        with safe_open(str(tmp_path / "run" / "state.safetensors"), "pt") as f:
            assert json.loads(f.metadata()["state"])["step"] == steps
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the fingerprint the ranks wrote fits the backbone they trained on
        h = deltakit.load(cpmant.load_cpmant(tmp_path / "tiny.safetensors", "tiny"), tmp_path / "run" / "deltas")
    assert h.num_trainable == 2 * 2 * 8 * (32 + 32)   # 2 layers x (q, v) x r=8 x (in + out)


def test_the_benchmark_measures_half_the_backbone_per_rank(tmp_path):
    from benchmarks import distributed as bench
    bench.main(["--config", "tiny", "--worlds", "2", "--steps", "1", "--seq", "8", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "summary.json").read_text())["results"]
    plain, (r0, r1) = results["plain"][0], results["fsdp-2"]
    for r in (r0, r1):
        assert r["backbone_bytes"] == r["computed"]["backbone_shard"] <= plain["backbone_bytes"] / 2 * 1.01
        assert r["backbone_grads"] == 0 and r["optimizer_tensors"] == r["delta_tensors"] == plain["delta_tensors"]
        assert r["optimizer_bytes"] == pytest.approx(plain["optimizer_bytes"] / 2, rel=0.01)   # + the step counts
    assert r0["losses"] == pytest.approx(plain["losses"], rel=1e-2)   # bf16, the batch split over two ranks
    assert (tmp_path / "distributed.png").stat().st_size > 0
