"""The CPM-Ant tokenizer on a small vocab the tests write: jieba words, greedy longest match inside
each word, specials, batches, errors."""
import subprocess
import sys

import pytest
import torch

from deltakit.backbones.cpmant_tokenizer import CPMAntTokenizer
from deltakit.errors import DeltakitError

SPECIALS = ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>"]
WORDS = ["北京", "北京大学", "大学", "北", "京", "大", "学", "我", "在", "读", "书", "今天", "天气", "很", "好",
         "今", "天", "气", "a", "b", "ab", "abc", "1", "2"]


@pytest.fixture
def tok(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SPECIALS + WORDS), encoding="utf-8")   # no trailing newline, as ant.txt
    return CPMAntTokenizer(path)


def test_specials_come_from_the_vocab(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.newline_id, tok.space_id) == (0, 1, 6, 7, 4, 5)
    assert len(tok) == tok.vocab_size == len(SPECIALS) + len(WORDS)


def test_longest_match_inside_jieba_words(tok):
    # jieba keeps 北京大学 as one word; the longest vocab entry from the left wins inside it
    assert tok.tokenize("我在北京大学读书") == ["我", "在", "北京大学", "读", "书"]
    assert tok.tokenize("abcab") == ["abc", "ab"]
    assert tok.tokenize("今天天气很好") == ["今天", "天气", "很", "好"]


def test_unknown_characters_become_unk(tok):
    assert tok.tokenize("我爱书") == ["我", "<unk>", "书"]
    assert tok.encode("爱") == [tok.unk_id]


def test_newline_and_space_round_trip(tok):
    ids = tok.encode("今天 很好\n我")
    assert tok.convert_ids_to_tokens(ids) == ["今天", "</_>", "很", "好", "</n>", "我"]
    assert tok.decode(ids) == "今天 很好\n我"
    assert tok.decode(ids + [tok.pad_id] * 3) == "今天 很好\n我"


def test_batch_pads_right_and_truncates(tok):
    out = tok(["我在读书", "好"], add_eos=True)
    assert out["length"].tolist() == [6, 3]
    assert out["input_ids"][1].tolist() == [tok.bos_id, tok.encode("好")[0], tok.eos_id, 0, 0, 0]
    short = tok(["我在读书"], max_length=3)
    assert short["input_ids"].shape == (1, 3) and short["length"].tolist() == [3]
    assert isinstance(short["input_ids"], torch.Tensor)


def test_bad_vocab_files(tmp_path):
    with pytest.raises(DeltakitError, match="not found"):
        CPMAntTokenizer(tmp_path / "none.txt")
    path = tmp_path / "v.txt"
    path.write_text("\n".join(SPECIALS[:4] + WORDS), encoding="utf-8")
    with pytest.raises(DeltakitError, match="</n>"):
        CPMAntTokenizer(path)
    path.write_text("\n".join(SPECIALS + ["我", "好", "我"]), encoding="utf-8")
    with pytest.raises(DeltakitError, match="lines 11 and 13"):
        CPMAntTokenizer(path)


def test_import_deltakit_does_not_import_jieba():
    code = "import deltakit, sys; from deltakit.backbones import cpmant_tokenizer; assert 'jieba' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
