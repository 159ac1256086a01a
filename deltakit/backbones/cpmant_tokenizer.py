"""The CPM-Ant tokenizer, as CPM-Live's `CPMAntTokenizer` works: jieba splits the text into words
(HMM on), then each word is cut greedily into the longest vocabulary entries from its left (no '##'
continuation marks); a character in no entry becomes <unk>. Newline and space are the tokens `</n>`
and `</_>`. The vocab file has one token per line, id = line number (`vocabs/ant.txt`, 30,720 lines).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DeltakitError

SPECIALS = {"pad": "<pad>", "unk": "<unk>", "mask": "<mask>", "sep": "<sep>", "bos": "<s>", "eos": "</s>",
            "newline": "</n>", "space": "</_>"}
_TEXT = {"\n": "</n>", " ": "</_>"}   # characters the vocab spells as tokens


class CPMAntTokenizer:
    def __init__(self, vocab_file, hmm: bool = True):
        path = Path(vocab_file)
        if not path.is_file():
            raise DeltakitError(f"CPM-Ant vocab file not found: {path} (one token per line, e.g. CPM-Live's vocabs/ant.txt)")
        tokens = path.read_text(encoding="utf-8").split("\n")
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.encoder: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            if tok in self.encoder:
                raise DeltakitError(f"{path}: token {tok!r} appears twice, on lines {self.encoder[tok] + 1} and {i + 1}")
            self.encoder[tok] = i
        missing = [t for t in SPECIALS.values() if t not in self.encoder]
        if missing:
            raise DeltakitError(f"{path} lacks the special tokens {missing}; a CPM-Ant vocab has {list(SPECIALS.values())}")
        self.decoder = tokens
        self.max_len = max(map(len, tokens))
        self.hmm = hmm
        for name, tok in SPECIALS.items():
            setattr(self, f"{name}_id", self.encoder[tok])

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def __len__(self):
        return len(self.decoder)

    def _words(self, text: str):
        try:
            import jieba
        except ImportError:
            raise DeltakitError("the CPM-Ant tokenizer needs jieba: pip install jieba (or deltakit[cpm])") from None
        import logging
        jieba.setLogLevel(logging.WARNING)   # no "Building prefix dict" chatter
        return jieba.cut(text, HMM=self.hmm)

    def _greedy(self, word: str) -> list[str]:
        out, i = [], 0
        while i < len(word):
            for j in range(min(len(word), i + self.max_len), i, -1):   # longest match first
                if word[i:j] in self.encoder:
                    out.append(word[i:j])
                    i = j
                    break
            else:
                out.append(SPECIALS["unk"])
                i += 1
        return out

    def tokenize(self, text: str) -> list[str]:
        out = []
        for word in self._words(text):
            for piece in _split_keep(word, _TEXT):
                out += [_TEXT[piece]] if piece in _TEXT else self._greedy(piece)
        return out

    def encode(self, text: str) -> list[int]:
        return self.convert_tokens_to_ids(self.tokenize(text))

    def decode(self, ids) -> str:
        back = {v: k for k, v in _TEXT.items()}
        tokens = self.convert_ids_to_tokens([int(i) for i in ids if int(i) != self.pad_id])
        return "".join(back.get(t, t) for t in tokens)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.encoder.get(t, self.unk_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decoder[i] for i in ids]

    def __call__(self, texts: list[str], max_length: int | None = None, add_bos: bool = True,
                 add_eos: bool = False) -> dict:
        """A right-padded batch: `input_ids` (B, L) and `length` (B,), what the native model takes."""
        rows = []
        for text in texts:
            ids = ([self.bos_id] if add_bos else []) + self.encode(text) + ([self.eos_id] if add_eos else [])
            rows.append(ids[:max_length] if max_length else ids)
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for b, ids in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": input_ids, "length": torch.tensor([len(r) for r in rows])}


def _split_keep(word: str, seps) -> list[str]:
    """Split a word at the characters in `seps`, keeping them as pieces of their own."""
    out, cur = [], ""
    for ch in word:
        if ch in seps:
            out += [cur, ch] if cur else [ch]
            cur = ""
        else:
            cur += ch
    return out + [cur] if cur else out
