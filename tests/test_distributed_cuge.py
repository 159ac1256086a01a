"""`python -m benchmarks.cuge.run` under torchrun: 2 gloo processes on the CPU (started as torchrun
starts them, tests/distributed_launch.py, each one tests/distributed_cli.py, which fails a rank
other than 0 that writes a file) against the same command in one process, on a tiny CPM-Ant.

* CCPM (rows scored as choices, a loss averaged over rows): the 2-rank run's losses, dev losses and
  selected deltas equal the 1-process run's within float tolerance, and rank 0 alone writes.
* LCSTS (beam search) with 3 dev and 3 test rows in batches of 1: rank 0 decodes 2 batches, rank 1
  one; every rank finishes, and the predictions are the 1-process beam search's with those deltas.
* A rank killed mid-training ends the other with an error, and the same command in one process
  resumes from the 2-rank checkpoint to the uninterrupted run's deltas.
Every spawn has a timeout, so a hang fails the test.
"""
import json

import pytest
import torch

pytest.importorskip("jieba")
pytest.importorskip("datasets")

from benchmarks.cuge import fixtures as fx  # noqa: E402
from benchmarks.cuge import tiny  # noqa: E402
from distributed_launch import WORKER, launch  # noqa: E402

CLI = WORKER.with_name("distributed_cli.py")
TOL = 1e-5
CCPM = ["--task", "ccpm", "--max-steps", "8", "--batch-size", "4", "--eval-every", "4", "--save-every", "2",
        "--max-len", "96", "--lr", "0.05", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuge-dist")
    data = fx.write_lite(root / "data")
    return {"data": data, "model": tiny.make_cpmant(root / "ant", tiny.chars_of(data))}


def args(world, out, task_args):
    return [*task_args, "--model", world["model"], "--data-dir", world["data"], "--output-dir", out]


def two_ranks(world, out, task_args, logs, timeout=240, **kw):
    return launch("cuge", 2, logs, timeout=timeout, args=["benchmarks.cuge.run", *args(world, out, task_args)],
                  script=CLI, **kw)


def deltas(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "deltas" / "deltas.safetensors"))


def close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=TOL, atol=TOL)


@pytest.fixture(scope="module")
def ccpm(world, tmp_path_factory):
    from benchmarks.cuge import run
    root = tmp_path_factory.mktemp("ccpm")
    assert run.main([str(a) for a in args(world, root / "one", CCPM)]) == 0
    two = two_ranks(world, root / "two", CCPM, root / "logs")
    assert two.ok, two.explain()
    return root, two


def test_two_ranks_train_select_and_score_as_one_process(ccpm):
    root, two = ccpm
    one_h, two_h = (json.loads((root / d / "train.json").read_text()) for d in ("one", "two"))
    assert len(two_h["losses"]) == 8
    assert two_h["losses"] == pytest.approx(one_h["losses"], rel=TOL)
    assert [e["dev_loss"] for e in two_h["evals"]] == pytest.approx([e["dev_loss"] for e in one_h["evals"]], rel=TOL)
    assert two_h["best_step"] == one_h["best_step"]
    close(deltas(root / "two"), deltas(root / "one"))
    assert deltas(root / "one")["layers.0.attn.q.lora.lora_B"].abs().max() > 1e-3   # trained: B starts at 0
    one_m, two_m = (json.loads((root / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two_m["scores"] == one_m["scores"] and two_m["trainable"] == one_m["trainable"]
    for name in ("predictions/dev.jsonl", "predictions/test.jsonl", "submission/ccpm_predict.jsonl"):
        assert (root / "two" / name).read_text() == (root / "one" / name).read_text(), name


def test_rank_zero_alone_writes_and_prints(ccpm):
    root, two = ccpm
    # distributed_cli.py fails rank 1 on any write, so the run above being ok is the proof; the files are there
    for name in ("metrics.json", "train.json", "loss.png", "train.ckpt.safetensors", "deltas/deltas.safetensors"):
        assert (root / "two" / name).is_file(), name
    printed = [sum('"dataset": "ccpm"' in line for line in log.splitlines()) for log in two.logs]
    assert printed == [1, 0]
    assert not list((root / "two").rglob(".*.tmp-*"))


def test_beam_search_with_uneven_batches_finishes_in_lockstep(world, tmp_path):
    from benchmarks.cuge import recipes, registry, run
    import deltakit
    lcsts = ["--task", "lcsts", "--max-steps", "2", "--batch-size", "2", "--eval-batch-size", "1", "--max-dev", "3",
             "--max-test", "3", "--max-new", "5", "--max-len", "96", "--no-progress", "--device", "cpu"]
    out = tmp_path / "two"
    two = two_ranks(world, out, lcsts, tmp_path / "logs")
    assert two.ok, two.explain()
    got = [json.loads(line)["prediction"] for line in (out / "predictions" / "test.jsonl").read_text().splitlines()]
    # the same beam search in this process, with the deltas the 2 ranks selected and saved
    cli = run.parser().parse_args([str(a) for a in args(world, out, lcsts)])
    ds = registry.get("lcsts")
    from benchmarks.cuge import data
    splits = {s: data.load("lcsts", world["data"], s, max_n=n) for s, n in (("train", None), ("test", 3))}
    recipe = recipes.load(world["model"], ds, splits["train"], "cpu")
    recipe.setup(ds, run.hparams(cli, recipe, ds), splits["train"])
    deltakit.load(recipe.model, out / "deltas")
    assert got == run.predict(recipe, splits["test"], ds.kind, 1, "test", False)
    assert len(got) == 3 and all(isinstance(p, str) for p in got)


def test_a_killed_rank_ends_the_run_and_one_process_resumes_it(world, ccpm, tmp_path, monkeypatch):
    from benchmarks.cuge import run
    root, _ = ccpm
    out = tmp_path / "killed"
    monkeypatch.setenv("DELTAKIT_TEST_KILL_AFTER", str(out / "train.ckpt.safetensors"))
    monkeypatch.setenv("DELTAKIT_TEST_KILL_DELAY", "0.3")
    killed = two_ranks(world, out, [*CCPM, "--step-sleep", "0.4"], tmp_path / "logs", timeout=180)
    assert killed.codes[1] == -9, killed.explain()
    assert killed.codes[0] == 2, killed.explain()          # an error, not a hang (nor a traceback)
    assert "another rank has probably died" in killed.logs[0] and "Run the same command again" in killed.logs[0]
    assert not (out / "metrics.json").exists()
    monkeypatch.delenv("DELTAKIT_TEST_KILL_AFTER")
    assert run.main([str(a) for a in args(world, out, CCPM)]) == 0      # the same command, one process
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["train"]["resumed_from"] < 8
    close(deltas(out), deltas(root / "one"))
