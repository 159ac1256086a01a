"""Every CUGE metric, in the units CUGE reports (percentages, 0-100), from well-kept libraries:
accuracy and F1 (scikit-learn), BLEU (sacrebleu, tokenize="zh"), ROUGE-1/2/L at the character level
(rouge-score with a character tokenizer, as CPM-2-Finetune scores LCSTS: F-measure, averaged over
examples), Distinct-n (distinct character n-grams over all n-grams of the corpus), nDCG@k
(scikit-learn's ndcg_score per query, averaged) and MRR, Math23K accuracy by answer value (the safe
evaluator of arith.py, never eval), word-segmentation F1 and word+POS F1 (span-based, as the SIGHAN
scorer: a word is right when its characters and position are), a set F1 over the items of a
generated list (CMeEE in CPM-Ant's layout) and an F1 over character edits (YACLC).

    metrics.score("lcsts", predictions, rows) -> {"rouge_l": ..., "rouge_1": ..., "rouge_2": ...}

`rows` are the loaded split's canonical examples (data.py; a datasets.Dataset or a list of dicts),
`predictions` one per row in the form data.py's docstring gives for the dataset's kind.
"""
from __future__ import annotations

import difflib
import re

from . import arith
from .errors import CugeError
from .formats import words_from_tags
from .registry import get


# ---- the metrics, on plain values ------------------------------------------------------------------
def accuracy(predictions, labels) -> float:
    from sklearn.metrics import accuracy_score
    return 100.0 * accuracy_score(labels, predictions)


def f1_macro(predictions, labels) -> float:
    from sklearn.metrics import f1_score
    return 100.0 * f1_score(labels, predictions, average="macro", zero_division=0)


def bleu(hypotheses, references) -> float:
    """Corpus BLEU with sacrebleu's Chinese tokenizer; `references`: one string per hypothesis, or a
    list of reference strings per hypothesis."""
    import sacrebleu
    refs = [r if isinstance(r, (list, tuple)) else [r] for r in references]
    n = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(n)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize="zh").score


class CharTokenizer:
    """rouge-score's tokenizer interface: every non-space character is a token (its default
    tokenizer keeps only [a-z0-9], so Chinese text would score 0)."""

    def tokenize(self, text):
        return [c for c in str(text).lower() if not c.isspace()]


def rouge(hypotheses, references) -> dict:
    """{'rouge_1', 'rouge_2', 'rouge_l'}: character-level F-measures averaged over examples."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CharTokenizer())
    totals = {"rouge_1": 0.0, "rouge_2": 0.0, "rouge_l": 0.0}
    for hyp, ref in zip(hypotheses, references):
        s = scorer.score(ref, hyp)     # rouge-score's order: (target, prediction)
        totals["rouge_1"] += s["rouge1"].fmeasure
        totals["rouge_2"] += s["rouge2"].fmeasure
        totals["rouge_l"] += s["rougeL"].fmeasure
    return {k: 100.0 * v / max(len(references), 1) for k, v in totals.items()}


def distinct(hypotheses, n: int) -> float:
    """Distinct-n: distinct character n-grams / all character n-grams, over the whole corpus."""
    grams = [tuple(chars[i:i + n]) for h in hypotheses
             for chars in [[c for c in str(h) if not c.isspace()]] for i in range(len(chars) - n + 1)]
    return 100.0 * len(set(grams)) / len(grams) if grams else 0.0


def ndcg(scores, relevances, k: int) -> float:
    """Mean nDCG@k over queries (scikit-learn's ndcg_score, one query at a time: queries have
    different numbers of documents); a query with no relevant document counts 0."""
    import numpy as np
    from sklearn.metrics import ndcg_score
    out = []
    for s, r in zip(scores, relevances):
        if len(s) != len(r):
            raise CugeError(f"{len(s)} scores for {len(r)} documents: one score per document is expected")
        if len(r) == 1:   # scikit-learn needs two documents; one document is ranked first either way
            out.append(1.0 if r[0] > 0 else 0.0)
            continue
        out.append(ndcg_score(np.asarray([r], float), np.asarray([s], float), k=k))
    return 100.0 * sum(out) / len(out)


def mrr(scores, relevances) -> float:
    """Mean reciprocal rank of the first relevant (relevance > 0) document, documents ranked by
    score, ties in file order; 0 for a query without a relevant document."""
    total = 0.0
    for s, r in zip(scores, relevances):
        order = sorted(range(len(s)), key=lambda j: -s[j])
        total += next((1.0 / (rank + 1) for rank, j in enumerate(order) if r[j] > 0), 0.0)
    return 100.0 * total / len(scores)


def math_accuracy(predictions, answers) -> float:
    """Share of predicted expressions whose value equals the answer's (relative 1e-4); a prediction
    that is not arithmetic counts as wrong."""
    right = 0
    for p, a in zip(predictions, answers):
        try:
            right += arith.same_value(arith.value(p), arith.value(a))
        except arith.ArithError:
            pass
    return 100.0 * right / len(answers)


def _spans(words, with_pos: bool) -> set:
    out, start = set(), 0
    for w in words:
        word, _, pos = w.rpartition("/") if with_pos else (w, "", "")
        if with_pos and not word:
            word, pos = w, ""      # a predicted item without '/POS' cannot match a tagged gold word
        out.add((start, start + len(word), word, pos))
        start += len(word)
    return out


def _prf(tp: int, n_pred: int, n_gold: int) -> float:
    p = tp / n_pred if n_pred else 1.0
    r = tp / n_gold if n_gold else 1.0
    return 100.0 * (2 * p * r / (p + r) if p + r else 0.0)


def seg_f1(predictions, references, with_pos: bool = False) -> float:
    """Micro F1 over words (span + text; + POS with `with_pos`), as the SIGHAN scorer counts it.
    `predictions`/`references`: segmented strings ('词 词', '词/n 词/v') or word lists."""
    tp = n_pred = n_gold = 0
    for p, g in zip(predictions, references):
        ps = _spans(p.split() if isinstance(p, str) else p, with_pos)
        gs = _spans(g.split() if isinstance(g, str) else g, with_pos)
        tp, n_pred, n_gold = tp + len(ps & gs), n_pred + len(ps), n_gold + len(gs)
    return _prf(tp, n_pred, n_gold)


_ITEM_SPLIT = re.compile(r"[；;，,、\n]+")


def set_f1(predictions, references) -> float:
    """Micro F1 over the items of each output (split on ；;,，、 and newlines, stripped)."""
    tp = n_pred = n_gold = 0
    for p, g in zip(predictions, references):
        ps = {x.strip() for x in _ITEM_SPLIT.split(str(p)) if x.strip()}
        gs = {x.strip() for x in _ITEM_SPLIT.split(str(g)) if x.strip()}
        tp, n_pred, n_gold = tp + len(ps & gs), n_pred + len(ps), n_gold + len(gs)
    return _prf(tp, n_pred, n_gold)


def _edits(source: str, text: str) -> set:
    ops = difflib.SequenceMatcher(None, source, text, autojunk=False).get_opcodes()
    return {(i1, i2, text[j1:j2]) for tag, i1, i2, j1, j2 in ops if tag != "equal"}


def edit_f1(predictions, references, sources) -> float:
    """Micro F1 of the character edits (source -> prediction) against the reference's edits."""
    tp = n_pred = n_gold = 0
    for p, g, s in zip(predictions, references, sources):
        pe, ge = _edits(s, str(p)), _edits(s, str(g))
        tp, n_pred, n_gold = tp + len(pe & ge), n_pred + len(pe), n_gold + len(ge)
    return _prf(tp, n_pred, n_gold)


def exact_match(predictions, references) -> float:
    return 100.0 * sum(str(p).strip() == str(g).strip() for p, g in zip(predictions, references)) / len(references)


def accuracy_at_1(predictions, references) -> float:
    """Exact match of the top candidate (a prediction may be a ranked list of words)."""
    top = [p[0] if isinstance(p, (list, tuple)) and p else p for p in predictions]
    return exact_match(top, references)


# ---- per dataset ------------------------------------------------------------------------------------
def _col(rows, name: str) -> list:
    return list(rows[name]) if hasattr(rows, "column_names") else [r[name] for r in rows]


def _texts(preds) -> list:
    return ["" if p is None else str(p) for p in preds]


def _tagged(preds, rows) -> list:
    """Tag predictions as words: a segmented string is split, a list of tags becomes words."""
    tokens = _col(rows, "tokens")
    return [p.split() if isinstance(p, str) else words_from_tags(t, p) for p, t in zip(preds, tokens)]


def _plain_words(words, ds) -> list:
    """Words without their '/POS' (SEGPOS texts carry one; PKU-SEG words may contain a '/')."""
    if "segpos_f1" not in ds.metrics:
        return list(words)
    return [w.rpartition("/")[0] or w for w in words]


def _seg(p, rows, ds):
    gold = [g.split() for g in _col(rows, "target")]
    return seg_f1([_plain_words(w, ds) for w in _tagged(p, rows)], [_plain_words(g, ds) for g in gold])


def _rouge(p, rows, ds):
    return rouge(_texts(p), _col(rows, "target"))


METRICS = {     # metric name -> (the reference column it needs, fn(predictions, rows, ds) -> float or
                # a dict holding that name: one call gives rouge_1/2/l)
    "accuracy": ("label", lambda p, rows, ds: accuracy([int(x) for x in p], _col(rows, "label"))),
    "f1_macro": ("label", lambda p, rows, ds: f1_macro([int(x) for x in p], _col(rows, "label"))),
    "bleu": ("target", lambda p, rows, ds: bleu(_texts(p), _col(rows, "target"))),
    "distinct_4": ("target", lambda p, rows, ds: distinct(_texts(p), 4)),
    "rouge_1": ("target", _rouge),
    "rouge_2": ("target", _rouge),
    "rouge_l": ("target", _rouge),
    "ndcg@10": ("relevance", lambda p, rows, ds: ndcg(p, _col(rows, "relevance"), 10)),
    "mrr": ("relevance", lambda p, rows, ds: mrr(p, _col(rows, "relevance"))),
    "math_accuracy": ("answer", lambda p, rows, ds: math_accuracy(_texts(p), _col(rows, "answer"))),
    "seg_f1": ("target", _seg),
    "segpos_f1": ("target", lambda p, rows, ds: seg_f1(_tagged(p, rows), [g.split() for g in _col(rows, "target")],
                                                       with_pos=True)),
    "set_f1": ("target", lambda p, rows, ds: set_f1(_texts(p), _col(rows, "target"))),
    "edit_f1": ("target", lambda p, rows, ds: edit_f1(_texts(p), _col(rows, "target"), _col(rows, "input"))),
    "exact_match": ("target", lambda p, rows, ds: exact_match(_texts(p), _col(rows, "target"))),
    "accuracy_at_1": ("target", lambda p, rows, ds: accuracy_at_1(p, _col(rows, "target"))),
}
_UNKNOWN = {"label": -1, "target": "", "answer": "", "relevance": []}


def score(dataset_name: str, predictions, references) -> dict[str, float]:
    """The registry's metrics of `dataset_name` (keys: its metric names, the first is the CUGE
    score) for `predictions` against `references` (the canonical rows of the split the
    predictions are for). A split without gold answers (a test split) is refused."""
    ds = get(dataset_name)
    predictions = list(predictions)
    if len(predictions) != len(references):
        raise CugeError(f"{len(predictions)} predictions for {len(references)} {ds.title} examples: "
                        "one prediction per example is expected")
    if not predictions:
        raise CugeError(f"no {ds.title} examples to score")
    out, done = {}, {}
    for name in ds.metrics:
        column, fn = METRICS[name]
        gold = _col(references, column)
        missing = sum(g == _UNKNOWN[column] for g in gold)
        if missing:
            raise CugeError(f"{missing} of {len(gold)} {ds.title} examples have no gold {column!r} (a test split "
                            "without answers?): score the dev split, or submit the test predictions")
        if fn not in done:
            done[fn] = fn(predictions, references, ds)
        value = done[fn]
        out[name] = float(value[name] if isinstance(value, dict) else value)
    return out
