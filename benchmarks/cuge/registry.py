"""The 21 CUGE v2 datasets as data: one frozen `Dataset` row each (Table 1 of the CUGE report, v2).

What a row says:
  * `capability`: one of CAPABILITIES (the 7 of the report); `task`: the report's task, shared by
    the datasets scored together at the task level (21 datasets, 18 tasks);
  * `kind`: which columns its loaded rows have (the contract in data.py); `train_kind` when the
    training split differs (Sogou-Log trains on (positive, negative) pairs, ranks at test time);
  * `metrics`: metric names of metrics.py, the first one is the dataset's CUGE score;
  * `lite`: in the lite leaderboard (one dataset per capability); `mt5_small`: mT5-small's raw
    score, the normalisation base b of p/b*100 (published for the 7 lite datasets only, Table 2);
  * `released`: the formats.py reader of the dataset's released files, None when no source shows
    them (then only CPM-Ant's preprocessed layout loads); `confirmed`: a source read for the
    research note shows that format (the CUGE site itself needs a login, so none is official);
  * `template`: how the released fields fill `input`; `fields`: released field -> canonical column;
  * `max_target_len`: generation length in tokens (CPM-Live's per-task inference lengths where
    they exist); `note`: what is not certain.
Classification datasets (SPR, FinRE) are "choice" rows: they come only in CPM-Ant's layout, whose
NLU lines carry their class words as options.

Facts: shared/research/cuge_cpm.md, Part 1 (and its sources: the CUGE report, CPM-2-Finetune,
CPM-Live's cpm-ant examples, the GCRC and CCPM READMEs).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CugeError

CAPABILITIES = ("NLU-WSL", "NLU-DL", "IA&QA", "NLG", "CI", "ML", "MR")
CAPABILITY_TITLES = {
    "NLU-WSL": "Language understanding (word-sentence level)",
    "NLU-DL": "Language understanding (discourse level)",
    "IA&QA": "Information acquisition and question answering",
    "NLG": "Language generation",
    "CI": "Conversational interaction",
    "ML": "Multilingual",
    "MR": "Mathematical reasoning",
}
KINDS = ("choice", "generate", "math", "rank", "tag")
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    capability: str
    task: str
    kind: str
    metrics: tuple
    lite: bool = False
    mt5_small: float | None = None
    released: str | None = None
    confirmed: bool = False
    template: str = ""
    fields: str = ""
    max_target_len: int | None = None
    train_kind: str | None = None
    note: str = ""

    def __post_init__(self):  # a typo in the table fails at import, not in a run
        assert self.capability in CAPABILITIES, self
        assert self.kind in KINDS and (self.train_kind or self.kind) in KINDS, self
        assert self.metrics and isinstance(self.metrics, tuple), self
        assert (self.kind in ("generate", "math")) == (self.max_target_len is not None), self

    @property
    def score_metric(self) -> str:
        return self.metrics[0]

    def kind_of(self, split: str) -> str:
        """The kind of the rows of `split` (Sogou-Log's training pairs are 'choice' rows)."""
        return self.train_kind if split == "train" and self.train_kind else self.kind


_ROWS = (
    # ---- NLU, word-sentence level --------------------------------------------------------
    Dataset("pku_seg", "PKU-SEG", "NLU-WSL", "word segmentation", "tag", ("seg_f1",),
            released="pku_seg", template="{sentence}",
            fields="one sentence per line, words separated by spaces -> tokens (characters), tags (BIES), "
                   "target (the line); input = the unsegmented sentence",
            note="SIGHAN-2005 convention (PKU's own bakeoff files); the CUGE zip's layout is not seen"),
    Dataset("wordseg_weibo", "WordSeg-Weibo", "NLU-WSL", "word segmentation", "tag", ("seg_f1",),
            released="pku_seg", template="{sentence}",
            fields="as PKU-SEG (one sentence per line, words separated by spaces)",
            note="multi-granularity gold; read as single-granularity SIGHAN lines (layout not seen)"),
    Dataset("pku_segpos", "PKU-SEGPOS", "NLU-WSL", "word segmentation and POS tagging", "tag",
            ("segpos_f1", "seg_f1"), released="pku_segpos", template="{sentence}",
            fields="one sentence per line, 'word/POS' items separated by spaces -> tokens, tags (B-POS/I-POS), "
                   "target (the line)",
            note="People's Daily 'word/pos' convention; the CUGE zip's layout is not seen"),
    Dataset("ccpm", "CCPM", "NLU-WSL", "classical poetry matching", "choice", ("accuracy",),
            lite=True, mt5_small=87.70, released="ccpm", confirmed=True, template="{translation}",
            fields="translation -> input; choices (4) -> options; answer (int) -> label",
            note="the report's table says 'F1' for CCPM; it is 4-way choice scored by accuracy"),
    Dataset("cmeee", "CMeEE", "NLU-WSL", "named entity recognition (medical)", "generate", ("set_f1",),
            max_target_len=128,
            note="only CPM-Ant's layout: target = the entities as text, items split on ；;,，、 or newlines "
                 "and scored as a set (the official span F1 needs the character offsets)"),
    Dataset("finre", "FinRE", "NLU-WSL", "relation extraction (financial)", "choice", ("f1_macro", "accuracy"),
            note="only CPM-Ant's layout (options = the relation names); 44 relations + NA"),
    Dataset("yaclc", "YACLC", "NLU-WSL", "grammatical error correction", "generate", ("edit_f1",),
            max_target_len=128,
            note="only CPM-Ant's layout; input = the sentence to correct; F1 of character edits "
                 "(difflib) against the reference's, a stand-in for the official ChERRANT scorer"),
    # ---- NLU, discourse level ------------------------------------------------------------
    Dataset("spr", "SPR", "NLU-DL", "humor detection", "choice", ("f1_macro", "accuracy"),
            note="only CPM-Ant's layout (options = the class words)"),
    Dataset("clozet", "ClozeT", "NLU-DL", "story cloze", "choice", ("accuracy",),
            note="only CPM-Ant's layout (options = the candidate endings)"),
    Dataset("c3", "C3", "NLU-DL", "reading comprehension", "choice", ("accuracy",),
            lite=True, mt5_small=41.50, released="c3", confirmed=True, template="问题：{question} 文章：{context}",
            fields="[[context...], [{question, choice, answer, id}...], doc_id] -> one row per question: "
                   "input, options = choice, label = index of answer in choice",
            note="as CPM-2-Finetune reads it (JSON array); the official zip is not seen"),
    Dataset("gcrc", "GCRC", "NLU-DL", "reading comprehension", "choice", ("accuracy",),
            released="gcrc", confirmed=True, template="问题：{question} 文章：{title} {passage}",
            fields="id, title, passage, question, options (4), answer ('A'-'D') -> label",
            note="Task 1 (answer) only; the evidence sentences and error types are not predicted"),
    # ---- Information acquisition and question answering ----------------------------------
    Dataset("wantwords", "WantWords", "IA&QA", "reverse dictionary", "generate", ("accuracy_at_1",),
            max_target_len=8, note="only CPM-Ant's layout: input = the definition, target = the word"),
    Dataset("kbqa", "KBQA", "IA&QA", "open-domain knowledge-base QA", "generate", ("exact_match",),
            max_target_len=32, note="only CPM-Ant's layout (NLPCC 2018); no dev split in the release"),
    Dataset("sogou_log", "Sogou-Log", "IA&QA", "document retrieval", "rank", ("ndcg@10", "mrr"),
            lite=True, mt5_small=29.20, released="sogou_log", confirmed=True, train_kind="choice",
            template="查询：{query}标题：{title}",
            fields="train {query, pos_doc, neg_doc} -> choice rows (input '查询：{query}标题：', options "
                   "[pos title, neg title], label 0); dev/test {query_id, query, doc: [{sogou_id, title, "
                   "label?}]} -> rank rows (options = the filled template per doc)",
            note="the report says nDCG@k without k: 10 is assumed; the dev file's relevance field name is not "
                 "seen (label/relevance/rel are read)"),
    # ---- Language generation -------------------------------------------------------------
    Dataset("lcsts", "LCSTS", "NLG", "summarization", "generate", ("rouge_l", "rouge_1", "rouge_2"),
            lite=True, mt5_small=33.10, released="lcsts", confirmed=True, template="{text}",
            fields="text -> input, summary -> target", max_target_len=50,
            note="ROUGE-L at the character level (CPM-2's 35.88 on LCSTS is its CUGE 35.90)"),
    Dataset("cepsum", "CEPSUM", "NLG", "summarization", "generate", ("rouge_l", "rouge_1", "rouge_2"),
            max_target_len=100, note="only CPM-Ant's layout; which ROUGE the report scores is not stated"),
    Dataset("e_reviews", "E-Reviews", "NLG", "data-to-text generation", "generate", ("bleu", "distinct_4"),
            max_target_len=128, note="only CPM-Ant's layout"),
    # ---- Conversational interaction -------------------------------------------------------
    Dataset("kdconv", "KdConv", "CI", "knowledge-driven dialogue", "generate", ("bleu", "distinct_4"),
            lite=True, mt5_small=8.76, released="kdconv", confirmed=True, template="历史：{history} 图谱：{kg}",
            fields="history, kg -> input; response -> target", max_target_len=50,
            note="the preprocessed jsonl CPM-2-Finetune reads; the score is taken to be BLEU"),
    # ---- Multilingual ---------------------------------------------------------------------
    Dataset("wmt20_enzh", "WMT20-EnZh", "ML", "machine translation (En->Zh)", "generate", ("bleu",),
            lite=True, mt5_small=9.10, released="wmt20", confirmed=False, template="{english}",
            fields="{index, source, target}: the English side -> input, the Chinese side -> target",
            max_target_len=128,
            note="CPM-2-Finetune feeds 'target' as input and 'source' as output, so which field holds "
                 "English is not certain: the side with fewer CJK characters is taken as the English one"),
    Dataset("ncls_enzh", "NCLS-EnZh", "ML", "cross-lingual summarization (En->Zh)", "generate",
            ("rouge_l", "rouge_1", "rouge_2"), max_target_len=100, note="only CPM-Ant's layout"),
    # ---- Mathematical reasoning -----------------------------------------------------------
    Dataset("math23k", "Math23K", "MR", "math word problems", "math", ("math_accuracy",),
            lite=True, mt5_small=18.40, released="math23k", confirmed=True, template="{text}",
            fields="text -> input; equation 'x=...' -> target (the expression); ans (or the equation's "
                   "value) -> answer", max_target_len=32,
            note="scored by answer value (CUGE issue #7) with a safe evaluator, relative tolerance 1e-4"),
)

DATASETS = {d.name: d for d in _ROWS}
LITE = tuple(d.name for d in _ROWS if d.lite)
assert len(DATASETS) == 21 and len(LITE) == 7 and len({d.task for d in _ROWS}) == 18
assert {DATASETS[n].capability for n in LITE} == set(CAPABILITIES)

_ALIASES = {"wmt20": "wmt20_enzh", "wmt20-enzh": "wmt20_enzh", "ncls": "ncls_enzh", "sogou": "sogou_log",
            "sogou-log": "sogou_log", "e-reviews": "e_reviews", "pku-seg": "pku_seg", "pku-segpos": "pku_segpos",
            "wordseg-weibo": "wordseg_weibo", "math": "math23k"}


def get(name: str) -> Dataset:
    """The registry row of `name` (case-insensitive; CUGE's titles such as 'Sogou-Log' work too)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        from deltakit.errors import nearest
        raise CugeError(f"unknown CUGE dataset {name!r}.{nearest(key, DATASETS)} The 21 datasets: "
                        f"{', '.join(DATASETS)}; the lite set: {', '.join(LITE)}")
    return DATASETS[key]


def names(which: str = "all") -> tuple:
    """'all' -> the 21 names, 'lite' -> the 7 lite ones, else one name (or a comma-separated list)."""
    if which == "all":
        return tuple(DATASETS)
    if which == "lite":
        return LITE
    return tuple(get(n).name for n in which.split(",") if n.strip())
