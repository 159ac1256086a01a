"""The CPM-2 tokenizer on a small vocab the tests write, against a reference written here the way
TsinghuaAI/CPM-2-Finetune's `tokenization_enc_dec.py` (EncDecTokenizer) is written: its vocab loader,
Q2B, jieba, the space/newline translation and its WordpieceTokenizer loop, line for line. Expected
token lists were worked out by hand from jieba 0.42's default dictionary."""
import collections
import random
import subprocess
import sys

import pytest
import torch

jieba = pytest.importorskip("jieba")

from deltakit.backbones.cpm2_tokenizer import CPM2Tokenizer  # noqa: E402
from deltakit.errors import DeltakitError  # noqa: E402

# the head of bpe_cn/vocab.txt, in its order (ids 0..10)
HEAD = ["<unk>", "<s>", "</s>", "\u2583", "<sep>", "<pad>", "<mask>", "<eod>", "\u2581", ",", "\u2582"]
WORDS = ["的", "。", "！", "，", "：", "、", "北京", "北京大学", "北京大", "在北", "大学", "北", "京", "大", "学",
         "我", "在", "读", "书", "今天", "天气", "今", "天", "气", "很", "好", "AB", "A", "B", "1", "12", "x",
         "=", "+", "?", "？", "(", "（", "一", "二", "选项", "文章", "相关"]
SENTINELS = [f"<s_{i}>" for i in range(190)]


def write_vocab(path, tokens):
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")   # add_special_token.py's layout
    return path


# ---- the reference: CPM-2-Finetune's EncDecTokenizer ------------------------------------------

def ref_load_vocab(vocab_file):
    vocab, index = collections.OrderedDict(), 0
    with open(vocab_file, "r", encoding="utf-8") as reader:
        while True:
            token = reader.readline()
            if not token:
                break
            vocab[token.strip()] = index
            index += 1
    return vocab


def ref_wordpiece(vocab, token, unk="<unk>", max_chars=200):
    chars = list(token)
    if len(chars) > max_chars:
        return [unk]
    start, sub_tokens = 0, []
    while start < len(chars):
        end, cur = len(chars), None
        while start < end:
            substr = "".join(chars[start:end])
            if substr in vocab:
                cur = substr
                break
            end -= 1
        if cur is None:
            sub_tokens.append(unk)
            start += 1
            continue
        sub_tokens.append(cur)
        start = end
    return sub_tokens


def ref_q2b(uchar):
    if uchar in ['，', '。', '！', '（', '）', '？', '、', '；', '：']:
        return uchar
    inside_code = ord(uchar)
    if inside_code == 0x3000:
        inside_code = 0x0020
    else:
        inside_code -= 0xfee0
    if inside_code < 0x0020 or inside_code > 0x7e:
        return uchar
    return chr(inside_code)


class Reference:
    def __init__(self, vocab_file):
        self.encoder = ref_load_vocab(vocab_file)
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.translator = str.maketrans(" \n", "\u2582\u2583")
        self.sentinel_list = [self.encoder[f"<s_{i}>"] for i in range(190)]

    def encode(self, text):
        text = "".join(ref_q2b(x) for x in text)
        out = []
        for x in jieba.cut(text, cut_all=False):
            out.extend(ref_wordpiece(self.encoder, x.translate(self.translator)))
        return [self.encoder[x] for x in out]

    def decode(self, tokens):
        return "".join(self.decoder[x] for x in tokens).replace("\u2582", " ").replace("\u2583", "\n")


@pytest.fixture
def vocab(tmp_path):
    return write_vocab(tmp_path / "vocab.txt", HEAD + WORDS + SENTINELS)


@pytest.fixture
def tok(vocab):
    return CPM2Tokenizer(vocab)


# ---- tests -------------------------------------------------------------------------------------

def test_special_ids_follow_the_file_as_in_cpm2(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.eod_id) == (0, 1, 2, 4, 5, 6, 7)
    n = len(HEAD) + len(WORDS)
    assert tok.sentinel_id(0) == n and tok.sentinel_id(189) == n + 189
    assert tok.decoder_prefix == [1, n] and tok.end_id == n + 1       # [<s>, <s_0>] ... <s_1>
    assert len(tok) == tok.vocab_size == n + 190


def test_longest_match_inside_jieba_words(tok):
    # jieba: 我|在|北京大学|读书; 读书 is not in the vocab, 在北 would span two jieba words
    assert tok.tokenize("我在北京大学读书") == ["我", "在", "北京大学", "读", "书"]
    assert tok.tokenize("北京大") == ["北京", "大"]                     # jieba: 北京|大
    assert tok.tokenize("今天天气很好") == ["今天", "天气", "很", "好"]   # one jieba word, cut longest-first
    assert tok.tokenize("AB12x") == ["AB", "12", "x"]
    assert tok.tokenize("我爱书") == ["我", "<unk>", "书"]
    assert tok.tokenize("A" * 201) == ["<unk>"] and tok.tokenize("A" * 200) == ["A"] * 200


def test_full_width_becomes_half_width_except_chinese_punctuation(tok):
    # Ａ Ｂ １ ２ ＋ ＝ are full-width ASCII: mapped; ，。！：、 stay; U+3000 is a space
    assert tok.tokenize("ＡＢ１２") == ["AB", "12"]
    assert tok.tokenize("x＝1＋1") == ["x", "=", "1", "+", "1"]
    assert tok.tokenize("好，很好！") == ["好", "，", "很", "好", "！"]
    assert tok.tokenize("选项：一、二") == ["选项", "：", "一", "、", "二"]
    assert tok.tokenize("我\u3000好") == ["我", "\u2582", "好"]
    assert tok.encode(",") == [9] and tok.encode("，") == [HEAD.__len__() + WORDS.index("，")]


def test_space_and_newline_are_the_vocab_pieces(tok):
    ids = tok.encode("今天 很好\n我  AB")
    assert tok.convert_ids_to_tokens(ids) == ["今天", "▂", "很", "好", "▃", "我", "▂", "▂", "AB"]
    assert ids[1] == 10 and ids[4] == 3
    assert tok.decode(ids) == "今天 很好\n我  AB"
    assert tok.decode(torch.tensor(ids + [tok.pad_id] * 2)) == "今天 很好\n我  AB"   # <pad> dropped
    assert tok.decode([1, *tok.encode("我"), tok.end_id]) == "<s>我<s_1>"


def test_agrees_with_the_reference_on_random_text(vocab, tok):
    ref = Reference(vocab)
    rng = random.Random(0)
    alphabet = [c for w in WORDS for c in w] + list("爱书读好ＡＢ１２　 \n\r\t,.？（）x=+-") + ["北京", "大学"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert tok.encode(text) == ref.encode(text), repr(text)
        ids = tok.encode(text)
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.sentinels == ref.sentinel_list


def test_a_blank_line_keeps_its_id_as_in_the_original(tmp_path):
    path = write_vocab(tmp_path / "v.txt", HEAD + ["我", "", "好"] + SENTINELS)
    tok, ref = CPM2Tokenizer(path), Reference(path)
    assert tok.encode("我好") == ref.encode("我好") == [11, 13]
    assert tok.sentinel_id(0) == ref.sentinel_list[0] == 14


def test_token_id_conversion(tok):
    assert tok.convert_tokens_to_ids(["北京", "nope", "<s_3>"]) == [11 + WORDS.index("北京"), 0, tok.sentinel_id(3)]
    with pytest.raises(DeltakitError, match="out of range"):
        tok.convert_ids_to_tokens([len(tok)])


def test_bad_vocab_files(tmp_path):
    with pytest.raises(DeltakitError, match="not found: .*none.txt"):
        CPM2Tokenizer(tmp_path / "none.txt")
    path = tmp_path / "v.txt"
    write_vocab(path, HEAD + WORDS)
    with pytest.raises(DeltakitError, match=r"lacks <s_0>, <s_1>, .* \(and 184 more\).*sentinels <s_0>..<s_189>"):
        CPM2Tokenizer(path)
    write_vocab(path, [t for t in HEAD if t != "<eod>"] + WORDS + SENTINELS)
    with pytest.raises(DeltakitError, match="lacks <eod>"):
        CPM2Tokenizer(path)
    write_vocab(path, HEAD + ["我", "好", "我"] + SENTINELS)
    with pytest.raises(DeltakitError, match="'我' appears twice, on lines 12 and 14"):
        CPM2Tokenizer(path)
    write_vocab(path, HEAD + ["hel", "##lo"] + SENTINELS)
    with pytest.raises(DeltakitError, match="bilingual vocab"):
        CPM2Tokenizer(path)
    path.write_bytes(b"\xff\xfe<unk>\n")
    with pytest.raises(DeltakitError, match="not UTF-8"):
        CPM2Tokenizer(path)
    assert CPM2Tokenizer(write_vocab(path, HEAD + WORDS + SENTINELS[:5]), sentinels=5).end_id == len(HEAD + WORDS) + 1


def test_import_deltakit_does_not_import_jieba():
    code = ("import deltakit, sys; from deltakit.backbones import cpm2_tokenizer; "
            "assert 'jieba' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_jieba_says_how_to_install(vocab, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)   # import jieba -> ImportError
    with pytest.raises(DeltakitError, match="pip install jieba"):
        CPM2Tokenizer(vocab)
