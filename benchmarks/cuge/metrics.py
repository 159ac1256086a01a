"""Every CUGE metric, in the units CUGE reports (percentages, 0-100), from well-kept libraries:
accuracy and F1 (scikit-learn), BLEU (sacrebleu, tokenize="zh"), ROUGE-1/2/L at the character level
(rouge-score with a character tokenizer, as CPM-2-Finetune scores LCSTS), Distinct-n, nDCG@k and MRR
(scikit-learn's ndcg_score; MRR by its definition), Math23K accuracy by answer value (a safe AST
evaluator, never eval), word-segmentation F1 and word+POS F1 (span-based, as the SIGHAN scorer).

    metrics.score("lcsts", predictions, rows) -> {"rouge_l": ..., "rouge_1": ..., "rouge_2": ...}

`rows` are the loaded split's canonical examples (data.py), `predictions` one per row in the form
data.py's docstring gives for the dataset's kind.
"""
from __future__ import annotations

from .errors import CugeError
from .registry import get


def score(dataset_name: str, predictions, references) -> dict[str, float]:
    """The registry's metrics of `dataset_name` (keys: its metric names) for `predictions` against
    `references` (the canonical rows of the split the predictions are for)."""
    raise NotImplementedError
