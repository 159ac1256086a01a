"""The CPM-2 tokenizer, working as TsinghuaAI/CPM-2-Finetune's `EncDecTokenizer`
(`tokenization_enc_dec.py`, with `bpe_cn/vocab.txt`) does:

1. every character goes from full width to half width (its `Q2B`: U+FF01..U+FF5E -> ASCII, U+3000 -> space),
   except the Chinese punctuation ，。！（）？、；： which stays;
2. jieba cuts the text into words (precise mode, HMM on);
3. inside each word, space becomes '▂' (U+2582) and newline '▃' (U+2583), the vocab's own spellings;
4. each word is cut greedily from its left into the longest vocabulary entries (no '##' marks: the
   Chinese vocab has none); a character that starts no entry becomes <unk>, a word of more than 200
   characters a single <unk>. `decode` turns '▂'/'▃' back into ' ' and '\\n'.

The vocab is plain text, one token per line, stripped; the id is the line index (a blank line keeps its
id, as in the original). CPM-2's Chinese vocab has 26,240 lines: <unk>=0 <s>=1 </s>=2 ▃=3 <sep>=4 <pad>=5
<mask>=6 <eod>=7 ▁=8, ▂=10, then the words, then the 190 sentinels <s_0>..<s_189> that
`bpe_cn/add_special_token.py` appends (26050..26239).

How CPM-2-Finetune (`CPM2Datasets.py`) uses the specials: the decoder reads `[<s>, <s_0>] + target` and
is trained to emit `<s_0> + target + <s_1>`; generation starts from <s> and stops at <s_1>
(`finetune_cpm2.py::evaluate_gen`); padding is <pad>. `decoder_prefix` / `end_id` name them here.
The bilingual vocab (`bpe_cn_en`, with '##' pieces and space filtering) is a different tokenizer and
is refused.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DeltakitError
from .wordcut import greedy_ids, jieba_cut

SPECIALS = ("<unk>", "<s>", "</s>", "<sep>", "<pad>", "<mask>", "<eod>")
SENTINELS = 190                     # bpe_cn/add_special_token.py appends <s_0>..<s_189>
_KEEP = set("，。！（）？、；：")     # Q2B leaves these full-width
_TO_VOCAB = str.maketrans(" \n", "\u2582\u2583")


def q2b(char: str) -> str:
    """CPM-2's full-width -> half-width mapping of one character."""
    if char in _KEEP:
        return char
    code = ord(char)
    code = 0x20 if code == 0x3000 else code - 0xFEE0
    return chr(code) if 0x20 <= code <= 0x7E else char


class CPM2Tokenizer:
    unk_id, bos_id, eos_id, sep_id, pad_id, mask_id, eod_id = (
        property(lambda self, t=t: self.encoder[t], doc=f"id of {t}") for t in SPECIALS)

    def __init__(self, vocab_file, sentinels: int = SENTINELS, hmm: bool = True):
        self._cut, self.hmm = jieba_cut("CPM-2"), hmm
        self.decoder = _load_vocab(Path(vocab_file), sentinels)
        self.encoder = {tok: i for i, tok in enumerate(self.decoder) if tok}
        self.sentinels = [self.encoder[f"<s_{i}>"] for i in range(sentinels)]
        self._longest = max(map(len, self.encoder))

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    def __len__(self) -> int:
        return len(self.decoder)

    def sentinel_id(self, i: int) -> int:
        """id of <s_i> (CPM-2-Finetune's get_sentinel_id)."""
        return self.sentinels[i]

    @property
    def decoder_prefix(self) -> list[int]:
        """What the decoder reads before the target: <s>, <s_0>."""
        return [self.bos_id, self.sentinel_id(0)]

    @property
    def end_id(self) -> int:
        """The token that ends a target: <s_1>."""
        return self.sentinel_id(1)

    def _word_ids(self, word: str) -> list[int]:
        return greedy_ids(word, self.encoder, self._longest, self.unk_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no <s>, </s> or sentinel is added."""
        text = "".join(map(q2b, text))
        return [i for word in self._cut(text, HMM=self.hmm) for i in self._word_ids(word.translate(_TO_VOCAB))]

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text))

    def decode(self, ids) -> str:
        """Text of `ids` (list or tensor); <pad> and negative ids are dropped, other specials kept."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        text = "".join(self.convert_ids_to_tokens([i for i in ids if i >= 0 and i != self.pad_id]))
        return text.replace("\u2582", " ").replace("\u2583", "\n")

    def convert_tokens_to_ids(self, tokens) -> list[int]:
        return [self.encoder.get(t, self.unk_id) for t in tokens]

    def convert_ids_to_tokens(self, ids) -> list[str]:
        bad = [i for i in ids if not 0 <= i < len(self.decoder)]
        if bad:
            raise DeltakitError(f"token ids {bad[:5]} are out of range: this vocab has {len(self)} tokens")
        return [self.decoder[i] for i in ids]


def _load_vocab(path: Path, sentinels: int) -> list[str]:
    if not path.is_file():
        raise DeltakitError(f"CPM-2 vocab file not found: {path} (one token per line, as CPM-2's bpe_cn/vocab.txt)")
    try:
        with path.open(encoding="utf-8") as f:
            tokens = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise DeltakitError(f"{path} is not UTF-8 text ({e}); a CPM-2 vocab is") from None
    line_of = {}
    for n, tok in enumerate(tokens, 1):
        if tok in line_of:
            raise DeltakitError(f"{path}: token {tok!r} appears twice, on lines {line_of[tok]} and {n}; "
                                "every token needs a line of its own")
        if tok:
            line_of[tok] = n
    if any(t.startswith("##") for t in line_of):
        raise DeltakitError(f"{path} has '##' word pieces: it is CPM-2's bilingual vocab (bpe_cn_en), whose "
                            "tokenizer differs; this one reads the Chinese vocab bpe_cn/vocab.txt")
    need = list(SPECIALS) + [f"<s_{i}>" for i in range(sentinels)]
    missing = [t for t in need if t not in line_of]
    if missing:
        more = f" (and {len(missing) - 6} more)" if len(missing) > 6 else ""
        raise DeltakitError(f"{path} lacks {', '.join(missing[:6])}{more}; a CPM-2 vocab has {', '.join(SPECIALS)} "
                            f"and the sentinels <s_0>..<s_{sentinels - 1}>")
    return tokens
