"""The CPM-Ant tokenizer, working as CPM-Live's `CPMAntTokenizer` (cpm-ant branch) does:

1. jieba cuts the text into words (precise mode, HMM on);
2. each word is cut greedily from its left into the longest vocabulary entries (no '##' marks, so a
   token never spans two jieba words); a character that starts no entry becomes <unk>, and a word
   of more than 200 characters becomes a single <unk>;
3. space and newline are the vocab entries `</_>` and `</n>`; jieba always yields them as words
   of their own, and `decode` turns them back into ' ' and '\\n'.

The vocab (`vocabs/ant.txt`, 30,720 entries) is plain text, one token per line; as in CPM-Live, lines
are stripped and blank ones skipped, so the id is the line index for a file without blank lines.
Unlike CPM-Live, `tokenize` spells space and newline as `</_>` and `</n>` (the vocab's own strings);
the ids are the same.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DeltakitError
from .wordcut import greedy_ids, jieba_cut

SPECIALS = ("<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>")
_TEXT = {"</_>": " ", "</n>": "\n"}   # vocab spelling -> the character jieba yields


def _special(token: str) -> property:
    return property(lambda self: self.encoder[token], doc=f"id of {token}")


class CPMAntTokenizer:
    pad_id, unk_id, mask_id, sep_id = map(_special, ("<pad>", "<unk>", "<mask>", "<sep>"))
    bos_id, eos_id, bod_id, eod_id = map(_special, ("<s>", "</s>", "<d>", "</d>"))
    newline_id, space_id = map(_special, ("</n>", "</_>"))

    def __init__(self, vocab_file, hmm: bool = True):
        self._cut, self.hmm = jieba_cut("CPM-Ant"), hmm
        self.decoder = _load_vocab(Path(vocab_file))
        self.encoder = {tok: i for i, tok in enumerate(self.decoder)}
        # what the greedy match looks up: jieba's ' ' and '\n' stand for </_> and </n>
        self._match = {_TEXT.get(tok, tok): i for tok, i in self.encoder.items()}
        self._longest = max(map(len, self._match))

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def __len__(self) -> int:
        return len(self.decoder)

    def _word_ids(self, word: str) -> list[int]:
        return greedy_ids(word, self._match, self._longest, self.unk_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <s> or </s>."""
        return [i for word in self._cut(text, HMM=self.hmm) for i in self._word_ids(word)]

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text))

    def decode(self, ids) -> str:
        """Text of `ids` (list or tensor); <pad> and negative ids are dropped, other specials kept."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        tokens = self.convert_ids_to_tokens([i for i in ids if i >= 0 and i != self.pad_id])
        return "".join(_TEXT.get(t, t) for t in tokens)

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        """Vocab strings to ids; ' ' and '\\n' are accepted for </_> and </n>, anything else is <unk>."""
        return [self.encoder.get(t, self._match.get(t, self.unk_id)) for t in tokens]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        bad = [i for i in ids if i >= len(self.decoder)]
        if bad:
            raise DeltakitError(f"token ids {bad[:5]} are out of range: this vocab has {len(self)} tokens")
        return [self.decoder[i] if i >= 0 else "<unk>" for i in ids]   # negative -> <unk>, as CPM-Live

    def __call__(self, texts, max_length: int | None = None, padding: str = "longest",
                 add_bos: bool = True, add_eos: bool = False) -> dict[str, torch.Tensor]:
        """A batch for the native model: `input_ids` (B, L) padded on the right with <pad>, and
        `length` (B,). <s> is added by default, as CPM-Live's generation does. `max_length` cuts the
        text, not the added <s>/</s>; padding="max_length" pads every row to `max_length`."""
        if padding not in ("longest", "max_length"):
            raise DeltakitError(f"padding={padding!r}: use 'longest' or 'max_length'")
        if padding == "max_length" and max_length is None:
            raise DeltakitError("padding='max_length' needs max_length")
        texts = [texts] if isinstance(texts, str) else list(texts)
        head, tail = [self.bos_id] * add_bos, [self.eos_id] * add_eos
        room = None if max_length is None else max_length - len(head) - len(tail)
        if room is not None and room < 0:
            raise DeltakitError(f"max_length={max_length} leaves no room for <s>/</s>")
        rows = [head + self.encode(t)[:room] + tail for t in texts]
        width = max_length if padding == "max_length" else max(map(len, rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for b, ids in enumerate(rows):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": input_ids, "length": torch.tensor([len(r) for r in rows], dtype=torch.long)}


def _load_vocab(path: Path) -> list[str]:
    if not path.is_file():
        raise DeltakitError(f"CPM-Ant vocab file not found: {path} (one token per line, as CPM-Live's "
                            "cpm_live/vocabs/ant.txt)")
    try:
        with path.open(encoding="utf-8") as f:   # universal newlines, as CPM-Live's readlines()
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise DeltakitError(f"{path} is not UTF-8 text ({e}); a CPM-Ant vocab is") from None
    tokens, line_of = [], {}
    for n, line in enumerate(lines, 1):
        tok = line.strip()
        if not tok:
            continue
        if tok in line_of:
            raise DeltakitError(f"{path}: token {tok!r} appears twice, on lines {line_of[tok]} and {n}; "
                                "every token needs a line of its own")
        line_of[tok] = n
        tokens.append(tok)
    missing = [t for t in SPECIALS if t not in line_of]
    if missing:
        raise DeltakitError(f"{path} lacks the special tokens {', '.join(missing)}; "
                            f"a CPM-Ant vocab has all of {', '.join(SPECIALS)}")
    return tokens
