"""The CPM-Ant tokenizer on a small vocab the tests write: jieba words, greedy longest match inside
each word, specials, space/newline, batches, errors. Expected lists were worked out by hand from
jieba 0.42's default dictionary and CPM-Live's algorithm."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("jieba")

from deltakit.backbones.cpmant_tokenizer import CPMAntTokenizer  # noqa: E402
from deltakit.errors import DeltakitError  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "<mask>", "<sep>", "</n>", "</_>", "<s>", "</s>", "<d>", "</d>"]
# "在北" spans the jieba words 在|北京大学, "北京大" is longer than "北京": both test the match rules
WORDS = ["北京", "北京大学", "北京大", "在北", "大学", "北", "京", "大", "学", "我", "在", "读", "书", "杭研",
         "杭", "研", "人", "很", "好", "今天", "天气", "今", "天", "气", "a", "b", "c", "ab", "abc", "1", "2"]


def write_vocab(path, tokens):
    path.write_text("\n".join(tokens), encoding="utf-8")   # no trailing newline, as ant.txt
    return path


@pytest.fixture
def tok(tmp_path):
    return CPMAntTokenizer(write_vocab(tmp_path / "vocab.txt", SPECIALS + WORDS))


def test_specials_are_looked_up_in_the_vocab(tmp_path):
    # shuffle the specials: ids must follow the file, not CPM-Live's usual 0..9
    order = SPECIALS[::-1]
    t = CPMAntTokenizer(write_vocab(tmp_path / "v.txt", WORDS + order))
    at = {s: len(WORDS) + order.index(s) for s in SPECIALS}
    assert (t.pad_id, t.unk_id, t.mask_id, t.sep_id) == (at["<pad>"], at["<unk>"], at["<mask>"], at["<sep>"])
    assert (t.bos_id, t.eos_id, t.newline_id, t.space_id) == (at["<s>"], at["</s>"], at["</n>"], at["</_>"])
    assert len(t) == t.vocab_size == len(WORDS) + len(SPECIALS)
    assert t.encode("北京") == [0]


def test_real_layout_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.mask_id, tok.sep_id, tok.newline_id, tok.space_id,
            tok.bos_id, tok.eos_id, tok.bod_id, tok.eod_id) == tuple(range(10))
    assert tok.encode("我") == [10 + WORDS.index("我")]


def test_longest_match_inside_jieba_words(tok):
    # jieba: 我|在|北京大学|读书. Longest match takes 北京大学 whole; 在北 would win a plain greedy
    # match over the whole string, but it spans two jieba words; 读书 is not in the vocab
    assert tok.tokenize("我在北京大学读书") == ["我", "在", "北京大学", "读", "书"]
    # jieba: 北京|人|很|好 and 北京|大 -> never 北京大, which crosses a jieba boundary
    assert tok.tokenize("北京人很好") == ["北京", "人", "很", "好"]
    assert tok.tokenize("北京大") == ["北京", "大"]
    # jieba keeps 今天天气 as one word; inside it the longest entries from the left win
    assert tok.tokenize("今天天气很好") == ["今天", "天气", "很", "好"]
    assert tok.tokenize("abcab12") == ["abc", "ab", "1", "2"]   # one jieba word


def test_longest_match_prefers_length_over_a_better_split(tmp_path):
    # without 北京大学 in the vocab, greedy takes 北京大 + 学, not 北京 + 大学
    t = CPMAntTokenizer(write_vocab(tmp_path / "v.txt", SPECIALS + [w for w in WORDS if w != "北京大学"]))
    assert t.tokenize("北京大学") == ["北京大", "学"]


def test_hmm_finds_new_words_as_cpm_live(tmp_path):
    text = "网易杭研"   # 杭研 is not in jieba's dictionary; only the HMM joins it
    on = CPMAntTokenizer(write_vocab(tmp_path / "v.txt", SPECIALS + WORDS))
    off = CPMAntTokenizer(tmp_path / "v.txt", hmm=False)
    assert on.tokenize(text) == ["<unk>", "<unk>", "杭研"]
    assert off.tokenize(text) == ["<unk>", "<unk>", "杭", "研"]


def test_unknown_characters_become_unk(tok):
    assert tok.tokenize("我爱书") == ["我", "<unk>", "书"]
    assert tok.encode("爱") == [tok.unk_id]
    assert tok.tokenize("abd") == ["ab", "<unk>"]
    assert tok.tokenize("a" * 201) == ["<unk>"]          # CPM-Live's 200-character word limit
    assert tok.tokenize("a" * 200) == ["a"] * 200


def test_newline_and_space_round_trip(tok):
    ids = tok.encode("今天 很好\n我  ab")
    assert tok.convert_ids_to_tokens(ids) == ["今天", "</_>", "很", "好", "</n>", "我", "</_>", "</_>", "ab"]
    assert ids[1] == tok.space_id and ids[4] == tok.newline_id
    assert tok.decode(ids) == "今天 很好\n我  ab"
    assert tok.decode(torch.tensor(ids + [tok.pad_id] * 3)) == "今天 很好\n我  ab"
    assert tok.tokenize("a\r\nb") == ["a", "<unk>", "</n>", "b"]   # \r is not in the vocab
    assert tok.decode([tok.bos_id, *tok.encode("我"), tok.eos_id]) == "<s>我</s>"


def test_token_id_conversion(tok):
    assert tok.convert_tokens_to_ids(["</_>", " ", "\n", "北京", "nope"]) == [5, 5, 4, 10, 1]
    assert tok.convert_ids_to_tokens([10, 4, -1]) == ["北京", "</n>", "<unk>"]
    with pytest.raises(DeltakitError, match="out of range"):
        tok.convert_ids_to_tokens([len(tok)])


def test_batch_pads_right_and_truncates(tok):
    w = tok.encode
    out = tok(["我在读书", "好"], add_eos=True)
    assert out["length"].tolist() == [6, 3]
    assert out["input_ids"].tolist() == [[6, *w("我在读书"), 7], [6, *w("好"), 7, 0, 0, 0]]
    assert out["input_ids"].dtype == torch.long
    short = tok(["我在读书", "好"], max_length=3, add_eos=True)    # the text is cut, <s> and </s> stay
    assert short["input_ids"].tolist() == [[6, w("我")[0], 7], [6, w("好")[0], 7]]
    assert short["length"].tolist() == [3, 3]
    fixed = tok("好", max_length=4, padding="max_length", add_bos=False)
    assert fixed["input_ids"].tolist() == [[w("好")[0], 0, 0, 0]] and fixed["length"].tolist() == [1]
    with pytest.raises(DeltakitError, match="max_length"):
        tok(["好"], padding="max_length")
    with pytest.raises(DeltakitError, match="padding"):
        tok(["好"], padding="left")


def test_bad_vocab_files(tmp_path):
    with pytest.raises(DeltakitError, match="not found: .*none.txt"):
        CPMAntTokenizer(tmp_path / "none.txt")
    path = tmp_path / "v.txt"
    write_vocab(path, [s for s in SPECIALS if s not in ("</n>", "<sep>")] + WORDS)
    with pytest.raises(DeltakitError, match=r"lacks the special tokens <sep>, </n>;"):
        CPMAntTokenizer(path)
    write_vocab(path, SPECIALS + ["我", "好", "我"])
    with pytest.raises(DeltakitError, match="'我' appears twice, on lines 11 and 13"):
        CPMAntTokenizer(path)


def test_import_deltakit_does_not_import_jieba():
    code = ("import deltakit, sys; from deltakit.backbones import cpmant_tokenizer; "
            "assert 'jieba' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_jieba_says_how_to_install(tmp_path, monkeypatch):
    path = write_vocab(tmp_path / "v.txt", SPECIALS + WORDS)
    monkeypatch.setitem(sys.modules, "jieba", None)   # import jieba -> ImportError
    with pytest.raises(DeltakitError, match="pip install jieba"):
        CPMAntTokenizer(path)
