"""The speed benchmark runs end to end on tiny models (--quick) and prints its ratio rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_quick_runs_and_prints_ratios(tmp_path):
    out = tmp_path / "speed.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--quick", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for model in ("e5", "cpmant"):
        rows = [line for line in proc.stdout.splitlines() if model in line]
        for what in ("train step: deltakit / PEFT", "infer merged / bare: deltakit",
                     "infer merged / bare: PEFT", "train peak memory MB",
                     "train saved activations MB"):
            assert any(what in line for line in rows), (model, what, proc.stdout)
    results = json.loads(out.read_text())["results"]
    for r in results.values():
        assert r["stats"]["train"]["deltakit"]["median"] > 0
        assert r["memory"]["deltakit"]["peak_over_model_mb"] > 0
        assert max(r["merge_rel_diff"].values()) < 1e-4   # merging kept the outputs


def test_cpmant_10b_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "cpmant.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpmant_10b", "--config", "tiny", "--device", "cpu",
                           "--dtype", "float32", "--seq", "16", "--batch", "1,2", "--steps", "1", "--reps", "2",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["runs"]] == [1, 2]
    for r in report["runs"]:
        assert r["trainable"] == {"deltakit": 2048, "peft": 2048}   # 2 layers x q,v x r=8 x (32 + 32)
        assert abs(r["last_loss"]["deltakit"] - r["last_loss"]["peft"]) < 1e-3


def test_hyper_sentiment_two_tasks_runs_small():
    """The issue-3 benchmark end to end on a sliver of the real data: one hypernetwork, two tasks in
    every batch, a head learning rate of its own; the result names both tasks and their majorities."""
    import deltakit
    from benchmarks.hyper_sentiment import Config, run
    from benchmarks.sentiment import load_model
    from deltakit.assets import e5_small_path
    spec = "hyper(adapter,dim=4,hidden=8,tasks=2)@attn; full@head"
    r = run(Config(spec=spec, tasks="sentiment,length", n_train=48, n_test=32, max_length=16, batch_size=16,
                   head_lr=1e-3, threads=1))
    assert r["steps"] == 6 and r["tasks"] == ["sentiment", "length"]
    for task in r["tasks"]:
        assert 0 <= r[task]["accuracy"] <= 1 and 0.5 <= r[task]["majority"] <= 1
    assert set(r["sentiment"]) == {"accuracy", "majority", "accuracy_with_task_id_of_length"}
    assert r["trainable"] == deltakit.plan(load_model(e5_small_path(), 0)[0], spec).num_params
