"""S3PET on CUGE (`--task cuge:<name> --data-dir DIR`, search/cuge.py): a CCPM search on a tiny
native CPM-Ant (CPM-Live's file layout) scores rows exactly as CUGE's CPM-Ant recipe does (the
"是" logit per option), and the CUGE runner, given the search's structure.spec as --delta, trains
exactly that structure; an encoder gets the recipe's multiple-choice head as the fixed part; the
splits follow the files (dev halved when the test answers are hidden, held out from Sogou-Log's
training pairs); the datasets the search cannot score, and bad settings, are refused up front."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("jieba")
pytest.importorskip("datasets")

from benchmarks.cuge import fixtures as fx  # noqa: E402
from benchmarks.cuge import tiny  # noqa: E402
import deltakit  # noqa: E402
from search import cuge  # noqa: E402
from search.data import Rows  # noqa: E402
from search.errors import DataError, SearchError  # noqa: E402
from search.s3pet import Config, main, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEARCH = dict(budget="2%", n_train=None, batch_size=4, search_steps=6, retrain_epochs=1, retrain_evals=1,
              lr_weights=3e-3, retrain_lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3cuge")
    data = fx.write_released("ccpm", root / "data", {"train": 24, "dev": 8, "test": 8})
    fx.write_released("c3", data, {"train": 12, "dev": 8, "test": 4})
    ant = fx.write_cpmant("sogou_log", root / "ant", {"train": 40, "dev": 4, "test": 4})
    fx.write_cpmant("ccpm", ant, {"train": 8, "dev": 8, "test": 4})
    chars = tiny.chars_of(data, ant)
    return {"data": data, "ant": ant, "cpmant": tiny.make_cpmant(root / "model", chars),
            "encoder": tiny.make_encoder(root / "enc", chars), "gpt2": tiny.make_gpt2(root / "gpt2", chars),
            "cpm2": tiny.make_cpm2(root / "cpm2", chars)}


def _fresh_cpmant(ckpt: Path):
    from benchmarks.cuge.recipes import cpmant
    return cpmant.load(ckpt)


def test_ccpm_search_then_the_cuge_run_trains_exactly_its_structure(world, tmp_path, capsys):
    from benchmarks.cuge import data as cuge_data, run as cuge_run
    from benchmarks.cuge.recipes.cpmant import choice_logits
    out = tmp_path / "search"
    argv = ["--task", "cuge:ccpm", "--data-dir", str(world["data"]), "--model", str(world["cpmant"]),
            "--output-dir", str(out), "--budget", "2%", "--n-train", "none", "--batch-size", "4", "--search-steps",
            "6", "--retrain-epochs", "4", "--retrain-evals", "2", "--lr-weights", "3e-3", "--retrain-lr", "1e-2", "--progress", "false"]
    assert main(argv) == 0                                        # python -m search.s3pet ...
    summary = json.loads(capsys.readouterr().out)
    spec = (out / "structure.spec").read_text(encoding="utf-8").strip()
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert spec == summary["spec"] and m["fixed_params"] == 0      # CPM-Ant: no head, the LM head scores
    assert 0 < m["cost"] <= m["budget"] and m["data"]["train"] == 24 and m["data"]["test"] == 8
    assert m["data"]["splits"]["dev"] == "the dev split" and m["config"]["max_length"] is None   # the recipe's 256

    # the search scored test rows as CUGE's recipe does: its deltas, loaded on a fresh CPM-Ant and
    # read through recipes.cpmant.choice_logits, give the accuracy the search reported
    recipe = _fresh_cpmant(world["cpmant"])
    searched = deltakit.load(recipe.model, out / "deltas")
    rows = list(cuge_data.load("ccpm", world["data"], "test"))
    recipe.model.eval()
    with torch.no_grad():
        preds = choice_logits(recipe.model, recipe.tokenizer, rows, 256).argmax(-1).tolist()
    accuracy = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert summary["test"]["accuracy"] == pytest.approx(accuracy) and accuracy > 0.5   # learnt: chance is 1/4
    structure = {e.key: e.num_params for e in searched.entries}
    assert sum(structure.values()) == m["cost"]
    searched.detach()

    # the CUGE runner re-applies structure.spec and trains those deltas, no others
    run_out = tmp_path / "cuge"
    assert cuge_run.main(["--task", "ccpm", "--model", str(world["cpmant"]), "--data-dir", str(world["data"]),
                          "--delta", str(out / "structure.spec"), "--output-dir", str(run_out), "--max-steps", "2",
                          "--batch-size", "4", "--eval-every", "2", "--no-progress"]) == 0
    r = json.loads((run_out / "metrics.json").read_text(encoding="utf-8"))
    assert r["delta"] == spec and r["trainable"] == m["cost"]
    assert r["scores"] and all(isinstance(v, float) for v in r["scores"].values())
    trained = deltakit.load(_fresh_cpmant(world["cpmant"]).model, run_out / "deltas")
    assert {e.key: e.num_params for e in trained.entries} == structure


def test_a_batch_of_choice_rows_is_the_recipe_s_scoring(world):
    """Rows of 2 and 4 options in one batch: the backbone's loss is the cross-entropy of
    choice_logits over each row's own options, its predictions their argmax."""
    from benchmarks.cuge.recipes.cpmant import choice_logits
    task = cuge.load_task("cuge:ccpm", world["data"], None, 8, 8)
    backbone = cuge.load_backbone(str(world["cpmant"]), task, seed=0, device="cpu", max_length=96)
    rows = [dict(task.train[0]), {**task.train[1], "options": task.train[1]["options"][:2], "label": 1}]
    batch = Rows(rows).batch([0, 1])
    assert batch["labels"].tolist() == [task.train[0]["label"], 1]
    backbone.model.eval()
    with torch.no_grad():
        scores = choice_logits(backbone.model, backbone.tokenizer, rows, 96)
        assert torch.isinf(scores[1, 2:]).all() and torch.isfinite(scores[0]).all()
        torch.testing.assert_close(backbone.loss(batch), torch.nn.functional.cross_entropy(scores, batch["labels"]))
        assert backbone.predict(batch) == scores.argmax(-1).tolist()
    # a split of a memory-mapped Dataset gives the same rows as a list of them
    assert Rows(task.train).batch([3, 1])["rows"] == [dict(task.train[3]), dict(task.train[1])]


def test_an_encoder_searches_with_the_recipe_s_multiple_choice_head(world, tmp_path):
    """C3 as released has no test answers: the dev split is halved into dev and test."""
    from benchmarks.cuge import run as cuge_run
    out = tmp_path / "c3"
    r = run(Config(**SEARCH, model=str(world["encoder"]), task="cuge:c3", data_dir=str(world["data"]),
                   output_dir=str(out)))
    assert r.fixed_spec == "full@head" and r.spec.endswith("; full@head")
    assert type(r.model).__name__.endswith("ForMultipleChoice")
    m = r.metrics
    assert m["fixed_params"] == 32 + 1 and m["data"]["splits"]["test"].startswith("the other half of the dev split")
    assert m["data"]["dev"] + m["data"]["test"] == 12 and m["data"]["dev"] == 6   # the 8 dialogues' 12 questions
    assert cuge_run.main(["--task", "c3", "--model", str(world["encoder"]), "--data-dir", str(world["data"]),
                          "--delta", str(out), "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                          "--batch-size", "4", "--eval-every", "2", "--no-progress"]) == 0
    ran = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert ran["delta"] == r.spec and ran["trainable"] == r.cost + m["fixed_params"]


@pytest.mark.parametrize("model, recipe", [("gpt2", "hf-causal"), ("cpm2", "cpm-2")])
def test_language_models_search_through_their_recipes(world, tmp_path, model, recipe):
    """A causal LM and CPM-2 (fake Megatron shards) read choice rows as their CUGE recipes do: no
    head, and the runner trains the searched structure, parameter for parameter."""
    from benchmarks.cuge import run as cuge_run
    r = run(Config(**{**SEARCH, "search_steps": 4}, model=str(world[model]), task="cuge:ccpm", max_length=96,
                   data_dir=str(world["ant"]), output_dir=str(tmp_path / "search")))
    assert r.fixed_spec is None and 0 < r.cost <= r.budget.params and 0 <= r.test["accuracy"] <= 1
    assert cuge_run.main(["--task", "ccpm", "--model", str(world[model]), "--data-dir", str(world["ant"]),
                          "--delta", str(tmp_path / "search"), "--output-dir", str(tmp_path / "run"), "--max-steps",
                          "2", "--batch-size", "4", "--eval-every", "2", "--max-len", "96", "--no-progress"]) == 0
    ran = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert ran["recipe"] == recipe and ran["delta"] == r.spec and ran["trainable"] == r.cost


def test_splits_follow_the_files(world):
    # Sogou-Log ranks query lists on dev and test: dev and test are held out from its training pairs
    task = cuge.load_task("cuge:sogou_log", world["ant"], None, 200, 500)
    assert (len(task.train), len(task.dev), len(task.test)) == (28, 4, 8)     # a tenth and a fifth of 40
    ids = [set(split["id"]) for split in (task.train, task.dev, task.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert all(len(r["options"]) == 2 for r in task.dev) and "held out" in task.splits["dev"]
    # CPM-Ant's layout with answered test lines: the three files as they are, cut by --n-*
    task = cuge.load_task("cuge:ccpm", world["ant"], 5, 3, 2)
    assert (len(task.train), len(task.dev), len(task.test)) == (5, 3, 2) and task.splits["test"] == "the test split"
    assert task.kind == "choice" and task.train["id"][:2] == ["train:1", "train:2"]


@pytest.mark.parametrize("settings, message", [
    (dict(task="cuge:lcsts", data_dir="d"), "'generate' rows; the search scores 'choice' rows .*: cuge:ccpm, .*cuge:c3, .*cuge:sogou_log"),
    (dict(task="cuge:nope", data_dir="d"), "unknown CUGE dataset 'nope'"),
    (dict(task="cuge:ccpm"), "needs --data-dir DIR"),
    (dict(task="sentiment", data_dir="d"), "--data-dir is read by cuge:<name> tasks only"),
    (dict(task="cuge:ccpm", data_dir="d", verbalizer="否,是"), "drop --verbalizer"),
])
def test_bad_settings_are_refused_when_the_config_is_made(settings, message):
    with pytest.raises(SearchError, match=message):
        Config(**settings)


def test_a_missing_dataset_folder_or_package_stops_the_run_before_the_model_loads(world, tmp_path, monkeypatch,
                                                                                   capsys):
    argv = ["--task", "cuge:gcrc", "--data-dir", str(world["data"]), "--model", str(world["cpmant"]),
            "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gcrc" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(DataError):
        cuge.load_task("cuge:gcrc", world["data"], None, 8, 8)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    assert main(argv) == 2
    assert 'cuge: tasks (benchmarks.cuge.data) needs datasets' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_importing_the_search_imports_no_benchmark():
    code = ("import sys, search, search.s3pet, search.prepare, search.cuge; from search.s3pet import Config; "
            "Config(); print(sorted(m for m in sys.modules if m.split('.')[0] in ('benchmarks', 'datasets')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
