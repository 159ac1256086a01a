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
  original record as JSON, for submission writers).
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

from pathlib import Path

from .errors import CugeError
from .registry import SPLITS, get

LAYOUTS = ("cpmant", "released")
CPMANT_FILES = {"train": "train.jsonl", "dev": "eval.jsonl", "test": "test.jsonl"}


def find(dataset: str, data_dir, split: str) -> tuple[Path, str]:
    """(the file of `split`, its layout: 'cpmant' or 'released'); CugeError listing every path
    looked for when none exists."""
    raise NotImplementedError


def load(dataset: str, data_dir, split: str, max_n: int | None = None, cache_dir=None):
    """One split as a memory-mapped `datasets.Dataset` of canonical rows (the module docstring);
    `max_n`: only the first max_n rows (quick runs). Every returned row has been validated."""
    raise NotImplementedError
