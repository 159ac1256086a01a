"""Language models through one generation path: any Hugging Face causal LM, and encoder-decoders
(any Hugging Face seq2seq LM, and CPM-2, which `recipes.cpm2` loads into transformers' MT5).

Causal LMs read as CPM-Ant does (recipes/cpmant.py): generation rows learn `input` + `target` +
eos with the loss on the target alone (the input's start is cut when too long) and are decoded
by beam search (3 beams); choice and rank rows are scored by the LM logit of "是" after
input + option + "[是否正确]" (rank: the option alone).

Encoder-decoders read as CPM-2-Finetune formats each task (TsinghuaAI/CPM-2-Finetune,
`CPM2Datasets.py`): the input goes to the encoder (cut at max_len), the decoder reads the start
tokens (CPM-2: <s>, <s_0>) then the target, and learns target + end token (CPM-2: <s_1>); the
loss is averaged per sample, then over the batch (`finetune_cpm2.py::forward_step`).
  * generate / math / tag: LCSTSDataset, MathDataset, KDConvDataset: encoder <- input,
    decoder -> target; decoded by beam search (3 beams) until the end token.
  * choice with up to 10 options: CCPMDataset / C3Dataset: the encoder reads
    "选项：" + 一、option1；二、option2；... + "文章：" + input (the pieces encoded one by one,
    as there), the decoder answers with the option's number word (一, 二, ...). Predicted as
    the number word with the highest logit among the row's options (CPM-2-Finetune takes the
    arg-max over the whole vocabulary, which can name no option).
  * rank, and choice with more options: SogouLogDataset: the encoder reads input + option (rank:
    the option alone, already holding query and title), the decoder its start tokens; the score
    is the logit of "相关" at the last decoder position (CPM-2's token 400), trained with the
    cross-entropy over the row's options (its `_RankCrossEntropy` over (positive, negative)).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import CugeError
from .common import (GENERATIVE, HParams, check_kind, choice_loss, max_new_tokens, options_of, pad, rank_loss,
                     scatter_options, target_text, weights_dtype)
from .cpmant import ASK, YES

KINDS = ("choice", "rank") + GENERATIVE
BEAMS = 3
NUMBERS = "一二三四五六七八九十"   # CPM-2-Finetune's number_map: the option labels of CCPM / C3
RELEVANT = "相关"
DEFAULT_DELTA = "lora(r=8,alpha=16)@attn.q,attn.v"
HPARAMS = HParams(batch_size=16, lr=1e-3, epochs=10, patience=10, eval_every=50, max_len=512, warmup=50,
                  schedule="linear", clip=1.0)


@dataclass(frozen=True)
class Codec:
    """How an encoder-decoder's text becomes ids: pieces without specials, what ends an encoder
    input, what the decoder starts with, and what ends a target."""
    encode: Callable[[str], list]
    decode: Callable[[list], str]
    pad_id: int
    unk_id: int | None
    source_end: tuple = ()
    prefix: tuple = (0,)
    end_id: int = 1

    def word(self, text: str) -> int:
        return _word(self.encode, self.unk_id, text)


def _word(encode, unk_id, text: str) -> int:
    """The first token of `text` (the verbaliser's word); an error when the vocab spells it <unk>."""
    ids = encode(text)
    if not ids or ids[0] == unk_id:
        raise CugeError(f"the vocabulary has no token for {text!r}, which this recipe reads")
    return ids[0]


# ---- encoder-decoders ----------------------------------------------------------------------------

class Seq2SeqRecipe:
    default_delta = DEFAULT_DELTA
    kinds = KINDS

    def __init__(self, model, codec: Codec, name: str = "hf-seq2seq", hparams: dict | None = None,
                 other: HParams = HPARAMS):
        self.model, self.codec, self.name = model, codec, name
        self._hparams, self._other = hparams or {}, other
        self.dataset, self.hp = None, other

    def hparams(self, dataset) -> HParams:
        return self._hparams.get(dataset.name, self._other)

    def setup(self, dataset, hp: HParams, train_rows=None):
        self.dataset, self.hp = dataset, hp

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _forward(self, sources: list[list[int]], decoder: list[list[int]]):
        c = self.codec
        enc, enc_mask = pad([s[:self.hp.max_len] for s in sources], c.pad_id)
        dec, dec_mask = pad(decoder, c.pad_id)
        out = self.model(input_ids=enc.to(self.device), attention_mask=enc_mask.to(self.device),
                         decoder_input_ids=dec.to(self.device), decoder_attention_mask=dec_mask.to(self.device))
        return out.logits, dec_mask.to(self.device)

    def _source(self, text: str) -> list[int]:
        return self.codec.encode(text) + list(self.codec.source_end)

    def _choice_source(self, row) -> list[int]:
        e = self.codec.encode
        ids = e("选项：")
        for k, option in enumerate(row["options"]):
            ids += e(NUMBERS[k]) + e("、") + e(option) + e("；")
        return ids + e("文章：") + e(row["input"]) + list(self.codec.source_end)

    def _numbers(self, rows) -> bool:
        return max(len(r["options"]) for r in rows) <= len(NUMBERS)

    def _relevance(self, rows, alone: bool) -> torch.Tensor:
        """(rows, options) logits of "相关" after the decoder's start tokens."""
        pairs, width = options_of(rows)
        e = self.codec.encode
        sources = [(e(rows[b]["options"][k]) if alone else e(rows[b]["input"]) + e(rows[b]["options"][k]))
                   + list(self.codec.source_end) for b, k in pairs]
        prefix = list(self.codec.prefix)
        logits, _ = self._forward(sources, [prefix] * len(pairs))
        scores = logits[:, len(prefix) - 1, self.codec.word(RELEVANT)].float()
        return scatter_options(scores, pairs, rows, width)

    def _number_logits(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(full logits at the answer position, (rows, options) logits of the options' number words)."""
        prefix = list(self.codec.prefix)
        logits, _ = self._forward([self._choice_source(r) for r in rows], [prefix] * len(rows))
        answer = logits[:, len(prefix) - 1].float()
        ids = torch.tensor([self.codec.word(n) for n in NUMBERS], device=answer.device)
        scores = answer[:, ids]
        for b, r in enumerate(rows):
            scores[b, len(r["options"]):] = float("-inf")
        return answer, scores[:, :max(len(r["options"]) for r in rows)]

    def loss(self, rows, kind: str) -> torch.Tensor:
        check_kind(kind, KINDS, self.name)
        prefix = list(self.codec.prefix)
        if kind == "rank":
            return rank_loss(self._relevance(rows, alone=True), rows)
        if kind == "choice" and (self.dataset.kind == "rank" or not self._numbers(rows)):
            return choice_loss(self._relevance(rows, alone=False), rows)
        if kind == "choice":
            targets = [[self.codec.word(NUMBERS[r["label"]])] if 0 <= r["label"] < len(r["options"]) else []
                       for r in rows]
            if not all(targets):
                raise CugeError(f"rows {[r['id'] for r, t in zip(rows, targets) if not t][:3]} have no valid label")
            sources, ends = [self._choice_source(r) for r in rows], []     # CCPM/C3: no end token
        else:
            sources = [self._source(r["input"]) for r in rows]
            targets = [self.codec.encode(target_text(r, kind)) for r in rows]
            ends = [self.codec.end_id]
        full = [prefix + t + ends for t in targets]          # CPM-2-Finetune: dec = full[:-1], labels = full[1:]
        decoder, labels = [f[:-1] for f in full], [f[1:] for f in full]
        logits, mask = self._forward(sources, decoder)
        label_ids, _ = pad(labels, -100)
        label_ids = label_ids.to(self.device)
        per_token = F.cross_entropy(logits.float().transpose(1, 2), label_ids, ignore_index=-100, reduction="none")
        keep = (label_ids != -100).float()
        return ((per_token * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()

    @torch.no_grad()
    def predict(self, rows, kind: str) -> list:
        check_kind(kind, KINDS, self.name)
        if kind == "rank":
            scores = self._relevance(rows, alone=True)
            return [s[:len(r["options"])].tolist() for s, r in zip(scores, rows)]
        if kind == "choice":
            scores = self._relevance(rows, alone=False) if not self._numbers(rows) else self._number_logits(rows)[1]
            return scores.argmax(-1).tolist()
        return self.generate(rows, kind)

    def generate(self, rows, kind: str) -> list[str]:
        c = self.codec
        enc, mask = pad([self._source(r["input"])[:self.hp.max_len] for r in rows], c.pad_id)
        prefix = torch.tensor([list(c.prefix)] * len(rows), device=self.device)
        out = self.model.generate(input_ids=enc.to(self.device), attention_mask=mask.to(self.device),
                                  decoder_input_ids=prefix, decoder_start_token_id=c.prefix[0],  # else prepended
                                  num_beams=BEAMS, do_sample=False,
                                  max_new_tokens=max_new_tokens(self.dataset, self.hp, rows, kind),
                                  eos_token_id=c.end_id, pad_token_id=c.pad_id)
        return [c.decode(_until(ids[len(c.prefix):].tolist(), c.end_id)) for ids in out]


def _until(ids: list[int], end: int) -> list[int]:
    return ids[:ids.index(end)] if end in ids else ids


# ---- causal LMs ----------------------------------------------------------------------------------

class CausalRecipe:
    name = "hf-causal"
    default_delta = DEFAULT_DELTA
    kinds = KINDS

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None or tokenizer.eos_token_id is None:
            raise CugeError("the causal LM's tokenizer has no eos token: generation needs one to stop")
        self.dataset, self.hp = None, HPARAMS

    def hparams(self, dataset) -> HParams:
        return HPARAMS

    def setup(self, dataset, hp: HParams, train_rows=None):
        self.dataset, self.hp = dataset, hp

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _ids(self, text: str, specials: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=specials)["input_ids"]

    def _yes(self, pieces: list[list[int]]) -> torch.Tensor:
        ids, mask = pad([p[-self.hp.max_len:] for p in pieces], self.pad_id)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        last = mask.sum(1).to(self.device) - 1
        yes = _word(lambda t: self._ids(t), self.tokenizer.unk_token_id, YES)
        return logits[torch.arange(len(pieces), device=self.device), last, yes].float()

    def _scores(self, rows, alone: bool) -> torch.Tensor:
        pairs, width = options_of(rows)
        ask = self._ids(ASK)
        head = self._ids("", specials=True)      # what the tokenizer puts first (a bos), if anything
        pieces = [head + ([] if alone else self._ids(rows[b]["input"])) + self._ids(rows[b]["options"][k]) + ask
                  for b, k in pairs]
        return scatter_options(self._yes(pieces), pairs, rows, width)

    def loss(self, rows, kind: str) -> torch.Tensor:
        check_kind(kind, KINDS, self.name)
        if kind == "rank":
            return rank_loss(self._scores(rows, alone=True), rows)
        if kind == "choice":
            return choice_loss(self._scores(rows, alone=False), rows)
        seqs, starts = [], []
        for r in rows:
            source = self._ids(r["input"], specials=True)
            target = self._ids(target_text(r, kind)) + [self.tokenizer.eos_token_id]
            room = self.hp.max_len - len(target)
            source, target = (source[-room:], target) if room > 0 else ([], target[-self.hp.max_len:])
            seqs.append(source + target)
            starts.append(len(source))
        ids, mask = pad(seqs, self.pad_id)
        labels = torch.full_like(ids, -100)
        for b, (s, n) in enumerate(zip(starts, map(len, seqs))):
            labels[b, s:n] = ids[b, s:n]
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                               labels[:, 1:].reshape(-1).to(self.device), ignore_index=-100)

    @torch.no_grad()
    def predict(self, rows, kind: str) -> list:
        check_kind(kind, KINDS, self.name)
        if kind == "rank":
            scores = self._scores(rows, alone=True)
            return [s[:len(r["options"])].tolist() for s, r in zip(scores, rows)]
        if kind == "choice":
            return self._scores(rows, alone=False).argmax(-1).tolist()
        new = max_new_tokens(self.dataset, self.hp, rows, kind)
        room = max(1, self.hp.max_len - new)
        ids, mask = pad([self._ids(r["input"], specials=True)[-room:] for r in rows], self.pad_id, left=True)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  num_beams=BEAMS, do_sample=False, max_new_tokens=new,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id)
        eos = self.tokenizer.eos_token_id
        return [self.tokenizer.decode(_until(o[ids.size(1):].tolist(), eos), skip_special_tokens=True) for o in out]


# ---- loading -------------------------------------------------------------------------------------

def load(path, device="cpu", kind: str = "hf-causal"):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if kind == "hf-seq2seq" else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=weights_dtype(device)).to(device).eval()
    if kind == "hf-causal":
        return CausalRecipe(model, tokenizer)
    start = model.config.decoder_start_token_id
    if start is None or tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise CugeError(f"{path}: a seq2seq model needs decoder_start_token_id, eos and pad ids")
    codec = Codec(encode=lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                  decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), pad_id=tokenizer.pad_token_id,
                  unk_id=tokenizer.unk_token_id, source_end=(tokenizer.eos_token_id,), prefix=(start,),
                  end_id=tokenizer.eos_token_id)
    return Seq2SeqRecipe(model, codec)
