"""CUGE datasets as search tasks: `--task cuge:<name> --data-dir DIR`, DIR laid out as
benchmarks/cuge/data.py reads it (CPM-Ant's train/eval/test.jsonl, or the released files).

The search takes the datasets whose training rows are multiple choice ("choice" rows: CCPM, C3, GCRC,
ClozeT, SPR, FinRE, and Sogou-Log's (positive, negative) training pairs) and reads them through the
CUGE recipe of --model (benchmarks/cuge/recipes), so a searched `structure.spec` means the same
thing to `python -m benchmarks.cuge.run --delta`, which reads the rows through that recipe too. On
native CPM-Ant that is CPM-Live's scoring, `recipes.cpmant.choice_logits`: one sequence per option,
the logit of 是 after <s> + input + option + [是否正确], a softmax over the row's options, the
cross-entropy to its label. On a Hugging Face encoder it is the recipe's multiple-choice head, a new
one: the fixed part `full@head`, outside the budget, like the classifier head of text tasks. CPM-2
and Hugging Face causal / seq2seq LMs read choice rows as their recipes do.

Splits, fixed (--n-train / --n-dev / --n-test keep the first rows of a file, as the runner's --max-*):
* train, dev and test are the dataset's own splits: the gates and the retrained deltas are selected
  on dev, the test split is scored once, at the end;
* a test split without answers (C3 and GCRC as released) cannot be scored: S3PET's rule for tasks
  whose test labels are hidden applies, the dev split is halved (a fixed permutation) into dev and test;
* dev and test splits that are not choice rows (Sogou-Log's ranked query lists): dev and test are held
  out from the training pairs (at most a tenth and a fifth of them, as for a JSONL task).
`benchmarks` is imported here alone, and only when a cuge: task is asked.
"""
from __future__ import annotations

import numpy as np
import torch

from .backbone import Backbone
from .data import SPLIT_SEED, Task
from .errors import DataError, SearchError
from .models import needs as model_needs, resolve_device

PREFIX = "cuge:"
FIXED = {"encoder": "full@head"}   # recipe kind -> the new head it adds (always on, outside the budget)
NEEDS = {   # recipe kind -> module -> what needs it
    "cpm-ant": {"jieba": "the CPM-Ant tokenizer"},
    "cpm-2": {"jieba": "the CPM-2 tokenizer", "transformers": "CPM-2 (loaded into transformers' MT5)"},
    "hf-causal": {"transformers": "a Hugging Face --model"},
    "hf-seq2seq": {"transformers": "a Hugging Face --model"},
    "encoder": {"transformers": "a Hugging Face --model"},
}


def is_cuge(task) -> bool:
    return isinstance(task, str) and task.strip().lower().startswith(PREFIX)


def choice_datasets() -> list[str]:
    """The CUGE datasets the search takes: those whose training rows are choice rows."""
    from benchmarks.cuge import registry
    return [d.name for d in registry.DATASETS.values() if d.kind_of("train") == "choice"]


def dataset(task: str):
    """The registry row of `cuge:<name>`; a SearchError for an unknown name or a kind the search cannot score."""
    from benchmarks.cuge import registry
    from benchmarks.cuge.errors import CugeError
    try:
        ds = registry.get(task.strip()[len(PREFIX):])
    except CugeError as e:
        raise SearchError(f"--task {task!r}: {e}") from None
    if ds.kind_of("train") != "choice":
        raise SearchError(f"--task {task!r}: {ds.title} has {ds.kind_of('train')!r} rows; the search scores "
                          f"'choice' rows (one answer among a row's options), which these CUGE datasets have: "
                          + ", ".join(f"cuge:{n}" for n in choice_datasets()))
    return ds


def check(cfg) -> None:
    """The settings a cuge: task needs (and --data-dir only with one); no file is read."""
    if not is_cuge(cfg.task):
        if cfg.data_dir is not None:
            raise SearchError(f"--data-dir is read by cuge:<name> tasks only, and --task is {cfg.task!r}; "
                              f"drop --data-dir, or ask for a CUGE dataset (e.g. --task cuge:ccpm)")
        return
    dataset(cfg.task)
    if cfg.data_dir is None or not cfg.data_dir.strip():
        raise SearchError(f"--task {cfg.task} needs --data-dir DIR, the folder with DIR/<dataset>/ in it "
                          f"(CPM-Ant's train/eval/test.jsonl or the released files; benchmarks/cuge/data.py)")
    if cfg.verbalizer is not None:
        raise SearchError(f"--verbalizer is for {{\"text\", \"label\"}} tasks; {cfg.task} scores each of a row's "
                          f"options as its CUGE recipe does (on CPM-Ant: the logit of 是), so drop --verbalizer")


def needs(path) -> dict:
    """The optional modules a cuge: task imports with --model `path` (module -> what for)."""
    table = {"datasets": "cuge: tasks (benchmarks.cuge.data)"}
    if path is None:
        return {**table, **model_needs(None)}
    from benchmarks.cuge import recipes
    return {**table, **NEEDS[_call(recipes.detect, path)]}


def _call(fn, *args, error=SearchError, **kwargs):
    """fn(...), with a deltakit error (a CugeError, a bad checkpoint) raised as a search error."""
    from deltakit.errors import DeltakitError
    try:
        return fn(*args, **kwargs)
    except SearchError:
        raise
    except DeltakitError as e:
        raise error(str(e)) from None


# ---- the task --------------------------------------------------------------------------------

def load_task(task: str, data_dir, n_train: int | None, n_dev: int, n_test: int) -> Task:
    """The splits of `cuge:<name>` (the module docstring says which rows each one gets)."""
    from benchmarks.cuge import data
    ds = dataset(task)

    def load(split, n):
        return _call(data.load, ds.name, data_dir, split, max_n=n, error=DataError)

    if ds.kind_of("dev") != "choice":
        rows = load("train", None if n_train is None else n_train + n_dev + n_test)
        test, dev, train = _carve(rows, [min(n_test, len(rows) // 5), min(n_dev, len(rows) // 10)])
        if n_train is not None and len(train) > n_train:
            train = train.select(range(n_train))
        where = f"held out from the training split ({ds.title}'s dev and test splits are {ds.kind} rows)"
        splits = {"train": "the training split, less dev and test", "dev": where, "test": where}
    else:
        train, test = load("train", n_train), load("test", n_test)
        splits = {"train": "the training split", "dev": "the dev split", "test": "the test split"}
        if _labelled(test):
            dev = load("dev", n_dev)
        else:
            rows = load("dev", n_dev + n_test)
            test, dev = _carve(rows, [min(n_test, len(rows) // 2)])
            dev = dev.select(range(min(n_dev, len(dev))))
            splits.update(dev="half of the dev split", test="the other half of the dev split (the test split "
                                                            "has no answers)")
    for split, rows in (("train", train), ("dev", dev), ("test", test)):
        if not _labelled(rows):
            raise DataError(f"the {split} rows of {task} ({splits[split]}) have rows without an answer (label -1); "
                            f"the search trains and scores on answered rows only")
    if len(train) < 4 or not len(dev) or not len(test):
        raise DataError(f"{task}: {len(train)} training, {len(dev)} dev and {len(test)} test rows are too few "
                        f"for a search; it needs at least 4 training rows and a dev and a test row")
    return Task(f"cuge:{ds.name}", train, dev, test, labels=[], kind="choice", splits=splits)


def _labelled(rows) -> bool:
    """Whether every row has an answer (read from the Arrow column, not as Python objects); an empty
    split passes, and load_task's size check names it."""
    import pyarrow.compute as pc
    return len(rows) == 0 or pc.min(rows.with_format("arrow")["label"]).as_py() >= 0


def _carve(rows, sizes: list[int]) -> list:
    """Disjoint parts of `rows` of the given sizes, then the rest, from a permutation fixed by SPLIT_SEED
    (each part keeps the file's order)."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    bounds = np.cumsum([0, *sizes])
    parts = [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])] + [perm[bounds[-1]:]]
    return [rows.select(np.sort(p)) for p in parts]


# ---- the backbone ----------------------------------------------------------------------------

class RecipeBackbone(Backbone):
    """A CUGE recipe as the search's backbone: batches of choice rows (data.Rows), scored and
    predicted by the recipe, so the search and the CUGE runner read a row the same way."""

    def __init__(self, recipe, kind: str, device):
        super().__init__(recipe.model, getattr(recipe, "tokenizer", None), fixed=FIXED.get(kind), device=device)
        self.recipe, self.kind = recipe, kind

    def loss(self, batch: dict) -> torch.Tensor:
        return self.recipe.loss(batch["rows"], "choice")

    def predict(self, batch: dict) -> list[int]:
        return self.recipe.predict(batch["rows"], "choice")

    def encode(self, texts, max_length):
        raise SearchError("a CUGE recipe backbone reads choice rows (search.data.Rows), not texts")

    def logits(self, batch):
        raise SearchError("a CUGE recipe backbone gives a loss and predictions (its recipe's), not class logits")


def load_backbone(path, task: Task, seed: int, device: str, max_length: int | None) -> RecipeBackbone:
    """The CUGE recipe of `path` (default: multilingual-e5-small) for the task's dataset, reading rows
    of at most `max_length` tokens (None: the recipe's length for that dataset)."""
    from benchmarks.cuge import recipes
    if path is None:
        from deltakit_assets import e5_small_path
        path = e5_small_path()
    ds, dev = dataset(task.name), resolve_device(device)
    kind = _call(recipes.detect, path)
    torch.manual_seed(seed)                   # a new head (an encoder's) is drawn from torch's RNG
    recipe = _call(recipes.load, path, ds, task.train, dev, kind=kind, seed=seed)
    recipe.setup(ds, recipe.hparams(ds).but(max_len=max_length), task.train)
    recipe.model.to(dev).train()
    return RecipeBackbone(recipe, kind, dev)
