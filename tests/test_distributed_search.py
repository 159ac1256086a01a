"""The S3PET search under torchrun: 2 gloo processes on the CPU (tests/distributed_launch.py; rank 0
alone may write, tests/distributed_cli.py) against the same search in one process, on the tiny
XLM-R of search/tiny.py without dropout (so that both see the same masks: none).

* The 2 ranks end with the structure the one process finds, their gate logits are bit-identical
  across ranks (they live outside FSDP: their gradient is averaged over ranks and broadcast) and
  equal the one process's within float tolerance; test scores and outputs match.
* A rank killed mid-search ends the other with an error, and the same command in one process
  resumes from the 2-rank checkpoint to the uninterrupted structure.
* order=2 under torchrun is refused before any work.
Every spawn has a timeout, so a hang fails the test.
"""
import json

import pytest

from distributed_launch import WORKER, launch

CLI = WORKER.with_name("distributed_cli.py")
SEARCH = WORKER.with_name("distributed_search_worker.py")
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from search.tiny import make_model, make_task
    d = tmp_path_factory.mktemp("tiny")
    model = make_model(d / "tiny-xlmr")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.0}))
    return model, make_task(d / "task.jsonl", n=240)


def settings(tiny, out) -> dict:
    model, task = tiny
    return dict(budget="2k", model=str(model), task=str(task), n_train=None, n_dev=24, n_test=48, batch_size=8,
                search_steps=12, ckpt_every=4, retrain_epochs=1, lr_weights=3e-3, retrain_lr=3e-3,
                output_dir=str(out), progress=False, device="cpu")


def flags(values: dict) -> list:
    return [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), "none" if v is None else str(v))]


@pytest.fixture(scope="module")
def searched(tiny, tmp_path_factory):
    import distributed_search_worker as worker
    from search.s3pet import Config, run
    root = tmp_path_factory.mktemp("search")
    from search import supernet
    one, original = {}, supernet.Search.outcome
    worker.record_logits(one)
    try:
        result = run(Config(**settings(tiny, root / "one")))
    finally:
        supernet.Search.outcome = original    # undo the recording
    one.update(spec=result.spec, chosen=result.chosen, probs=result.probs, test=result.test)
    two = launch("search", 2, root, timeout=240, args=[root, json.dumps(settings(tiny, root / "two"))],
                 script=SEARCH)
    assert two.ok, two.explain()
    return root, one, two.reports


def test_two_ranks_find_the_structure_one_process_finds(searched):
    root, one, (r0, r1) = searched
    assert r0["spec"] == r1["spec"] == one["spec"] and r0["chosen"] == one["chosen"]
    assert r0["probs"] == pytest.approx(one["probs"], abs=TOL)
    assert r0["final_logits"] == pytest.approx(one["final_logits"], abs=TOL)
    assert max(abs(a - b) for a, b in zip(one["final_logits"], [0.0] * len(one["final_logits"]))) > 1e-3  # moved
    assert r0["test"] == pytest.approx(one["test"], abs=1e-9)
    for name in ("structure.json", "structure.spec", "metrics.json", "gates.png", "deltas/deltakit.json",
                 "search.ckpt.safetensors"):
        assert (root / "two" / name).is_file(), name
    assert (root / "two" / "structure.spec").read_text() == (root / "one" / "structure.spec").read_text()


def test_gate_logits_are_bit_identical_on_every_rank(searched):
    _, _, (r0, r1) = searched
    assert r0["final_logits"] == r1["final_logits"]      # JSON floats round-trip exactly: the same bits
    assert r0["best_logits"] == r1["best_logits"]
    assert r0["probs"] == r1["probs"] and r0["test"] == r1["test"]


def test_a_killed_rank_ends_the_search_and_one_process_resumes_it(tiny, searched, tmp_path, monkeypatch):
    from search.s3pet import main
    _, one, _ = searched
    out = tmp_path / "killed"
    monkeypatch.setenv("DELTAKIT_TEST_KILL_AFTER", str(out / "search.ckpt.safetensors"))
    monkeypatch.setenv("DELTAKIT_TEST_KILL_DELAY", "0.2")
    values = settings(tiny, out)
    killed = launch("s3pet", 2, tmp_path / "logs", timeout=180, script=CLI,
                    args=["search.s3pet", *flags(values), "--step-sleep", "0.4"])
    assert killed.codes[1] == -9, killed.explain()
    assert killed.codes[0] == 2, killed.explain()            # an error, not a hang (nor a traceback)
    assert "another rank has probably died" in killed.logs[0]
    assert not (out / "structure.spec").exists()
    monkeypatch.delenv("DELTAKIT_TEST_KILL_AFTER")
    assert main(flags(values)) == 0                          # the same command, one process
    assert (out / "structure.spec").read_text().strip() == one["spec"]


def test_second_order_is_refused_under_torchrun(tiny, tmp_path, monkeypatch):
    from search.errors import SearchError
    from search.s3pet import Config, run
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SearchError, match="order=2 cannot run under torchrun"):
        run(Config(**settings(tiny, tmp_path), order=2))
