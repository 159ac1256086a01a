"""CUGE data: the registry, every released reader and CPM-Ant's layout on fixtures the tests write,
layout detection, path:line errors for malformed files, max_n, memory-mapped loading of a large
file, the JSON-array stream, submission files, and the People's Daily PKU-SEG split."""
import json
import tracemalloc

import pytest

from benchmarks.cuge import fixtures as fx
from benchmarks.cuge import data, formats, pku, registry, submit
from benchmarks.cuge.errors import CugeError
from deltakit.errors import DeltakitError


# ---- registry ------------------------------------------------------------------------------------
def test_registry_has_the_21_datasets_of_cuge_v2():
    assert len(registry.DATASETS) == 21
    assert registry.LITE == ("ccpm", "c3", "sogou_log", "lcsts", "kdconv", "wmt20_enzh", "math23k")
    assert {registry.get(n).capability for n in registry.LITE} == set(registry.CAPABILITIES)
    per_cap = {}
    for d in registry.DATASETS.values():
        per_cap[d.capability] = per_cap.get(d.capability, 0) + 1
    assert per_cap == {"NLU-WSL": 7, "NLU-DL": 4, "IA&QA": 3, "NLG": 3, "CI": 1, "ML": 2, "MR": 1}
    assert [registry.get(n).mt5_small for n in registry.LITE] == [87.70, 41.50, 29.20, 33.10, 8.76, 9.10, 18.40]
    assert all(d.mt5_small is None for d in registry.DATASETS.values() if not d.lite)
    assert not registry.get("wmt20_enzh").confirmed and registry.get("ccpm").confirmed
    assert registry.get("Sogou-Log").kind_of("train") == "choice" and registry.get("sogou_log").kind_of("test") == "rank"
    for d in registry.DATASETS.values():
        assert d.released is None or d.released in formats.READERS


def test_unknown_dataset_names_the_nearest():
    with pytest.raises(CugeError, match="Did you mean: lcsts") as e:
        registry.get("lcst")
    assert isinstance(e.value, DeltakitError) and "the lite set" in str(e.value)


# ---- released formats ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    fx.write_lite(root)
    for name in ("gcrc", "pku_seg", "pku_segpos"):
        fx.write_released(name, root)
    return root


def _row(root, name, split, i=0):
    row = data.load(name, root, split)[i]
    return {k: v for k, v in row.items() if k != "meta"}


def test_ccpm_released(released):
    assert data.find("ccpm", released, "dev") == (released / "ccpm" / "valid.jsonl", "released")
    assert data.find("ccpm", released, "test")[0].name == "test_public.jsonl"
    assert _row(released, "ccpm", "train", 1) == {
        "id": "train:2", "input": fx.CCPM[1]["translation"], "options": fx.CCPM[1]["choices"], "label": 1}
    ds = data.load("ccpm", released, "train")
    assert len(ds) == 8 and ds[0]["meta"] == ""       # train rows are never submitted
    assert json.loads(data.load("ccpm", released, "test")[0]["meta"]) == fx.CCPM[0]


def test_c3_json_array_gives_one_row_per_question(released):
    ds = data.load("c3", released, "train")
    assert len(ds) == 12     # 8 documents cycled from 2, holding 1 and 2 questions
    r = ds[1]
    assert r["id"] == "d1-1" and r["options"] == ["吃早饭", "跑步", "上学"] and r["label"] == 1
    assert r["input"].startswith("问题：小明每天早上先做什么？ 文章：小明每天早上六点起床")
    first = ds[0]
    assert "男：你明天几点去机场？\n女：早上八点" in first["input"]     # every dialogue turn, not only the first
    assert [r["label"] for r in data.load("c3", released, "test")] == [-1] * 6


def test_gcrc_sogou_lcsts_kdconv(released):
    g = _row(released, "gcrc", "train")
    assert g["label"] == 1 and g["id"] == "gcrc-1" and g["input"].startswith("问题：下列关于黄河的说法")
    assert _row(released, "gcrc", "test")["label"] == -1

    s = _row(released, "sogou_log", "train")
    assert s == {"id": "train:1", "input": "查询：北京天气标题：", "options": ["北京今日天气预报：晴转多云", "上海美食推荐大全"],
                 "label": 0}
    q = _row(released, "sogou_log", "dev")
    assert q["query_id"] == "q1" and q["doc_ids"] == ["d11", "d12", "d13"] and q["relevance"] == [2.0, 0.0, 1.0]
    assert q["options"][1] == "查询：北京天气标题：北京旅游景点推荐"
    assert _row(released, "sogou_log", "test")["relevance"] == []

    assert _row(released, "lcsts", "dev") == {"id": "dev:1", "input": fx.LCSTS[0]["text"], "target": fx.LCSTS[0]["summary"]}
    k = _row(released, "kdconv", "train")
    assert k["input"] == "历史：你看过《霸王别姬》吗？ 图谱：霸王别姬 导演 陈凯歌；霸王别姬 主演 张国荣"
    assert k["target"].startswith("看过")


def test_wmt20_takes_the_english_side_as_input_whichever_field_holds_it(released):
    ds = data.load("wmt20_enzh", released, "train")
    assert ds[0]["input"] == "The weather is nice today." and ds[0]["target"] == "今天天气很好。"
    assert ds[1]["input"] == "Let's go to the library tomorrow." and ds[1]["target"] == "我们明天去图书馆吧。"
    assert ds[1]["id"] == "1"


def test_math23k_target_without_x_and_the_answer(released, tmp_path):
    ds = data.load("math23k", released, "train")
    assert [(r["target"], r["answer"]) for r in ds][:4] == [("12-3+5", "14"), ("200*(1-40%)", "120"), ("3^2", "9"),
                                                             ("10*(1-1/4)", "7.5")]
    d = tmp_path / "math23k"
    d.mkdir()
    (d / "train.json").write_text(json.dumps([{"text": "一共多少？", "equation": "x=3(1/2)+20%"}]), encoding="utf-8")
    assert data.load("math23k", tmp_path, "train")[0]["answer"] == "3.7"      # computed when "ans" is absent


def test_pku_seg_and_segpos_text_lines(released):
    r = _row(released, "pku_seg", "train")
    assert r["input"] == "迈向充满希望的新世纪" and r["target"] == "迈向 充满 希望 的 新 世纪"
    assert r["tags"] == ["B", "E", "B", "E", "B", "E", "S", "S", "B", "E"] and r["tokens"] == list(r["input"])
    p = _row(released, "pku_segpos", "train", 2)
    assert p["target"] == "今天/t 是/v 一九九八年/t 的/u 第一/m 天/q"
    assert p["tags"][:4] == ["B-t", "I-t", "B-v", "B-t"]
    assert formats.words_from_tags(p["tokens"], p["tags"]) == p["target"].split()
    assert formats.words_from_tags(r["tokens"], r["tags"]) == r["target"].split()


# ---- CPM-Ant's layout -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(registry.DATASETS))
def test_every_dataset_loads_from_cpmants_layout(name, tmp_path):
    fx.write_cpmant(name, tmp_path)
    ds = registry.get(name)
    for split in registry.SPLITS:
        path, layout = data.find(name, tmp_path, split)
        assert layout == "cpmant" and path.name == data.CPMANT_FILES[split]
        rows = data.load(name, tmp_path, split)
        assert len(rows) == fx.SIZES[split]
        assert tuple(rows.column_names) == data.columns(ds.kind_of(split))
        r = rows[0]
        assert r["input"] and r["id"] == f"{split}:1"
        assert r["meta"] == "" if split == "train" else json.loads(r["meta"])["input"] == r["input"]
        kind = ds.kind_of(split)
        if kind == "choice":
            assert len(r["options"]) >= 2 and 0 <= r["label"] < len(r["options"])
        elif kind == "rank":
            assert len(r["relevance"]) == len(r["options"]) == len(r["doc_ids"])
        elif kind == "tag":
            assert formats.words_from_tags(r["tokens"], r["tags"]) == r["target"].split()
        else:
            assert r["target"]
        if kind == "math":
            assert r["answer"] == "14" and r["target"] == "12-3+5"


def test_cpmant_test_lines_may_leave_out_the_target(tmp_path):
    d = tmp_path / "c3"
    d.mkdir()
    (d / "test.jsonl").write_text(json.dumps({"input": "问题：？", "options": ["甲", "乙"]}) + "\n", encoding="utf-8")
    assert data.load("c3", tmp_path, "test")[0]["label"] == -1
    (d / "train.jsonl").write_text(json.dumps({"input": "问题：？", "options": ["甲", "乙"]}) + "\n", encoding="utf-8")
    with pytest.raises(CugeError, match=r"train\.jsonl:1: field 'target': expected an option index 0\.\.1"):
        data.load("c3", tmp_path, "train")


# ---- layout detection ---------------------------------------------------------------------------------
def test_same_file_name_two_layouts_told_apart_by_the_first_record(tmp_path):
    fx.write_released("lcsts", tmp_path / "a")          # a/lcsts/train.jsonl: {"text", "summary"}
    fx.write_cpmant("lcsts", tmp_path / "b")            # b/lcsts/train.jsonl: {"input", "target"}
    assert data.find("lcsts", tmp_path / "a", "train")[1] == "released"
    assert data.find("lcsts", tmp_path / "b", "train")[1] == "cpmant"
    assert data.find("lcsts", tmp_path / "b", "dev")[0].name == "eval.jsonl"


def test_data_dir_may_be_the_dataset_folder_itself(released):
    assert data.find("ccpm", released / "ccpm", "train") == (released / "ccpm" / "train.jsonl", "released")
    assert len(data.load("ccpm", released / "ccpm", "dev")) == 4


def test_missing_files_list_every_path_looked_for(tmp_path):
    (tmp_path / "ccpm").mkdir()
    with pytest.raises(CugeError) as e:
        data.find("ccpm", tmp_path, "dev")
    msg = str(e.value)
    for name in ("eval.jsonl", "valid.jsonl", "dev.jsonl", "dev.json"):
        assert str(tmp_path / "ccpm" / name) in msg
    assert "CPM-Ant's layout" in msg
    with pytest.raises(CugeError, match="no released format is known for CMeEE"):
        data.find("cmeee", tmp_path, "train")
    with pytest.raises(CugeError, match="is not a folder"):
        data.find("ccpm", tmp_path / "nope", "train")
    with pytest.raises(CugeError, match="unknown split 'valid'"):
        data.find("ccpm", tmp_path, "valid")


def test_a_dataset_without_a_released_format_refuses_other_records(tmp_path):
    d = tmp_path / "cmeee"
    d.mkdir()
    (d / "train.jsonl").write_text(json.dumps({"text": "患者发热三天"}) + "\n", encoding="utf-8")
    with pytest.raises(CugeError, match="has no known released format"):
        data.load("cmeee", tmp_path, "train")


# ---- malformed files ------------------------------------------------------------------------------------
def _lines(path, objs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o, ensure_ascii=False)) + "\n" for o in objs),
                    encoding="utf-8")
    return path


GOOD = {"text": "正文", "summary": "摘要"}


@pytest.mark.parametrize("bad, line, what", [
    ('{"text": "正文", "summary": ', 3, r"not valid JSON"),
    ({"text": "正文"}, 3, r"field 'summary': expected a string, got nothing"),
    ({"text": 5, "summary": "摘要"}, 3, r"field 'text': expected a string, got 5"),
    ('["a list"]', 3, r"field '<record>': expected \{\"text\", \"summary\"\}"),
])
def test_malformed_jsonl_names_path_line_and_field(tmp_path, bad, line, what):
    path = _lines(tmp_path / "lcsts" / "train.jsonl", [GOOD, "", bad, GOOD])   # line 2 blank: line numbers count it
    with pytest.raises(CugeError, match=what) as e:
        data.load("lcsts", tmp_path, "train")
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_malformed_last_line_fails_the_load_every_time(tmp_path):
    _lines(tmp_path / "lcsts" / "train.jsonl", [GOOD] * 50 + [{"text": "正文", "summary": ["不是字符串"]}])
    for _ in range(2):      # no half-built cache is served the second time
        with pytest.raises(CugeError, match=r"train\.jsonl:51: field 'summary'"):
            data.load("lcsts", tmp_path, "train")


def test_malformed_json_array_names_the_record_line(tmp_path):
    recs = [{"text": "一共多少？", "equation": "x=1+2", "ans": "3"}] * 3
    path = tmp_path / "math23k" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(recs[:2] + [{"text": "一共多少？", "equation": "x=1+"}], indent=2), encoding="utf-8")
    with pytest.raises(CugeError, match=r"train\.json:12: field 'equation': expected an arithmetic value") as e:
        data.load("math23k", tmp_path, "train")
    assert "x=1+" in str(e.value)
    text = json.dumps(recs, indent=2)
    path.write_text(text.replace('"ans": "3"\n  },\n  {', '"ans": "3"\n  }\n  {', 1), encoding="utf-8")
    with pytest.raises(CugeError, match=r"train\.json:7: expected ',' or '\]' between array items"):
        data.load("math23k", tmp_path, "train")
    path.write_text(text[:-2], encoding="utf-8")
    with pytest.raises(CugeError, match=r"train\.json:1[67]: .*(not closed|not valid JSON)"):
        data.load("math23k", tmp_path, "train")
    path.write_text(text.replace('"ans": "3"', '"ans": "3",', 1), encoding="utf-8")
    with pytest.raises(CugeError, match=r"train\.json:6: not valid JSON"):
        data.load("math23k", tmp_path, "train")


def test_released_field_values_are_checked(tmp_path):
    base = {"translation": "译文", "choices": ["甲", "乙", "丙", "丁"], "answer": 1}
    for bad, msg in (({**base, "answer": 4}, r"field 'answer': expected an option index 0\.\.3, got 4"),
                     ({**base, "choices": "甲乙"}, r"field 'choices': expected a list of at least 2 strings")):
        _lines(tmp_path / "ccpm" / "train.jsonl", [base, bad])
        with pytest.raises(CugeError, match=r"train\.jsonl:2: " + msg):
            data.load("ccpm", tmp_path, "train")
    _lines(tmp_path / "c3" / "train.jsonl", [[["文章"], [{"question": "问？", "choice": ["甲", "乙"], "answer": "丙"}], "x"]])
    with pytest.raises(CugeError, match=r"field 'answer': expected one of the choices"):
        data.load("c3", tmp_path, "train")
    _lines(tmp_path / "pku_segpos" / "train.txt", ["迈向/v 充满/v", "希望 的/u"])
    with pytest.raises(CugeError, match=r"train\.txt:2: field 'line': expected 'word/POS' items"):
        data.load("pku_segpos", tmp_path, "train")
    _lines(tmp_path / "sogou_log" / "dev.jsonl", [{"query_id": "q", "query": "查", "doc": [
        {"sogou_id": "a", "title": "甲", "label": 1}, {"sogou_id": "b", "title": "乙"}]}])
    with pytest.raises(CugeError, match=r"dev\.jsonl:1: field 'doc\[1\]\.label': expected a number"):
        data.load("sogou_log", tmp_path, "dev")


def test_json_array_stream_is_the_same_at_any_chunk_size(released, monkeypatch):
    files = [released / "c3" / "train.json", released / "math23k" / "train.json", released / "wmt20_enzh" / "dev.json"]
    reader = formats.READERS["c3"]
    whole = [list(formats.records(f, is_record=reader.is_record)) for f in files]
    for f, recs in zip(files, whole):
        assert [r for _, r in recs] == json.loads(f.read_text(encoding="utf-8"))
        lines = f.read_text(encoding="utf-8").split("\n")
        assert all(lines[ln - 1].strip() in ("{", "[") for ln, _ in recs)      # each item's first line
    for size in (1, 7, 64):
        monkeypatch.setattr(formats, "CHUNK", size)
        assert [list(formats.records(f, is_record=reader.is_record)) for f in files] == whole


# ---- max_n, caching, memory ------------------------------------------------------------------------------
def test_max_n_and_the_cache_follows_the_file(tmp_path):
    path = _lines(tmp_path / "lcsts" / "train.jsonl", [{"text": f"正文{i}", "summary": f"摘要{i}"} for i in range(30)])
    assert len(data.load("lcsts", tmp_path, "train", max_n=5)) == 5
    assert data.load("lcsts", tmp_path, "train", max_n=5)["target"] == [f"摘要{i}" for i in range(5)]
    assert len(data.load("lcsts", tmp_path, "train")) == 30
    _lines(path, [{"text": "新的正文", "summary": "新的摘要"}] * 3)       # changed file: not the cached rows
    assert data.load("lcsts", tmp_path, "train")["target"] == ["新的摘要"] * 3
    with pytest.raises(CugeError, match="max_n must be a positive"):
        data.load("lcsts", tmp_path, "train", max_n=0)
    (tmp_path / "lcsts" / "dev.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(CugeError, match="no examples in the dev split of LCSTS"):
        data.load("lcsts", tmp_path, "dev")


def test_a_large_jsonl_is_memory_mapped_not_read_into_lists(tmp_path):
    n, body = 30000, "国家统计局今天发布数据经济运行开局良好" * 20          # 400 characters a line: ~36 MB
    path = tmp_path / "lcsts" / "train.jsonl"
    path.parent.mkdir()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{i}{body}", "summary": f"摘要{i}"}, ensure_ascii=False) + "\n")
    size = path.stat().st_size
    cache = tmp_path / "cache"
    fx.write_released("lcsts", tmp_path / "warm")
    data.load("lcsts", tmp_path / "warm", "train")      # imports (datasets, pyarrow) are not what is measured
    tracemalloc.start()
    try:
        ds = data.load("lcsts", tmp_path, "train", cache_dir=cache)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ds) == n and ds[n - 1]["target"] == f"摘要{n - 1}"
    assert ds.cache_files and all(str(cache) in c["filename"] for c in ds.cache_files)
    assert peak < size / 4, f"Python objects peaked at {peak / 1e6:.0f} MB for a {size / 1e6:.0f} MB file"


# ---- submission files ----------------------------------------------------------------------------------------
def test_submission_files(released, tmp_path):
    ccpm = data.load("ccpm", released, "test")
    path = submit.write("ccpm", ccpm, [3, 2, 1, 0], tmp_path)
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    assert path.name == "ccpm_predict.jsonl" and [x["answer"] for x in lines] == [3, 2, 1, 0]
    assert lines[0]["translation"] == fx.CCPM[0]["translation"] and lines[0]["choices"] == fx.CCPM[0]["choices"]

    gcrc = data.load("gcrc", released, "test")
    recs = json.loads(submit.write("gcrc", gcrc, [1, 2, 0, 3], tmp_path).read_text(encoding="utf-8"))
    assert [r["answer"] for r in recs] == ["B", "C", "A", "D"] and recs[0]["passage"] == fx.GCRC[0]["passage"]
    assert set(recs[0]) == set(fx.GCRC[0]) - {"evidences", "error_type"}      # the test file's fields + answer

    sogou = data.load("sogou_log", released, "test")
    out = submit.write("sogou_log", sogou, [[0.1, 0.9, 0.5]] * 4, tmp_path).read_text(encoding="utf-8")
    assert json.loads(out.splitlines()[0])["ranking"] == ["d12", "d13", "d11"]

    seg = data.load("pku_seg", released, "test")
    text = submit.write("pku_seg", seg, [r["tags"] for r in seg], tmp_path).read_text(encoding="utf-8")
    assert text.splitlines() == [r["target"] for r in seg]

    lcsts = data.load("lcsts", released, "test")
    out = submit.write("lcsts", lcsts, ["摘要"] * 4, tmp_path)
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[0]) == {"id": "test:1", "prediction": "摘要"}
    math = data.load("math23k", released, "test")
    obj = json.loads(submit.write("math23k", math, ["1+2"] * 4, tmp_path).read_text(encoding="utf-8").splitlines()[0])
    assert obj == {"id": "0", "prediction": "1+2", "answer": 3.0}

    with pytest.raises(CugeError, match="3 predictions for 4"):
        submit.write("lcsts", lcsts, ["a"] * 3, tmp_path)
    with pytest.raises(CugeError, match="expected an option index 0..3"):
        submit.write("ccpm", ccpm, [4, 0, 0, 0], tmp_path)


# ---- PKU-SEG from People's Daily ------------------------------------------------------------------------------
def test_people_daily_split_is_fixed_and_loads(tmp_path):
    m1 = pku.build_split(tmp_path / "a", n_paragraphs=60)
    m2 = pku.build_split(tmp_path / "b", n_paragraphs=60)
    assert m1["sizes"] == m2["sizes"] and m1["paragraphs_used"] == 60
    assert {s: m1["sizes"][s]["paragraphs"] for s in ("train", "dev", "test")} == {"train": 48, "dev": 6, "test": 6}
    for split in ("train", "dev", "test"):
        a = (tmp_path / "a" / "pku_seg" / f"{split}.txt").read_text(encoding="utf-8")
        assert a == (tmp_path / "b" / "pku_seg" / f"{split}.txt").read_text(encoding="utf-8")
    seg = data.load("pku_seg", tmp_path / "a", "test")
    pos = data.load("pku_segpos", tmp_path / "a", "test")
    assert len(seg) == len(pos) == m1["sizes"]["test"]["sentences"]
    assert seg["input"] == pos["input"]
    assert [[w.rpartition("/")[0] for w in t.split()] for t in pos["target"]] == [t.split() for t in seg["target"]]
    ends = [t.split()[-1] for t in seg["target"]]
    assert sum(e[-1] in "。！？”’）" for e in ends) >= len(ends) // 2      # mostly whole sentences
    train = set(data.load("pku_seg", tmp_path / "a", "train")["input"])
    assert len(train & set(seg["input"])) <= 2       # different paragraphs (a few stock lines repeat)


def test_sentences_are_cut_after_the_closing_quote():
    para = [("他", "r"), ("说", "v"), ("：", "w"), ("“", "w"), ("好", "a"), ("。", "w"), ("”", "w"), ("走", "v"), ("！", "w")]
    assert [[w for w, _ in s] for s in pku.sentences(para)] == [["他", "说", "：", "“", "好", "。", "”"], ["走", "！"]]


def test_jieba_baseline_and_its_scores(tmp_path):
    assert pku.jieba_baseline(["我爱北京天安门"]) == ["我 爱 北京 天安门"]
    tagged = pku.jieba_baseline(["我爱北京天安门"], pos=True)[0].split()
    assert [t.rpartition("/")[0] for t in tagged] == ["我", "爱", "北京", "天安门"] and tagged[2] == "北京/ns"
    pku.build_split(tmp_path, n_paragraphs=40)
    scores = pku.baseline_scores(tmp_path)
    assert 50 < scores["pku_seg"]["seg_f1"] < 100 and 20 < scores["pku_segpos"]["segpos_f1"] < scores["pku_segpos"]["seg_f1"]
    from benchmarks.cuge import score
    runs = score.read_runs(pku.write_baseline_runs(tmp_path, tmp_path / "runs"))   # as run.py writes them
    assert {(r["model"], r["dataset"]) for r in runs} == {("jieba", "pku_seg"), ("jieba", "pku_segpos")}
    assert runs[0]["scores"] == scores[runs[0]["dataset"]]
