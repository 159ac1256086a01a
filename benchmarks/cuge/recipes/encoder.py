"""Encoder models (BERT, RoBERTa, XLM-R, multilingual-e5...) from a Hugging Face folder, for the
understanding datasets; they cannot write text, so generation datasets are refused.

* tag rows: token classification over the characters (`tokens`): each character is one vocabulary
  piece (itself, or '▁' + itself), between the model's [CLS] and [SEP]; the tag set is the training
  split's (sorted). Sentences longer than max_len - 2 characters are read in windows of that size.
* choice rows: a multiple-choice head (one logit per (input, option) pair, soft-maxed over the row's
  options); the pair is encoded as tokenizer(input, option) with the input cut when too long.
* rank rows: the same head scores each candidate (the option alone: it already holds query and
  title); Sogou-Log's training pairs are read as one text, input + option, so training and ranking
  see the same sequences.
The new head is initialised from torch's RNG (seeded by the run) and is frozen like the rest of the
backbone: the default delta trains LoRA on q, v and a dense delta on the head (`full@head`).
"""
from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from ..errors import CugeError
from .common import HParams, check_kind, choice_loss, options_of, pad, rank_loss, scatter_options, weights_dtype

NAME = "encoder"
KINDS = ("choice", "rank", "tag")
DEFAULT_DELTA = "lora(r=8,alpha=16,dropout=0.1)@attn.q,attn.v; full@head"
# what tuned multilingual-e5-small on People's Daily (benchmarks/RESULTS.md); lr 1e-3 with 100 warm-up
# steps had barely left the tag prior after 50 steps
HPARAMS = HParams(batch_size=16, lr=5e-3, epochs=3, patience=5, eval_every=50, max_len=128, warmup=15,
                  schedule="linear", clip=1.0)


def tag_set(train_rows) -> list[str]:
    """The sorted tags of the training rows, read in batches."""
    counts = Counter()
    if hasattr(train_rows, "iter"):            # a datasets.Dataset: stream the column
        for batch in train_rows.iter(batch_size=2048):
            for tags in batch["tags"]:
                counts.update(tags)
    else:
        for r in train_rows:
            counts.update(r["tags"])
    if not counts:
        raise CugeError("the training split has no tags to learn")
    return sorted(counts)


def load(path, dataset, train_rows, device="cpu", seed: int = 0) -> "EncoderRecipe":
    from transformers import AutoModelForMultipleChoice, AutoModelForTokenClassification, AutoTokenizer
    kind = dataset.kind
    check_kind(kind, KINDS, NAME)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)          # the new head: the same on every run of the same command
    if kind == "tag":
        labels = tag_set(train_rows)
        model = AutoModelForTokenClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={t: i for i, t in enumerate(labels)}, dtype=weights_dtype(device))
        return EncoderRecipe(model.to(device).eval(), tokenizer, labels)
    model = AutoModelForMultipleChoice.from_pretrained(path, dtype=weights_dtype(device))
    return EncoderRecipe(model.to(device).eval(), tokenizer)


class EncoderRecipe:
    name = NAME
    default_delta = DEFAULT_DELTA
    kinds = KINDS

    def __init__(self, model, tokenizer, labels=None):
        self.model, self.tokenizer = model, tokenizer
        self.labels = labels
        self.index = {t: i for i, t in enumerate(labels or [])}
        self._vocab, self._pieces, self._unk = tokenizer.get_vocab(), {}, tokenizer.unk_token_id
        self.dataset, self.hp = None, HPARAMS

    def hparams(self, dataset) -> HParams:
        return HPARAMS

    def setup(self, dataset, hp: HParams, train_rows=None):
        self.dataset, self.hp = dataset, hp

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def window(self) -> int:
        return max(1, self.hp.max_len - 2)       # one piece per character, plus the two specials

    # -- choice / rank ---------------------------------------------------------------------------
    def _option_scores(self, rows, alone: bool) -> torch.Tensor:
        pairs, width = options_of(rows)
        if alone:                              # rank rows: the candidate alone
            first, second = [rows[b]["options"][k] for b, k in pairs], None
        elif self.dataset.kind == "rank":      # Sogou-Log's training pairs: one text, as it is ranked
            first, second = [rows[b]["input"] + rows[b]["options"][k] for b, k in pairs], None
        else:
            first, second = [rows[b]["input"] for b, _ in pairs], [rows[b]["options"][k] for b, k in pairs]
        enc = self.tokenizer(first, second, truncation="only_first" if second else True,
                             max_length=self.hp.max_len, padding=True, return_tensors="pt")
        enc = {k: v[:, None].to(self.device) for k, v in enc.items()}    # (pairs, 1 choice, L)
        scores = self.model(**enc).logits[:, 0]
        return scatter_options(scores.float(), pairs, rows, width)

    # -- tags ------------------------------------------------------------------------------------
    def _windows(self, rows):
        return [(b, s) for b, r in enumerate(rows) for s in range(0, max(1, len(r["tokens"])), self.window)]

    def _piece(self, char: str) -> int:
        """The vocabulary piece of one character: itself, or its word-initial form ('▁' + char, as
        sentencepiece spells it), or what the tokenizer makes of it; one piece per character, so
        sequences are as long as the sentence (splitting into words would add a '▁' to each)."""
        if char not in self._pieces:
            vocab = self._vocab
            ids = self.tokenizer(char, add_special_tokens=False)["input_ids"]
            self._pieces[char] = vocab.get(char, vocab.get("\u2581" + char, ids[-1] if ids else self._unk))
        return self._pieces[char]

    def _tag_batch(self, rows, windows):
        """(input_ids, attention_mask) of the windows: [CLS] + one piece per character + [SEP]."""
        tok = self.tokenizer
        start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        seqs = [[start] + [self._piece(c) for c in rows[b]["tokens"][s:s + self.window]] + [end]
                for b, s in windows]
        ids, mask = pad(seqs, tok.pad_token_id)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def loss(self, rows, kind: str) -> torch.Tensor:
        check_kind(kind, KINDS, NAME)
        if kind == "rank":
            return rank_loss(self._option_scores(rows, alone=True), rows)
        if kind == "choice":
            return choice_loss(self._option_scores(rows, alone=False), rows)
        windows = self._windows(rows)
        enc = self._tag_batch(rows, windows)
        labels = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
        for i, (b, s) in enumerate(windows):
            for w, tag in enumerate(rows[b]["tags"][s:s + self.window]):
                if tag in self.index:                         # a tag the training split never had: skipped
                    labels[i, 1 + w] = self.index[tag]
        logits = self.model(**enc).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1).to(self.device),
                               ignore_index=-100)

    @torch.no_grad()
    def predict(self, rows, kind: str) -> list:
        check_kind(kind, KINDS, NAME)
        if kind == "choice":
            return self._option_scores(rows, alone=False).argmax(-1).tolist()
        if kind == "rank":
            scores = self._option_scores(rows, alone=True)
            return [s[:len(r["options"])].tolist() for s, r in zip(scores, rows)]
        windows = self._windows(rows)
        best = self.model(**self._tag_batch(rows, windows)).logits.argmax(-1).tolist()
        out = [[] for _ in rows]
        for (b, s), row in zip(windows, best):
            n = len(rows[b]["tokens"][s:s + self.window])
            out[b] += [self.labels[t] for t in row[1:1 + n]]
        return out
