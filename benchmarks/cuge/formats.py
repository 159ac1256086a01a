"""Readers: a file of one split -> its records, one at a time with the line each starts on; and
per format, one record -> the canonical rows of data.py (without `id`/`meta` defaults).

Files are JSON lines, a JSON array (read incrementally with the standard library's decoder, which,
unlike a token-stream parser, lets every error name its line), or plain text lines (the SIGHAN
segmentation layout). Nothing reads a whole file at once. A record that does not fit raises
`Bad(field, expected, got)`; data.py adds the path and line.

`READERS[name]` is the table of released formats (the registry's `released` names): the file names
looked for per split, the parser, and what one record is. `cpmant(kind, split)` parses CPM-Ant's
preprocessed lines. Where each format comes from: registry.py's `fields` and `note`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from . import arith
from .errors import CugeError


class Bad(Exception):
    """One record does not fit its format: which field, what was expected, what was there."""

    def __init__(self, field: str, expected: str, got=None):
        shown = json.dumps(got, ensure_ascii=False)[:80] if got is not None else "nothing"
        super().__init__(f"field {field!r}: expected {expected}, got {shown}")


# ---- records ---------------------------------------------------------------------------------
CHUNK = 1 << 20
MAX_RECORD = 64 << 20    # one JSON-array item larger than this is a syntax error, not a record


def records(path, text: bool = False, is_record: Callable = lambda x: isinstance(x, dict)):
    """(line number, record) for every record of `path`: text lines (`text`), JSON lines, or the
    items of a JSON array (whichever the file holds: a first line that is a record means JSON lines)."""
    with open(path, encoding="utf-8-sig") as f:
        if text:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line.strip()
            return
        first = _first_line(f)
        if not first.strip():
            return          # an empty file has no records (data.load says so)
        if _first_is_record(first, is_record):
            yield from _json_lines(f, path)
        elif first.lstrip().startswith("["):
            yield from _json_array(f, path)
        else:
            raise CugeError(f"{path}:1: expected JSON lines (one record per line) or a JSON array of "
                            f"records, got {first.strip()[:80]!r}")


def _first_line(f) -> str:
    """The first non-blank line (at most CHUNK characters of it); the file is rewound."""
    line = f.readline(CHUNK)
    while line and not line.strip():
        line = f.readline(CHUNK)
    f.seek(0)
    return line


def _first_is_record(line: str, is_record) -> bool:
    s = line.strip()
    if s.startswith("{"):
        return True     # a dict-first file is JSON lines; its errors are reported line by line
    if not s.startswith("[") or not s.endswith("]") or len(line) >= CHUNK:
        return False
    try:
        return is_record(json.loads(s))
    except json.JSONDecodeError:
        return False


def _json_lines(f, path):
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise CugeError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line "
                            "must be one JSON object") from None


def _json_array(f, path):
    """The items of a top-level JSON array, decoded one at a time from a sliding buffer."""
    dec = json.JSONDecoder()
    buf, pos, line, eof = "", 0, 1, False

    def fill(need_pos):     # make buf[need_pos] readable unless the file has ended
        nonlocal buf, pos, eof
        while len(buf) <= need_pos and not eof:
            more = f.read(CHUNK)
            eof = not more
            buf += more

    def skip_ws():
        nonlocal pos, line
        while True:
            fill(pos)
            if pos >= len(buf):
                return
            c = buf[pos]
            if c not in " \t\r\n":
                return
            line += c == "\n"
            pos += 1

    def fail(msg, at_line=None):
        raise CugeError(f"{path}:{at_line or line}: {msg}; the file must be a JSON array of records "
                        "(or JSON lines)")

    skip_ws()
    if buf[pos:pos + 1] != "[":
        fail("expected '[' to open the JSON array")
    pos += 1
    first = True
    while True:
        skip_ws()
        if pos >= len(buf):
            fail("the JSON array is not closed (no ']' before the end of the file)")
        if buf[pos] == "]":
            pos += 1
            skip_ws()
            if pos < len(buf):
                fail(f"unexpected text after the closing ']': {buf[pos:pos + 40]!r}")
            return
        if not first:
            if buf[pos] != ",":
                fail(f"expected ',' or ']' between array items, got {buf[pos:pos + 40]!r}")
            pos += 1
            skip_ws()
        if buf[pos:pos + 1] not in ("{", "["):
            fail(f"expected a record (a JSON object or array), got {buf[pos:pos + 40]!r}")
        while True:
            try:
                rec, end = dec.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                if eof or len(buf) - pos > MAX_RECORD:
                    fail(f"not valid JSON ({e.msg})", line + buf.count("\n", pos, e.pos))
                fill(len(buf))
        yield line, rec
        line += buf.count("\n", pos, end)
        pos, first = end, False
        if pos > CHUNK:     # drop what is read, now and then (not per record: that would copy the buffer)
            buf, pos = buf[pos:], 0


# ---- field checks ------------------------------------------------------------------------------
def text(rec: dict, key: str, optional: bool = False) -> str:
    v = rec.get(key) if isinstance(rec, dict) else None
    if v is None and optional:
        return ""
    if not isinstance(v, str):
        raise Bad(key, "a string", v)
    return v


def strings(rec: dict, key: str, min_n: int = 1) -> list:
    v = rec.get(key)
    if not isinstance(v, list) or len(v) < min_n or not all(isinstance(s, str) for s in v):
        raise Bad(key, f"a list of at least {min_n} strings", v)
    return v


def index(v, n: int, key: str, optional: bool) -> int:
    if v is None and optional:
        return -1
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n:
        raise Bad(key, f"an option index 0..{n - 1}", v)
    return v


def record(rec, expected: str) -> dict:
    if not isinstance(rec, dict):
        raise Bad("<record>", expected, rec)
    return rec


def flat(v, key: str) -> str:
    """A string, or a list of strings (joined by spaces), or a list of such lists (joined by '；')."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return " ".join(v)
    if isinstance(v, list) and all(isinstance(s, list) and all(isinstance(t, str) for t in s) for s in v):
        return "；".join(" ".join(s) for s in v)
    raise Bad(key, "a string, a list of strings, or a list of lists of strings", v)


# ---- segmentation tags ------------------------------------------------------------------------
def seg_tags(words) -> list:
    """B/I/E/S per character of the words."""
    out = []
    for w in words:
        out += ["S"] if len(w) == 1 else ["B"] + ["I"] * (len(w) - 2) + ["E"]
    return out


def segpos_tags(words, pos) -> list:
    """B-POS for each word's first character, I-POS for the rest."""
    out = []
    for w, p in zip(words, pos):
        out += [f"B-{p}"] + [f"I-{p}"] * (len(w) - 1)
    return out


def words_from_tags(tokens, tags) -> list:
    """Words (with '/POS' when the tags carry one) from per-token tags: a word starts at B or S
    (or B-X, or where the POS changes), and ends after E or S; anything else continues it."""
    if len(tokens) != len(tags):
        raise CugeError(f"{len(tags)} tags for {len(tokens)} tokens: one tag per token is expected")
    words, cur, cur_pos, closed = [], "", None, True
    for tok, tag in zip(tokens, tags):
        head, _, p = str(tag).partition("-")
        starts = closed or head in ("B", "S") or (p and p != cur_pos)
        if starts and cur:
            words.append(cur if cur_pos is None else f"{cur}/{cur_pos}")
            cur = ""
        cur += tok
        cur_pos = p or None
        closed = head in ("E", "S")
    if cur:
        words.append(cur if cur_pos is None else f"{cur}/{cur_pos}")
    return words


def split_segpos(item: str, key: str = "line") -> tuple[str, str]:
    word, slash, p = item.rpartition("/")
    if not slash or not word or not p:
        raise Bad(key, "'word/POS' items separated by spaces", item)
    return word, p


def tag_row(line: str, with_pos: bool, key: str = "line") -> dict:
    """A segmented line ('词 词' or '词/n 词/v') -> input, tokens, tags, target."""
    items = line.split()
    if not items:
        raise Bad(key, "a segmented sentence (words separated by spaces)", line)
    if with_pos:
        words, pos = zip(*(split_segpos(it, key) for it in items))
        tags = segpos_tags(words, pos)
    else:
        words = items
        tags = seg_tags(words)
    sentence = "".join(words)
    return {"input": sentence, "tokens": list(sentence), "tags": tags, "target": " ".join(items)}


# ---- released formats ---------------------------------------------------------------------------
def _ccpm(rec, split, ds):
    rec = record(rec, '{"translation", "choices", "answer"}')
    options = strings(rec, "choices", 2)
    return [{"id": _id(rec.get("id")), "input": ds.template.format(translation=text(rec, "translation")),
             "options": options, "label": index(rec.get("answer"), len(options), "answer", split == "test")}]


def _c3(rec, split, ds):
    if not (isinstance(rec, list) and len(rec) >= 2 and isinstance(rec[0], list) and isinstance(rec[1], list)):
        raise Bad("<record>", "[[context, ...], [{question, choice, answer, id}, ...], doc_id]", rec)
    if not rec[0] or not all(isinstance(s, str) for s in rec[0]):
        raise Bad("[0]", "a list of context strings", rec[0])
    context, doc_id = "\n".join(rec[0]), str(rec[2]) if len(rec) > 2 else ""
    rows = []
    for k, qa in enumerate(rec[1]):
        qa = record(qa, '{"question", "choice", "answer"}')
        options = strings(qa, "choice", 2)
        answer = text(qa, "answer", optional=split == "test")
        if answer and answer not in options:
            raise Bad("answer", f"one of the choices {options}", answer)
        rows.append({"id": _id(qa.get("id"), f"{doc_id}-{k}" if doc_id else None),
                     "input": ds.template.format(question=text(qa, "question"), context=context),
                     "options": options, "label": options.index(answer) if answer else -1,
                     "meta": {"doc_id": doc_id, **qa}})
    return rows


def _gcrc(rec, split, ds):
    rec = record(rec, '{"id", "title", "passage", "question", "options", "answer"}')
    options = strings(rec, "options", 2)
    answer = text(rec, "answer", optional=split == "test").strip().upper()
    letters = "ABCDEFGH"[:len(options)]
    if answer and (len(answer) != 1 or answer not in letters):
        raise Bad("answer", f"one letter of {letters}", rec.get("answer"))
    inp = ds.template.format(question=text(rec, "question"), title=text(rec, "title", optional=True),
                             passage=text(rec, "passage"))
    return [{"id": _id(rec.get("id")), "input": inp, "options": options,
             "label": letters.index(answer) if answer else -1}]


def _doc_title(v, key):
    if isinstance(v, dict):
        return text(v, "title")
    if isinstance(v, str):
        return v
    raise Bad(key, 'a document title (a string, or {"title": ...})', v)


_RELEVANCE_KEYS = ("label", "relevance", "rel")


def _sogou(rec, split, ds):
    rec = record(rec, '{"query", "pos_doc", "neg_doc"} (train) or {"query_id", "query", "doc": [...]}')
    query = text(rec, "query")
    head = ds.template.split("{title}")[0].format(query=query)     # "查询：{query}标题：": input + title
    if split == "train":
        if "pos_doc" not in rec:
            raise Bad("pos_doc", 'a training pair {"query", "pos_doc", "neg_doc"}', rec)
        pos, neg = _doc_title(rec.get("pos_doc"), "pos_doc"), _doc_title(rec.get("neg_doc"), "neg_doc")
        return [{"id": _id(rec.get("id")), "input": head, "options": [pos, neg], "label": 0}]
    docs = rec.get("doc")
    if not isinstance(docs, list) or not docs or not all(isinstance(d, dict) for d in docs):
        raise Bad("doc", 'a list of {"sogou_id", "title"} documents (dev and test are ranked per query)', docs)
    rel_key = next((k for k in _RELEVANCE_KEYS if k in docs[0]), None)
    relevance = []
    for j, d in enumerate(docs):
        if rel_key:
            r = d.get(rel_key)
            if not isinstance(r, (int, float)) or isinstance(r, bool):
                raise Bad(f"doc[{j}].{rel_key}", "a number (every document of a query needs one)", r)
            relevance.append(float(r))
    return [{"id": _id(rec.get("query_id"), rec.get("id")), "input": head,
             "query_id": _id(rec.get("query_id"), rec.get("id")) or "",
             "options": [ds.template.format(query=query, title=text(d, "title")) for d in docs],
             "doc_ids": [_id(d.get("sogou_id"), d.get("id"), str(j)) for j, d in enumerate(docs)],
             "relevance": relevance}]


def _lcsts(rec, split, ds):
    rec = record(rec, '{"text", "summary"}')
    return [{"id": _id(rec.get("id")), "input": ds.template.format(text=text(rec, "text")),
             "target": text(rec, "summary", optional=split == "test")}]


def _kdconv(rec, split, ds):
    rec = record(rec, '{"history", "kg", "response"}')
    for key in ("history", "kg"):
        if key not in rec:
            raise Bad(key, "a string (or a list of strings)", None)
    return [{"id": _id(rec.get("id")), "input": ds.template.format(history=flat(rec["history"], "history"),
                                                                  kg=flat(rec["kg"], "kg")),
             "target": text(rec, "response", optional=split == "test")}]


def _cjk(s: str) -> int:
    return sum("\u4e00" <= c <= "\u9fff" for c in s)


def _wmt20(rec, split, ds):
    rec = record(rec, '{"index", "source", "target"}')
    a, b = text(rec, "source"), text(rec, "target", optional=split == "test")
    english, chinese = (b, a) if b and _cjk(a) > _cjk(b) else (a, b)   # see the registry's note
    return [{"id": _id(rec.get("index"), rec.get("id")), "input": ds.template.format(english=english),
             "target": chinese}]


def _math23k(rec, split, ds):
    rec = record(rec, '{"text", "equation", "ans"?}')
    equation = text(rec, "equation", optional=split == "test")
    target = equation.split("=", 1)[1].strip() if "=" in equation else equation.strip()
    answer = rec.get("ans")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise Bad("ans", "the answer as a number or a string", answer)
    try:
        if answer is not None:
            arith.value(answer)
        elif target:
            answer = arith.value(target)
    except arith.ArithError as e:
        raise Bad("ans" if answer is not None else "equation", f"an arithmetic value ({e})",
                  answer if answer is not None else equation) from None
    return [{"id": _id(rec.get("id")), "input": ds.template.format(text=text(rec, "text")),
             "target": target, "answer": "" if answer is None else _num_text(answer)}]


def _num_text(v) -> str:
    return f"{v:.10g}" if isinstance(v, float) else str(v)


def _seg(rec, split, ds):
    return [tag_row(rec, with_pos=False)]


def _segpos(rec, split, ds):
    return [tag_row(rec, with_pos=True)]


def _id(*candidates) -> str | None:
    for c in candidates:
        if c is not None and not isinstance(c, (dict, list)) and str(c) != "":
            return str(c)
    return None


@dataclass(frozen=True)
class Reader:
    files: dict                 # split -> file names looked for, in order
    parse: Callable             # (record, split, registry row) -> [row dict]
    text: bool = False          # plain text lines instead of JSON records
    is_record: Callable = lambda x: isinstance(x, dict)


def _jsonl(train=("train",), dev=("dev", "valid"), test=("test", "test_public")) -> dict:
    exts = (".jsonl", ".json")
    return {"train": tuple(n + e for n in train for e in exts), "dev": tuple(n + e for n in dev for e in exts),
            "test": tuple(n + e for n in test for e in exts)}


_SIGHAN = {"train": ("train.txt", "pku_training.utf8"), "dev": ("dev.txt",),
           "test": ("test.txt", "pku_test_gold.utf8")}

READERS = {
    "ccpm": Reader(_jsonl(dev=("valid", "dev"), test=("test_public", "test")), _ccpm),
    "c3": Reader(_jsonl(), _c3, is_record=lambda x: isinstance(x, list) and len(x) >= 2
                 and isinstance(x[0], list) and all(isinstance(s, str) for s in x[0])),
    "gcrc": Reader(_jsonl(dev=("valid", "dev")), _gcrc),
    "sogou_log": Reader(_jsonl(), _sogou),
    "lcsts": Reader(_jsonl(), _lcsts),
    "kdconv": Reader(_jsonl(), _kdconv),
    "wmt20": Reader(_jsonl(), _wmt20),
    "math23k": Reader(_jsonl(), _math23k),
    "pku_seg": Reader(_SIGHAN, _seg, text=True),
    "pku_segpos": Reader(_SIGHAN, _segpos, text=True),
}


# ---- CPM-Ant's preprocessed layout ----------------------------------------------------------------
def cpmant(kind: str, split: str, ds) -> Callable:
    """The parser of CPM-Ant's lines for rows of `kind` (data.py's docstring says the mapping)."""
    test = split == "test"

    def parse(rec):
        rec = record(rec, '{"input", "target"} or {"input", "options", "target"}')
        out = {"id": _id(rec.get("id")), "input": text(rec, "input")}
        if kind in ("choice", "rank"):
            options = strings(rec, "options", 2)
            out["options"] = options
            if kind == "choice":
                out["label"] = index(rec.get("target"), len(options), "target", test)
                return [out]
            target = rec.get("target")
            if isinstance(target, list):
                if len(target) != len(options) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                          for r in target):
                    raise Bad("target", f"a relevance number per option ({len(options)})", target)
                out["relevance"] = [float(r) for r in target]
            else:
                i = index(target, len(options), "target", test)
                out["relevance"] = [] if i < 0 else [float(j == i) for j in range(len(options))]
            doc_ids = rec.get("doc_ids") or [str(j) for j in range(len(options))]
            if not isinstance(doc_ids, list) or len(doc_ids) != len(options):
                raise Bad("doc_ids", f"a document id per option ({len(options)})", doc_ids)
            out["doc_ids"] = [str(d) for d in doc_ids]
            out["query_id"] = _id(rec.get("query_id"), rec.get("id")) or ""
            return [out]
        if "options" in rec:
            raise Bad("options", f"no options: {ds.title} lines are {{\"input\", \"target\": str}} (NLG)",
                      rec.get("options"))
        target = text(rec, "target", optional=test)
        out["target"] = target
        if kind == "math":
            out["target"] = target.split("=", 1)[1].strip() if target.lower().startswith("x=") else target
            try:
                out["answer"] = _num_text(arith.value(target)) if target else ""
            except arith.ArithError as e:
                raise Bad("target", f"an arithmetic expression ({e})", target) from None
        elif kind == "tag":
            if target:
                row = tag_row(target, with_pos="segpos_f1" in ds.metrics, key="target")   # '词/pos' items
                out.update(tokens=row["tokens"], tags=row["tags"])
            else:
                out.update(tokens=[c for c in out["input"] if not c.isspace()], tags=[])
        return [out]

    return lambda rec, split_, ds_: parse(rec)
