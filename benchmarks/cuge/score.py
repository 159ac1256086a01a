"""The CUGE score and the leaderboard.

Each dataset's raw score p (its first registry metric) is normalised by mT5-small's b on the same
dataset: p / b x 100. Task score = mean of its datasets', capability score = mean of its tasks',
CUGE index = mean of the 7 capabilities' (the report's text). The report's published index does not
follow its own text: for CPM-2 and mT5-XXL the arithmetic means of the published normalised scores
are 194.0 and 183.3 where Table 2 prints 157 and 152, while harmonic means give 157.1 and 152.8,
i.e. Table 2's numbers truncated to integers; for mT5-Large (117) neither fits (arithmetic 124.3,
harmonic 119.6). So both aggregates are computed, at every level, and labelled: "arithmetic" (the
text) and "harmonic" (what reproduces the published CPM-2 and mT5-XXL indices).

Only the 7 lite datasets have a published b (Table 2), so the index is the lite index; it is given
once a system has all 7 (on one split), other datasets are listed raw.

    python -m benchmarks.cuge.score runs/ccpm runs/c3 ... [--out DIR]
    python -m benchmarks.cuge.score runs/           # a parent folder: every metrics.json below it

Each run folder holds run.py's metrics.json: {"model", "delta", "dataset", "split", "scores":
{metric: value}, ...}. Writes leaderboard.md, leaderboard.json and leaderboard.png (normalised
scores per capability, one bar per system) into --out (default: the parent of the first run
folder, or the first folder itself when it is a parent of runs), with Table 2's published rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from deltakit.io import atomic_write, write_json, write_text

from .errors import CugeError
from .registry import CAPABILITIES, DATASETS, LITE, get

AGGREGATES = ("arithmetic", "harmonic")

# Table 2 of the CUGE report (v2): raw lite scores (%) and the printed index. Normalised scores
# are recomputed from these, the printed ones are PUBLISHED_NORMALISED (for the check).
PUBLISHED = {
    "mT5-Small": {"ccpm": 87.70, "c3": 41.50, "sogou_log": 29.20, "lcsts": 33.10, "kdconv": 8.76,
                  "wmt20_enzh": 9.10, "math23k": 18.40},
    "mT5-Large": {"ccpm": 89.90, "c3": 56.30, "sogou_log": 31.65, "lcsts": 34.40, "kdconv": 9.76,
                  "wmt20_enzh": 11.10, "math23k": 34.30},
    "mT5-XXL": {"ccpm": 90.60, "c3": 86.40, "sogou_log": 35.90, "lcsts": 34.80, "kdconv": 12.68,
                "wmt20_enzh": 24.00, "math23k": 61.60},
    "CPM-2": {"ccpm": 91.60, "c3": 86.10, "sogou_log": 35.90, "lcsts": 35.90, "kdconv": 13.12,
              "wmt20_enzh": 26.20, "math23k": 69.40},
}
PUBLISHED_NORMALISED = {
    "mT5-Small": (100, 100, 100, 100, 100, 100, 100),
    "mT5-Large": (103, 136, 108, 104, 111, 122, 186),
    "mT5-XXL": (103, 208, 123, 105, 145, 264, 335),
    "CPM-2": (104, 207, 123, 108, 150, 288, 377),
}   # in LITE order
PUBLISHED_INDEX = {"mT5-Small": 100, "mT5-Large": 117, "mT5-XXL": 152, "CPM-2": 157}


def _mean(values, how: str) -> float:
    values = list(values)
    if how == "arithmetic":
        return statistics.fmean(values)
    if any(v <= 0 for v in values):
        return 0.0      # a harmonic mean with a zero score is zero
    return statistics.harmonic_mean(values)


def normalised(dataset: str, raw: float) -> float:
    base = get(dataset).mt5_small
    if base is None:
        raise CugeError(f"{get(dataset).title} has no published mT5-small score to normalise by "
                        f"(only the lite datasets do: {', '.join(LITE)})")
    return 100.0 * raw / base


def cuge_scores(raw: dict) -> dict:
    """raw {dataset: score} -> {"normalised": {dataset: p/b*100}, "tasks"/"capabilities":
    {name: {aggregate: value}}, "index": {aggregate: value} or None, "missing": [lite datasets
    without a score], "unnormalised": [datasets without a base]}."""
    norm = {d: normalised(d, v) for d, v in raw.items() if get(d).mt5_small is not None}
    out = {"normalised": norm, "tasks": {}, "capabilities": {}, "index": None,
           "missing": [d for d in LITE if d not in raw],
           "unnormalised": sorted(d for d in raw if get(d).mt5_small is None)}
    for how in AGGREGATES:
        tasks = {}
        for d, v in norm.items():
            tasks.setdefault((get(d).capability, get(d).task), []).append(v)
        task_score = {t: _mean(vs, how) for t, vs in tasks.items()}
        caps = {}
        for (cap, task), v in task_score.items():
            caps.setdefault(cap, []).append(v)
            out["tasks"].setdefault(task, {})[how] = v
        for cap, vs in caps.items():
            out["capabilities"].setdefault(cap, {})[how] = _mean(vs, how)
    if not out["missing"]:
        out["index"] = {how: _mean((out["capabilities"][c][how] for c in CAPABILITIES), how) for how in AGGREGATES}
    return out


# ---- runs ------------------------------------------------------------------------------------------
def read_runs(paths) -> list[dict]:
    """The metrics.json of every run folder given (or found below a given parent folder)."""
    files = []
    for p in map(Path, paths):
        if (p / "metrics.json").is_file():
            files.append(p / "metrics.json")
        elif p.is_dir():
            found = sorted(p.rglob("metrics.json"))
            if not found:
                raise CugeError(f"{p}: no metrics.json in it or below it; pass run folders written by "
                                "python -m benchmarks.cuge.run")
            files += found
        else:
            raise CugeError(f"{p}: not a run folder (expected a folder with metrics.json)")
    runs = []
    for f in files:
        try:
            m = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CugeError(f"{f}: not a readable metrics.json ({e})") from None
        for key, typ in (("model", str), ("dataset", str), ("split", str), ("scores", dict)):
            if not isinstance(m.get(key), typ):
                raise CugeError(f"{f}: field {key!r} must be a {typ.__name__} "
                                '(metrics.json: {"model", "delta", "dataset", "split", "scores": {...}})')
        ds = get(m["dataset"])
        if not isinstance(m["scores"].get(ds.score_metric), (int, float)):
            raise CugeError(f"{f}: scores has no {ds.score_metric!r} (the CUGE score of {ds.title}); "
                            f"got {sorted(m['scores'])}")
        runs.append({**m, "dataset": ds.name, "delta": str(m.get("delta") or ""), "path": str(f.parent)})
    return runs


def systems(runs) -> list[dict]:
    """Runs grouped by (model, delta, split): one leaderboard row each."""
    rows = {}
    for r in runs:
        key = (r["model"], r["delta"], r["split"])
        row = rows.setdefault(key, {"name": _system_name(*key), "model": key[0], "delta": key[1], "split": key[2],
                                    "raw": {}, "paths": {}})
        if r["dataset"] in row["raw"]:
            raise CugeError(f"two runs of {row['name']} on {get(r['dataset']).title}: {row['paths'][r['dataset']]} "
                            f"and {r['path']}; pass only one of them")
        row["raw"][r["dataset"]] = float(r["scores"][get(r["dataset"]).score_metric])
        row["paths"][r["dataset"]] = r["path"]
    return list(rows.values())


def _system_name(model, delta, split) -> str:
    return f"{Path(model).name or model}" + (f" [{delta}]" if delta else "") + (f" ({split})" if split != "test" else "")


# ---- the leaderboard ---------------------------------------------------------------------------------
def table(run_dirs=()) -> dict:
    """The leaderboard as data: published rows (Table 2) first, then the user's systems."""
    entries = []
    for name, raw in PUBLISHED.items():
        entries.append({"name": name, "source": "published (CUGE report v2, Table 2)", "split": "test",
                        "raw": raw, "published_index": PUBLISHED_INDEX[name], **cuge_scores(raw)})
    for s in systems(read_runs(run_dirs)) if run_dirs else []:
        entries.append({"name": s["name"], "source": "run", "model": s["model"], "delta": s["delta"],
                        "split": s["split"], "raw": s["raw"], "paths": s["paths"], **cuge_scores(s["raw"])})
    others = {d for e in entries for d in e["unnormalised"]}
    return {"aggregation": "task, capability and index are means of the level below, computed both ways: "
                           "arithmetic (the report's text) and harmonic (reproduces Table 2's 157 for CPM-2 and 152 "
                           "for mT5-XXL, truncated to integers)",
            "capabilities": {c: [d for d in LITE if DATASETS[d].capability == c] for c in CAPABILITIES},
            "other_datasets": [d for d in DATASETS if d in others],     # raw only: no published base
            "entries": entries}


def _cell(e, dataset) -> str:
    if dataset not in e["raw"]:
        return "–"
    raw = e["raw"][dataset]
    return f"{raw:.2f} ({e['normalised'][dataset]:.0f})" if dataset in e["normalised"] else f"{raw:.2f}"


def _index(e, how) -> str:
    return f"{e['index'][how]:.1f}" if e["index"] else "–"


def _columns(board) -> list[tuple[str, str]]:
    """(header, dataset) per score column: the 7 lite datasets, then any other dataset run."""
    lite = [(f"{c} {get(ds[0]).title}", ds[0]) for c, ds in board["capabilities"].items()]
    return lite + [(f"{get(d).capability} {get(d).title} (raw)", d) for d in board["other_datasets"]]


def _cells(board, e) -> list[str]:
    return [e["name"], *(_cell(e, d) for _, d in _columns(board)), _index(e, "arithmetic"), _index(e, "harmonic"),
            str(e.get("published_index", "–"))]


HEADS = ("index (arithmetic)", "index (harmonic)", "published index")


def markdown(board: dict) -> str:
    head = ["system", *(h for h, _ in _columns(board)), *HEADS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(board, e)) + " |" for e in board["entries"]]
    notes = ["", "Cells: raw score (normalised score p / b x 100, b = mT5-small's). The index is the lite index, "
                 "given when a system has all 7 lite datasets; " + board["aggregation"] + "."]
    for e in board["entries"]:
        if e["missing"] and e["source"] == "run":
            notes.append(f"- {e['name']}: no index, missing {', '.join(get(d).title for d in e['missing'])}")
    if board["other_datasets"]:
        notes.append("- (raw): no published mT5-small score to normalise by, so not in the index")
    return "\n".join(lines + notes) + "\n"


def plot(board: dict, path) -> Path:
    """Normalised scores per capability, one bar per system (published rows included)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entries, caps, others = board["entries"], list(board["capabilities"]), board["other_datasets"]
    fig, axes = plt.subplots(1, 2 if others else 1, squeeze=False, width_ratios=[len(caps), len(others)] if others else None,
                             figsize=(max(8, 1.4 * (len(caps) + len(others)) + 0.3 * len(entries)), 4.5))
    panels = [(axes[0][0], caps, entries, lambda e, c: e["capabilities"].get(c, {}).get("arithmetic", float("nan")),
               "normalised score (mT5-small = 100)", "CUGE lite: normalised score per capability")]
    if others:
        panels.append((axes[0][1], others, [e for e in entries if set(e["raw"]) & set(others)],
                       lambda e, d: e["raw"].get(d, float("nan")), "raw score", "other datasets (no published base)"))
    colour = {e["name"]: f"C{i % 10}" for i, e in enumerate(entries)}
    for ax, keys, rows, value, ylabel, title in panels:
        width = 0.8 / len(rows)
        for i, e in enumerate(rows):
            ax.bar(np.arange(len(keys)) + (i - (len(rows) - 1) / 2) * width, [value(e, k) for k in keys], width,
                   label=e["name"], color=colour[e["name"]])
        ax.set_xticks(np.arange(len(keys)), [k if k in caps else get(k).title for k in keys])
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[0][0].axhline(100, color="grey", lw=0.8, ls="--")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def leaderboard(run_dirs, out_dir) -> dict:
    """Reads the run folders' metrics.json and writes leaderboard.md / .json / .png into out_dir;
    returns the board (as in leaderboard.json)."""
    board = table(run_dirs)
    out = Path(out_dir)
    write_json(out / "leaderboard.json", board)
    write_text(out / "leaderboard.md", markdown(board))
    plot(board, out / "leaderboard.png")
    return board


def print_board(board: dict) -> None:
    import shutil

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text
    t = Table(title="CUGE leaderboard: raw (normalised)")
    for i, col in enumerate(["system", *(h for h, _ in _columns(board)), *HEADS]):
        t.add_column(col, overflow="fold", min_width=24 if i == 0 else None)
    for e in board["entries"]:
        t.add_row(*map(Text, _cells(board, e)))     # Text: a delta spec's [..] is not rich markup
    Console(width=max(shutil.get_terminal_size().columns, 160)).print(t)


def _default_out(first: Path) -> Path:
    return first.parent if (first / "metrics.json").is_file() else first


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cuge.score", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders (with metrics.json) or parent folders of them")
    ap.add_argument("--out", help="where leaderboard.{md,json,png} go (default: the first run folder's parent, "
                                  "or the first folder when it is a parent of runs)")
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else _default_out(Path(args.runs[0]))
    board = leaderboard(args.runs, out)
    print_board(board)
    print(f"wrote {out / 'leaderboard.md'}, leaderboard.json, leaderboard.png")
    return board


if __name__ == "__main__":
    try:
        main()
    except CugeError as e:
        raise SystemExit(f"error: {e}")
