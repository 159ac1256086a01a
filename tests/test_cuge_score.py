"""The CUGE score: fed Table 2's raw lite scores it reproduces the published normalised scores and,
with the harmonic aggregate, the published CPM-2 and mT5-XXL indices; the leaderboard files and the
command line over run folders."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cuge import score
from benchmarks.cuge.errors import CugeError
from benchmarks.cuge.registry import CAPABILITIES, LITE


@pytest.mark.parametrize("model", list(score.PUBLISHED))
def test_published_raw_scores_give_the_published_normalised_scores(model):
    s = score.cuge_scores(score.PUBLISHED[model])
    assert tuple(round(s["normalised"][d]) for d in LITE) == score.PUBLISHED_NORMALISED[model]
    assert set(s["capabilities"]) == set(CAPABILITIES) and s["missing"] == []


def test_harmonic_index_reproduces_cpm2_and_mt5_xxl_and_arithmetic_does_not():
    idx = {m: score.cuge_scores(raw)["index"] for m, raw in score.PUBLISHED.items()}
    assert int(idx["CPM-2"]["harmonic"]) == 157 == score.PUBLISHED_INDEX["CPM-2"]
    assert int(idx["mT5-XXL"]["harmonic"]) == 152 == score.PUBLISHED_INDEX["mT5-XXL"]
    assert idx["CPM-2"]["harmonic"] == pytest.approx(157.13, abs=0.01)
    assert idx["mT5-XXL"]["harmonic"] == pytest.approx(152.79, abs=0.01)
    assert idx["CPM-2"]["arithmetic"] == pytest.approx(194.03, abs=0.01)       # what the report's text says
    assert idx["mT5-XXL"]["arithmetic"] == pytest.approx(183.26, abs=0.01)
    large = idx["mT5-Large"]      # printed 117: neither aggregate gives it
    assert large["arithmetic"] == pytest.approx(124.33, abs=0.01) and large["harmonic"] == pytest.approx(119.63, abs=0.01)
    assert idx["mT5-Small"] == {"arithmetic": pytest.approx(100.0), "harmonic": pytest.approx(100.0)}


def test_task_level_means_and_the_unnormalised():
    raw = {"ccpm": 87.70, "c3": 83.0, "gcrc": 60.0}    # GCRC has no published base
    s = score.cuge_scores(raw)
    assert s["capabilities"]["NLU-DL"]["arithmetic"] == pytest.approx(200.0) and s["index"] is None
    assert s["unnormalised"] == ["gcrc"] and set(s["missing"]) == set(LITE) - {"ccpm", "c3"}
    assert score._mean([100, 300], "harmonic") == pytest.approx(150.0)
    assert score._mean([100, 0], "harmonic") == 0.0


def _run(folder: Path, model, dataset, scores, split="test", delta="lora(r=8)@attn.q,attn.v"):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"model": model, "delta": delta, "dataset": dataset,
                                                     "split": split, "scores": scores}), encoding="utf-8")
    return folder


LITE_RUN = {"ccpm": {"accuracy": 90.0}, "c3": {"accuracy": 83.0}, "sogou_log": {"ndcg@10": 36.5, "mrr": 40.0},
            "lcsts": {"rouge_l": 36.0, "rouge_1": 40.0, "rouge_2": 25.0}, "kdconv": {"bleu": 13.0, "distinct_4": 50.0},
            "wmt20_enzh": {"bleu": 20.0}, "math23k": {"math_accuracy": 60.0}}


def test_leaderboard_files(tmp_path):
    runs = tmp_path / "runs"
    for name, s in LITE_RUN.items():
        _run(runs / f"ant-{name}", "models/cpm-ant-10b.pt", name, s)
    _run(runs / "e5-ccpm", "e5-small", "ccpm", {"accuracy": 70.0}, delta="")
    _run(runs / "e5-pku", "e5-small", "pku_seg", {"seg_f1": 91.0}, delta="")
    board = score.leaderboard([runs], tmp_path / "out")
    names = [e["name"] for e in board["entries"]]
    assert names[:4] == list(score.PUBLISHED)
    ant = next(e for e in board["entries"] if e["name"] == "cpm-ant-10b.pt [lora(r=8)@attn.q,attn.v]")
    assert ant["normalised"]["ccpm"] == pytest.approx(100 * 90 / 87.7)
    assert ant["index"]["harmonic"] == pytest.approx(score._mean(ant["normalised"].values(), "harmonic"))
    e5 = next(e for e in board["entries"] if e["name"] == "e5-small")
    assert e5["index"] is None and e5["unnormalised"] == ["pku_seg"]

    md = (tmp_path / "out" / "leaderboard.md").read_text(encoding="utf-8")
    assert "| CPM-2 | 91.60 (104) | 86.10 (207) | 35.90 (123) | 35.90 (108) | 13.12 (150) | 26.20 (288) | 69.40 (377) " \
           "| – | 194.0 | 157.1 | 157 |" in md           # the PKU-SEG column: raw only, no published row
    assert "| e5-small | 70.00 (80) | – | – | – | – | – | – | 91.00 | – | – | – |" in md
    assert "NLU-WSL PKU-SEG (raw)" in md and "e5-small: no index, missing C3, Sogou-Log" in md
    assert json.loads((tmp_path / "out" / "leaderboard.json").read_text(encoding="utf-8"))["entries"][3]["name"] == "CPM-2"
    assert (tmp_path / "out" / "leaderboard.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_run_folders(tmp_path):
    with pytest.raises(CugeError, match="no metrics.json in it or below it"):
        score.read_runs([tmp_path])
    _run(tmp_path / "a", "m", "lcsts", {"rouge_1": 30.0})
    with pytest.raises(CugeError, match=r"scores has no 'rouge_l' \(the CUGE score of LCSTS\)"):
        score.read_runs([tmp_path / "a"])
    _run(tmp_path / "b", "m", "ccpm", {"accuracy": 30.0})
    _run(tmp_path / "c", "m", "ccpm", {"accuracy": 31.0})
    with pytest.raises(CugeError, match="two runs of m .* on CCPM"):
        score.systems(score.read_runs([tmp_path / "b", tmp_path / "c"]))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "metrics.json").write_text('{"model": "m", "dataset": "ccpm"}', encoding="utf-8")
    with pytest.raises(CugeError, match="field 'split' must be a str"):
        score.read_runs([tmp_path / "d"])
    with pytest.raises(CugeError, match="not a run folder"):
        score.read_runs([tmp_path / "missing"])


def test_command_line(tmp_path):
    for name, s in LITE_RUN.items():
        _run(tmp_path / "runs" / name, "cpm-ant", name, s, split="dev")
    board = score.main([str(tmp_path / "runs" / "ccpm"), str(tmp_path / "runs" / "c3")])
    assert (tmp_path / "runs" / "leaderboard.md").is_file()       # default: the first run folder's parent
    assert board["entries"][-1]["name"] == "cpm-ant [lora(r=8)@attn.q,attn.v] (dev)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "benchmarks.cuge.score", str(tmp_path / "runs"), "--out",
                          str(tmp_path / "o")], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "CUGE leaderboard" in out.stdout and "157.1" in out.stdout and (tmp_path / "o" / "leaderboard.png").is_file()
    bad = subprocess.run([sys.executable, "-m", "benchmarks.cuge.score", str(tmp_path / "nothing")], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "error:" in bad.stderr and "not a run folder" in bad.stderr
