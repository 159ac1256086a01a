"""What the CPM-Ant and CPM-2 tokenizers share: jieba words, each cut greedily from its left into the
longest vocabulary entries (BERT's WordpieceTokenizer without '##' marks), as both originals do."""
from __future__ import annotations

import logging

from ..errors import DeltakitError

MAX_WORD = 200   # the originals' max_input_chars_per_word: a longer word is one <unk>


def jieba_cut(who: str):
    """jieba's `cut`, quiet; a clear error when jieba is missing."""
    try:
        import jieba
    except ImportError:
        raise DeltakitError(f"the {who} tokenizer needs jieba: pip install jieba (or pip install deltakit[cpm])") from None
    jieba.setLogLevel(logging.WARNING)   # no "Building prefix dict" chatter on first cut
    return jieba.cut


def greedy_ids(word: str, table: dict[str, int], longest: int, unk: int) -> list[int]:
    """Ids of `word` cut left to right into the longest entries of `table`; a character that starts
    no entry becomes `unk`, and so does a word of more than MAX_WORD characters."""
    if len(word) > MAX_WORD:
        return [unk]
    ids, start = [], 0
    while start < len(word):
        for end in range(min(len(word), start + longest), start, -1):   # longest first
            if word[start:end] in table:
                ids.append(table[word[start:end]])
                start = end
                break
        else:
            ids.append(unk)
            start += 1
    return ids
