"""Submission files per CUGE dataset, in the format the dataset's own evaluation reads where it is
known, else JSONL of {"id", "prediction"}; each writer's assumptions are written next to it.

The CUGE site (registration needed) names neither the files nor the zip layout it wants, so every
file is named <dataset>_predict.<ext>; rename it if the site asks for another name.
"""
from __future__ import annotations

import json
from pathlib import Path

from deltakit.io import write_text

from .errors import CugeError
from .formats import words_from_tags
from .registry import get


def _jsonl(objs) -> str:
    return "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs)


def _meta(row) -> dict:
    m = json.loads(row["meta"])
    return m if isinstance(m, dict) else {"record": m}


def _choice_index(p, row) -> int:
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < len(row["options"]):
        raise CugeError(f"prediction {p!r} for {row['id']}: expected an option index 0..{len(row['options']) - 1}")
    return p


# CCPM: its eval.py reads the released jsonl; the prediction replaces "answer" (an option index)
# in each original record [assumed: the CCPM README says the answer field holds the index].
def _ccpm(rows, preds):
    return "jsonl", _jsonl({**_meta(r), "answer": _choice_index(p, r)} for r, p in zip(rows, preds))


# GCRC: "the prediction file must have the same format as the training set" (its README): the
# original records, as a JSON array, with "answer" set to the predicted letter. Evidence sentences
# and error types (tasks 2 and 3) are not predicted, so they are left as the test file had them.
def _gcrc(rows, preds):
    recs = [{**_meta(r), "answer": "ABCDEFGH"[_choice_index(p, r)]} for r, p in zip(rows, preds)]
    return "json", json.dumps(recs, ensure_ascii=False, indent=1)


# PKU-SEG / PKU-SEGPOS / WordSeg-Weibo: the SIGHAN scorer reads one segmented sentence per line,
# words separated by spaces ('word/POS' for SEGPOS), in the order of the test file.
def _segmented(rows, preds):
    lines = [" ".join(p.split() if isinstance(p, str) else words_from_tags(r["tokens"], p)) for r, p in zip(rows, preds)]
    return "txt", "".join(line + "\n" for line in lines)


# Every other dataset: no evaluation format is known, so one JSON object per example with its id.
def _generic(rows, preds, kind):
    out = []
    for r, p in zip(rows, preds):
        obj = {"id": r["id"]}
        if kind == "choice":
            obj.update(prediction=_choice_index(p, r), answer=r["options"][p])
        elif kind == "rank":    # the documents of the query, best first
            if not isinstance(p, (list, tuple)) or len(p) != len(r["doc_ids"]):
                raise CugeError(f"prediction for {r['id']}: expected a score per document ({len(r['doc_ids'])})")
            order = sorted(range(len(p)), key=lambda j: -p[j])
            obj.update(query_id=r["query_id"], ranking=[r["doc_ids"][j] for j in order],
                       scores=[float(p[j]) for j in order])
        elif kind == "math":    # the expression, and its value where it has one
            from . import arith
            try:
                value = arith.value(p)
            except arith.ArithError:
                value = None
            obj.update(prediction=str(p), answer=value)
        elif kind == "tag":
            obj["prediction"] = " ".join(p.split() if isinstance(p, str) else words_from_tags(r["tokens"], p))
        else:
            obj["prediction"] = str(p)
        out.append(obj)
    return "jsonl", _jsonl(out)


WRITERS = {"ccpm": _ccpm, "gcrc": _gcrc, "pku_seg": _segmented, "pku_segpos": _segmented,
           "wordseg_weibo": _segmented}


def write(dataset_name: str, examples, predictions, out_dir) -> Path:
    """Write the submission file of `dataset_name` for `examples` (the canonical rows of the test
    split, with their `meta`) and `predictions` (one per row, as data.py says) into `out_dir`,
    atomically; returns its path."""
    ds = get(dataset_name)
    rows, preds = list(examples), list(predictions)
    if len(rows) != len(preds):
        raise CugeError(f"{len(preds)} predictions for {len(rows)} {ds.title} examples: one per example is expected")
    writer = WRITERS.get(ds.name)
    ext, text = writer(rows, preds) if writer else _generic(rows, preds, ds.kind_of("test"))
    return write_text(Path(out_dir) / f"{ds.name}_predict.{ext}", text)
