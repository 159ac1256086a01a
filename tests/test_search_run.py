"""End to end on a tiny offline model and task: outputs, the spec round trip through
deltakit.attach/load, errors, and resuming after kill -9 with the uninterrupted result."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import deltakit
from search.errors import BudgetError
from search.tiny import make_model, make_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return make_model(d / "tiny-xlmr"), make_task(d / "task.jsonl", n=240)


def _cfg(tiny, out, **kw):
    from search.s3pet import Config
    model, task = tiny
    base = dict(budget="2k", model=str(model), task=str(task), n_train=None, n_dev=24, n_test=48, batch_size=8,
                search_steps=12, retrain_epochs=1, lr_weights=3e-3, retrain_lr=3e-3, output_dir=str(out), progress=False)
    return Config(**{**base, **kw})


def test_search_writes_outputs_and_spec_round_trips(tiny, tmp_path):
    from search.models import load_backbone
    from search.s3pet import run
    out = tmp_path / "run"
    result = run(_cfg(tiny, out, order=2, jacobian="adamw"))
    for name in ("structure.json", "structure.spec", "gates.png", "metrics.json", "deltas", "search.ckpt.safetensors"):
        assert (out / name).exists(), name
    assert (out / "gates.png").stat().st_size > 2000
    structure = json.loads((out / "structure.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < structure["cost"] <= structure["budget"] == 2000
    assert structure["cost"] == sum(c["params"] for c in structure["chosen"]) == result.cost
    assert len(structure["candidates"]) == metrics["num_candidates"]
    assert set(result.test) == {"accuracy", "macro_f1"}
    assert (out / "structure.spec").read_text().strip() == result.spec

    # the spec string re-applies exactly the chosen deltas (plus the fixed head) on a fresh backbone
    fresh = load_backbone(str(tiny[0]), 2, seed=0)
    h = deltakit.attach(fresh.model, result.spec)
    keys = {e.key for e in h.entries}
    assert {c["key"] for c in structure["chosen"]} <= keys
    assert sum(e.num_params for e in h.entries if e.key in {c["key"] for c in structure["chosen"]}) == result.cost
    assert keys - {c["key"] for c in structure["chosen"]} == {"head.full"}
    h.detach()
    # and the saved deltas reproduce the retrained model's outputs
    loaded = deltakit.load(fresh.model, out / "deltas")
    batch = {"input_ids": torch.tensor([[0, 5, 9, 30, 2]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    result.model.eval(); fresh.model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(**batch).logits, fresh.model(**batch).logits, atol=1e-5)
    loaded.detach()


def test_random_strategy_and_custom_space(tiny, tmp_path):
    from search.s3pet import run
    r = run(_cfg(tiny, tmp_path / "rand", strategy="random", space="lora(r=2)@attn.q,attn.v; bitfit@ln.*", budget="400"))
    assert 0 < r.cost <= 400
    assert all(k.endswith((".lora", ".bitfit")) for k in r.chosen)


def test_budget_errors_before_training(tiny, tmp_path):
    from search.s3pet import run
    with pytest.raises(BudgetError, match="whole search space"):
        run(_cfg(tiny, tmp_path / "a", budget="90%"))
    with pytest.raises(BudgetError, match="cheapest candidate"):
        run(_cfg(tiny, tmp_path / "b", budget="10"))
    with pytest.raises(deltakit.DeltakitError):
        run(_cfg(tiny, tmp_path / "c", space="lora@no.such.place"))


def _cli(tiny, out, *extra):
    model, task = tiny
    return [sys.executable, "-m", "search.s3pet", "--budget", "2k", "--model", str(model), "--task", str(task),
            "--n-train", "none", "--n-dev", "24", "--n-test", "48", "--batch-size", "8", "--search-steps", "40",
            "--ckpt-every", "4", "--evals", "5", "--lr-weights", "3e-3", "--order", "2", "--progress", "false",
            "--threads", "1", "--output-dir", str(out), *extra]


def test_resume_after_kill_reproduces_uninterrupted_run(tiny, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_cli(tiny, tmp_path / "full"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tiny, out, "--step-sleep", "0.1"), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "search.ckpt.safetensors"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "structure.json").exists()     # killed mid-search

    again = subprocess.run(_cli(tiny, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((tmp_path / "full" / "structure.json").read_text())
    b = json.loads((out / "structure.json").read_text())
    assert a["chosen"] == b["chosen"]
    assert [c["p"] for c in a["candidates"]] == [c["p"] for c in b["candidates"]]   # bit-identical gates
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", out))
    assert ma["test"] == mb["test"] and ma["search"]["best_step"] == mb["search"]["best_step"]


def test_checkpoint_of_other_settings_is_refused_and_one_from_before_a_new_setting_resumes(tiny, tmp_path):
    from search import ckpt
    from search.errors import SearchError
    from search.s3pet import CKPT, run
    out = tmp_path / "r"
    first = run(_cfg(tiny, out, search_steps=6))
    with pytest.raises(SearchError, match=r"other settings \(lr_weights\).*--fresh"):
        run(_cfg(tiny, out, search_steps=6, lr_weights=1e-3))
    # a checkpoint written before Config had `verbalizer`: the missing key means its default
    tensors, state = ckpt.load(out / CKPT)
    del state["config"]["verbalizer"]
    ckpt.save(out / CKPT, tensors, state)
    again = run(_cfg(tiny, out, search_steps=6))
    assert again.chosen == first.chosen and again.probs == first.probs
    with pytest.raises(SearchError, match=r"other settings \(verbalizer\)"):
        run(_cfg(tiny, out, search_steps=6, verbalizer="neg,pos"))
