"""Loading one split of one CUGE dataset as canonical examples: the contract between the data half
(registry, formats, metrics, score, submit) and the model half (recipes, train, run).

    ds = data.load("c3", "DIR", "train", max_n=1000)      # a datasets.Dataset, memory-mapped

## --data-dir
DIR/<name>/ holds one dataset (<name> is the registry key: ccpm, c3, sogou_log, lcsts, kdconv,
wmt20_enzh, math23k, pku_seg, ...); DIR may also be that folder itself. Either layout, found from
the files present (`find` says which file and which layout, or lists every name it looked for):

  * CPM-Ant's preprocessed layout (every dataset): train.jsonl, eval.jsonl (= dev), test.jsonl; each
    line {"input": str, "target": str} (NLG) or {"input": str, "options": [str...], "target": int}
    (NLU). A file whose first record has an "input" key is read in this layout.
  * the released files (the 7 lite datasets, GCRC, PKU-SEG, PKU-SEGPOS, WordSeg-Weibo), per reader
    in formats.py (e.g. DIR/ccpm/{train,valid,test_public}.jsonl, DIR/c3/{train,dev,test}.json).

## Rows
A loaded split is a Hugging Face `datasets.Dataset` (Arrow, memory-mapped from a cache folder,
by default DIR/<name>/.cuge_cache), built by streaming the file once: no file is held as Python
lists. Every row is checked while it is built, so a malformed file fails in `load` with
`CugeError("path:line: field ...: expected ..., got ...")`, before any training starts.

* every row: `id` (str, stable: from the file, else "split:line"), `input` (str: what the model
  reads, the dataset's template already filled; CPM-Ant's layout has it ready), `meta` (str: the
  original record as JSON, for submission writers; "" in train splits, which are never submitted,
  so the 21 M pairs of WMT20 are not stored twice).
* the registry's `Dataset.kind_of(split)` says which other columns exist:
  - "choice":   `options` (list[str]), `label` (int index into options; -1 when unknown, e.g. a
                test split). The model reads `input + option` for each option. (CCPM, C3, GCRC,
                ClozeT, SPR, FinRE; Sogou-Log's training pairs: options [positive, negative], label 0)
  - "generate": `target` (str; "" when unknown) (LCSTS, KdConv, WMT20, CEPSUM, E-Reviews, NCLS,
                KBQA, WantWords, CMeEE, YACLC)
  - "math":     `target` (str: the expression to generate, without "x="), `answer` (str: the answer
                value as text; "" when unknown) (Math23K)
  - "rank":     `query_id` (str), `options` (list[str]: one candidate document per entry, each
                already templated with the query, so the model reads the option alone),
                `doc_ids` (list[str]), `relevance` (list[float]; [] when unknown) (Sogou-Log dev/test)
  - "tag":      `tokens` (list[str]: characters), `tags` (list[str], one per character: B/I/E/S
                for segmentation, B-POS/I-POS for SEGPOS; [] when unknown), `target` (str: the gold
                words joined by spaces, "word/POS" per word for SEGPOS; "" when unknown)
                (PKU-SEG, PKU-SEGPOS, WordSeg-Weibo)
  There is no "classify" kind: SPR and FinRE come only in CPM-Ant's layout, whose NLU lines carry
  the class words as options, so they are "choice" rows.
* CPM-Ant's lines map onto these columns by kind: choice <- NLU lines; generate/math/tag <- NLG
  lines (tag: the target is the segmented sentence, tokens and tags are derived from it; math: the
  answer is the target's value); rank dev/test <- NLU lines whose options are the documents and
  whose target is the relevant option's index or a list of relevance values (optional keys
  "query_id", "doc_ids"). A test line may leave out "target".

Predictions, as `metrics.score` and `submit.write` take them, one per row: choice -> int (option
index); generate -> str; math -> str (an expression or a value); rank -> list[float] (a score per
option, higher first); tag -> str (words separated by spaces, "word/POS" for SEGPOS) or list[str]
(one tag per token, as in `tags`).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import formats
from .errors import CugeError
from .registry import SPLITS, get

LAYOUTS = ("cpmant", "released")
CPMANT_FILES = {"train": "train.jsonl", "dev": "eval.jsonl", "test": "test.jsonl"}
CACHE = ".cuge_cache"
FORMAT_VERSION = 1      # part of the cache key: bump when a reader's output changes

_EMPTY = {"choice": {"options": [], "label": -1},
          "generate": {"target": ""},
          "math": {"target": "", "answer": ""},
          "rank": {"query_id": "", "options": [], "doc_ids": [], "relevance": []},
          "tag": {"tokens": [], "tags": [], "target": ""}}


def columns(kind: str) -> tuple:
    """The column names of rows of `kind`."""
    return ("id", "input", "meta", *_EMPTY[kind])


def _features(kind: str):
    from datasets import Features, List, Value
    types = {"options": List(Value("string")), "label": Value("int64"), "target": Value("string"),
             "answer": Value("string"), "query_id": Value("string"), "doc_ids": List(Value("string")),
             "relevance": List(Value("float64")), "tokens": List(Value("string")), "tags": List(Value("string"))}
    base = {"id": Value("string"), "input": Value("string"), "meta": Value("string")}
    return Features({**base, **{c: types[c] for c in _EMPTY[kind]}})


def _folders(name: str, data_dir) -> list[Path]:
    root = Path(data_dir)
    return [root / name, root]


def find(dataset: str, data_dir, split: str) -> tuple[Path, str]:
    """(the file of `split`, its layout: 'cpmant' or 'released'); CugeError listing every path
    looked for when none exists. CPM-Ant's file names are tried first, then the released ones; a
    JSON file whose first record has an "input" key is read in CPM-Ant's layout."""
    ds = get(dataset)
    if split not in SPLITS:
        raise CugeError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if not Path(data_dir).is_dir():
        raise CugeError(f"--data-dir {str(data_dir)!r} is not a folder; expected DIR/{ds.name}/ with "
                        f"{CPMANT_FILES[split]} (CPM-Ant's layout) or the released files")
    reader = formats.READERS[ds.released] if ds.released else None
    names = [CPMANT_FILES[split], *(reader.files[split] if reader else ())]
    looked = []
    for folder in _folders(ds.name, data_dir):
        for fname in dict.fromkeys(names):
            path = folder / fname
            looked.append(str(path))
            if path.is_file():
                return path, _layout(ds, reader, path, fname)
    released = (f"the released files ({', '.join(reader.files[split])})" if reader
                else f"no released format is known for {ds.title}")
    raise CugeError(f"no {split} file of {ds.title} found; looked for: {', '.join(looked)}. Expected "
                    f"CPM-Ant's layout (DIR/{ds.name}/{CPMANT_FILES[split]}) or {released}")


def _layout(ds, reader, path: Path, fname: str) -> str:
    if reader and reader.text and fname not in CPMANT_FILES.values():
        return "released"
    for _, rec in formats.records(path, is_record=lambda x: True):
        if isinstance(rec, dict) and "input" in rec:
            return "cpmant"
        break
    else:       # no record at all: the name decides (load then says the split is empty)
        return "cpmant" if fname in CPMANT_FILES.values() or reader is None else "released"
    if reader is None:
        raise CugeError(f"{path}: {ds.title} has no known released format, so its files must be in "
                        'CPM-Ant\'s layout: lines {"input", "target"} or {"input", "options", "target"}')
    return "released"


def load(dataset: str, data_dir, split: str, max_n: int | None = None, cache_dir=None):
    """One split as a memory-mapped `datasets.Dataset` of canonical rows (the module docstring);
    `max_n`: only the first max_n rows (quick runs). Every returned row has been validated: a file
    that does not fit its format raises CugeError with its path and line, and nothing is returned."""
    from datasets import Dataset as ArrowDataset
    from datasets.exceptions import DatasetGenerationError

    ds = get(dataset)
    if max_n is not None and (not isinstance(max_n, int) or max_n < 1):
        raise CugeError(f"max_n must be a positive number of rows, got {max_n!r}")
    path, layout = find(ds.name, data_dir, split)
    stat = path.stat()
    kwargs = {"name": ds.name, "path": str(path), "layout": layout, "split": split, "max_n": max_n,
              "stamp": f"{stat.st_size}-{stat.st_mtime_ns}-v{FORMAT_VERSION}"}
    cache = Path(cache_dir) if cache_dir is not None else path.parent / CACHE
    if next(_rows(**kwargs), None) is None:     # (datasets cannot build an empty split)
        raise CugeError(f"{path}: no examples in the {split} split of {ds.title}")
    try:
        rows = ArrowDataset.from_generator(_rows, features=_features(ds.kind_of(split)), gen_kwargs=kwargs,
                                           cache_dir=str(cache))
    except DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, CugeError):
            raise cause from None
        raise
    return rows


def _rows(name, path, layout, split, max_n, stamp):
    """The canonical rows of one file, checked one by one (stamp only keys the cache)."""
    ds = get(name)
    kind = ds.kind_of(split)
    if layout == "cpmant":
        parse, text, is_record = formats.cpmant(kind, split, ds), False, (lambda x: isinstance(x, dict))
    else:
        reader = formats.READERS[ds.released]
        parse, text, is_record = reader.parse, reader.text, reader.is_record
    n = 0
    for lineno, rec in formats.records(path, text=text, is_record=is_record):
        try:
            out = parse(rec, split, ds)
        except formats.Bad as e:
            raise CugeError(f"{path}:{lineno}: {e} ({ds.title}, {split} split, "
                            f"{'CPM-Ant' if layout == 'cpmant' else 'released'} layout)") from None
        for k, row in enumerate(out):
            meta = row.pop("meta", rec) if split != "train" else ""     # never submitted: not stored twice
            row["id"] = row.get("id") or f"{split}:{lineno}" + (f":{k}" if k else "")
            row["meta"] = meta if isinstance(meta, str) else json.dumps(meta, ensure_ascii=False)
            yield {**_EMPTY[kind], **row}
            n += 1
            if max_n is not None and n >= max_n:
                return
