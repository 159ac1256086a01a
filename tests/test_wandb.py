"""wandb, offline by default: a tiny search and a tiny CUGE run with --wandb write an offline run into
their output folder, and that run's .wandb file holds what they logged (losses, gate values, scores,
the pictures). The file is read record by record (wandb's log format, wandb's own protobuf Record);
wandb 0.2x+ has no Python reader of it and writes no wandb-summary.json offline."""
import json
import struct
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from deltakit import wandb_log  # noqa: E402

BLOCK, HEADER = 32768, b":W&B\xe1\xbe\x00"   # the file header; then blocks of (crc32, length, type) records


def records(path: Path):
    """Every Record of a .wandb file: records are split over 32 KiB blocks as FULL or FIRST/MIDDLE/LAST."""
    data = path.read_bytes()
    assert data[:7] == HEADER, f"{path} is not a .wandb transaction log"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:            # a block's tail too short for a record header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                     # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts + payload)
            parts = b""
            yield record
        elif kind in (2, 3):                   # FIRST, MIDDLE
            parts += payload


def logged(out: Path) -> tuple[dict, dict, dict]:
    """(history: key -> values in order, summary: key -> last JSON, config) of the one offline run under out."""
    wandb.teardown()       # the file is written by wandb's service process: wait until it has closed it
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, f"expected one offline run under {out / 'wandb'}, found {runs}"
    history, summary, config = {}, {}, {}
    for r in records(runs[0]):
        kind = r.WhichOneof("record_type")
        items = {"history": lambda: r.history.item, "summary": lambda: r.summary.update,
                 "config": lambda: r.config.update, "run": lambda: r.run.config.update}.get(kind, lambda: [])()
        for item in items:
            key = item.key or "/".join(item.nested_key)
            if kind == "history":
                history.setdefault(key, []).append(item.value_json)
            else:
                (summary if kind == "summary" else config)[key] = item.value_json   # run, config: the config
    return history, summary, config


def picture(out: Path, history: dict, key: str) -> bytes:
    """The bytes of the wandb.Image logged under `key` (wandb keeps a copy in the run's files/)."""
    assert history[f"{key}/_type"] == ['"image-file"']
    (folder,) = (out / "wandb").glob("offline-run-*/files")
    return (folder / json.loads(history[f"{key}/path"][0])).read_bytes()


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """No user wandb configuration: no WANDB_MODE, no key, no netrc; wandb's own folders in tmp."""
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for key, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return tmp_path


def test_offline_unless_the_user_configured_wandb(wandb_env, monkeypatch):
    assert wandb_log.mode() == "offline"
    netrc = wandb_env / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_log.logged_in() and wandb_log.mode() is None           # `wandb login` wrote a key
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")   # ... for another host
    assert wandb_log.mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_log.mode() is None
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "disabled")                        # the user's own choice stands
    assert wandb_log.mode() is None
    assert wandb_log.Run(False).run is None                              # not asked: nothing at all
    from deltakit import distributed as dist
    monkeypatch.setattr(dist, "is_main", lambda: False)
    assert wandb_log.Run(True, "deltakit-test").run is None             # torchrun: ranks > 0 log nothing


def test_search_logs_losses_gates_scores_and_the_heat_map_offline(wandb_env):
    from search.s3pet import Config, run
    from search.tiny import make_model, make_task
    out = wandb_env / "search"
    model, task = make_model(wandb_env / "tiny"), make_task(wandb_env / "t.jsonl", n=120)
    result = run(Config(budget="1k", model=str(model), task=str(task), n_train=None, n_dev=24, n_test=24, batch_size=8,
                        search_steps=4, evals=2, output_dir=str(out), progress=False, wandb=True))
    history, summary, config = logged(out)
    assert len(history["search/loss"]) == 4 and len(history["search/dev_accuracy"]) == 2
    assert {"search/shift", "search/lr_w", "retrain/loss", "test/accuracy", "test/macro_f1"} <= set(history)
    gates = {k.removeprefix("gates/"): float(v[-1]) for k, v in history.items() if k.startswith("gates/")}
    candidates = json.loads((out / "structure.json").read_text())["candidates"]
    assert gates == pytest.approx({c["key"]: c["p"] for c in candidates})      # every candidate's gate
    assert picture(out, history, "heatmap") == (out / "gates.png").read_bytes()
    assert float(summary["test/accuracy"]) == result.test["accuracy"] and int(summary["cost"]) == result.cost
    assert '"1k"' in config["budget"]


def test_cuge_run_logs_losses_scores_and_the_loss_curve_offline(wandb_env):
    pytest.importorskip("jieba")
    pytest.importorskip("datasets")
    from benchmarks.cuge import fixtures, run, tiny
    data = fixtures.write_released("ccpm", wandb_env / "data")
    model = tiny.make_cpmant(wandb_env / "ant", tiny.chars_of(data))
    out = wandb_env / "ccpm"
    assert run.main(["--task", "ccpm", "--model", str(model), "--data-dir", str(data), "--output-dir", str(out),
                     "--max-steps", "4", "--eval-every", "2", "--batch-size", "2", "--no-progress", "--wandb"]) == 0
    history, summary, config = logged(out)
    assert len(history["train/loss"]) == len(history["train/lr"]) == 4 and len(history["dev/dev_loss"]) == 2
    assert picture(out, history, "loss_curve") == (out / "loss.png").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert float(summary["test/accuracy"]) == metrics["test_scores"]["accuracy"]
    assert float(summary["dev/accuracy"]) == metrics["dev_scores"]["accuracy"]
    assert '"ccpm"' in config["dataset"]
