"""Tiny CUGE fixtures, written by the tests and the CUGE notebook (notebooks/04_cuge.ipynb)
themselves: each lite dataset (plus GCRC, PKU-SEG and PKU-SEGPOS) in its released format, and any
of the 21 in CPM-Ant's preprocessed layout. A handful of realistic Chinese rows each, with the
released field names and shapes (JSON arrays where the release is a JSON array, pretty-printed
like Math23K's), cycled to the number of rows asked for.

    root = write_lite(tmp_path)                      # released formats of the 7 lite datasets
    write_cpmant("lcsts", tmp_path / "ant")          # ant/lcsts/{train,eval,test}.jsonl
    data.load("ccpm", root, "train")
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

SIZES = {"train": 8, "dev": 4, "test": 4}

CCPM = [
    {"translation": "清晨登上高山远望，只见白云在山间缭绕。",
     "choices": ["晓登高岭望，白云绕山间", "夜泊秦淮近酒家", "孤帆远影碧空尽", "春风又绿江南岸"], "answer": 0},
    {"translation": "夜晚船停在秦淮河边，靠近岸上的酒家。",
     "choices": ["白日依山尽", "夜泊秦淮近酒家", "千里莺啼绿映红", "独在异乡为异客"], "answer": 1},
    {"translation": "一叶孤舟渐渐远去，消失在碧蓝的天边。",
     "choices": ["床前明月光", "举头望明月", "孤帆远影碧空尽", "低头思故乡"], "answer": 2},
    {"translation": "春风吹过，江南的河岸又一次变绿了。",
     "choices": ["大漠孤烟直", "长河落日圆", "停车坐爱枫林晚", "春风又绿江南岸"], "answer": 3},
]

C3 = [
    [["男：你明天几点去机场？", "女：早上八点，飞机十点起飞。"],
     [{"question": "飞机几点起飞？", "choice": ["八点", "九点", "十点", "十一点"], "answer": "十点", "id": "m1-1"}],
     "m1"],
    [["小明每天早上六点起床，先跑步半小时，然后吃早饭去上学。他觉得运动让他一整天都很有精神。"],
     [{"question": "小明每天早上先做什么？", "choice": ["吃早饭", "跑步", "上学"], "answer": "跑步", "id": "d1-1"},
      {"question": "小明觉得运动怎么样？", "choice": ["很累", "没有用", "让人有精神"], "answer": "让人有精神", "id": "d1-2"}],
     "d1"],
]

GCRC = [
    {"id": "gcrc-1", "title": "黄河", "passage": "黄河是中国第二长河，发源于青藏高原，流经九个省区，最后注入渤海。",
     "question": "下列关于黄河的说法，正确的一项是", "options": ["黄河是中国最长的河流", "黄河发源于青藏高原",
                                                    "黄河注入东海", "黄河流经五个省区"],
     "evidences": [[], [0], [], []], "reasoning_ability": ["细节"], "error_type": ["", "", "", ""], "answer": "B"},
    {"id": "gcrc-2", "title": "茶", "passage": "中国是茶的故乡，饮茶的习惯已有几千年的历史。",
     "question": "下列说法不正确的一项是", "options": ["中国是茶的故乡", "饮茶历史很长", "饮茶习惯始于近代", "茶与中国有关"],
     "evidences": [[0], [0], [0], []], "reasoning_ability": ["细节"], "error_type": ["", "", "时间错误", ""],
     "answer": "C"},
]

SOGOU_PAIRS = [
    {"query": "北京天气", "pos_doc": "北京今日天气预报：晴转多云", "neg_doc": "上海美食推荐大全"},
    {"query": "python教程", "pos_doc": "Python入门教程（适合零基础）", "neg_doc": "蛇类的生活习性"},
    {"query": "高铁票预订", "pos_doc": "12306高铁火车票网上预订", "neg_doc": "高血压的饮食注意事项"},
]
SOGOU_QUERIES = [
    {"query_id": "q1", "query": "北京天气", "doc": [
        {"sogou_id": "d11", "title": "北京今日天气预报：晴转多云", "label": 2},
        {"sogou_id": "d12", "title": "北京旅游景点推荐", "label": 0},
        {"sogou_id": "d13", "title": "北京一周天气趋势", "label": 1}]},
    {"query_id": "q2", "query": "python教程", "doc": [
        {"sogou_id": "d21", "title": "蛇类的生活习性", "label": 0},
        {"sogou_id": "d22", "title": "Python入门教程（适合零基础）", "label": 2},
        {"sogou_id": "d23", "title": "Java编程思想", "label": 0}]},
]

LCSTS = [
    {"text": "新华社北京电，国家统计局今天发布数据，今年一季度国内生产总值同比增长百分之五点三，经济运行开局良好。",
     "summary": "一季度GDP同比增长5.3%"},
    {"text": "记者从教育部获悉，今年全国普通高校毕业生预计达到一千一百七十九万人，同比增加二十一万人。",
     "summary": "今年高校毕业生预计1179万人"},
    {"text": "受冷空气影响，未来三天我国北方大部地区将出现大风降温天气，局地降温幅度可达十度以上。",
     "summary": "北方将迎大风降温天气"},
]

KDCONV = [
    {"history": "你看过《霸王别姬》吗？", "kg": "霸王别姬 导演 陈凯歌；霸王别姬 主演 张国荣",
     "response": "看过，是陈凯歌导演的，张国荣演得特别好。"},
    {"history": "你喜欢周杰伦的歌吗？ 挺喜欢的，你呢？", "kg": "周杰伦 代表作品 七里香；七里香 发行时间 2004年",
     "response": "我也喜欢，尤其是2004年发行的《七里香》。"},
    {"history": "故宫在哪里？", "kg": "故宫 所在城市 北京；故宫 建成时间 1420年",
     "response": "故宫在北京，1420年就建成了。"},
]

WMT20 = [   # as CPM-2-Finetune's files: "source" and "target" (which side is English is not fixed)
    {"index": 0, "source": "The weather is nice today.", "target": "今天天气很好。"},
    {"index": 1, "source": "我们明天去图书馆吧。", "target": "Let's go to the library tomorrow."},
    {"index": 2, "source": "Machine translation has improved a lot.", "target": "机器翻译已经进步了很多。"},
]

MATH23K = [
    {"id": "1", "text": "小明有12个苹果，吃了3个，又买了5个，现在有多少个苹果？", "equation": "x=12-3+5", "ans": "14"},
    {"id": "2", "text": "一本书有200页，已经看了40%，还剩多少页没看？", "equation": "x=200*(1-40%)", "ans": "120"},
    {"id": "3", "text": "一个正方形的边长是3厘米，它的面积是多少平方厘米？", "equation": "x=3^2", "ans": "9"},
    {"id": "4", "text": "一桶油重10千克，用去了1/4，还剩多少千克？", "equation": "x=10*(1-1/4)", "ans": "7.5"},
]

PKU = [   # People's Daily style, PKU segmentation; POS tags of the 1998 corpus
    "迈向/v 充满/v 希望/n 的/u 新/a 世纪/n",
    "中国/ns 人民/n 将/d 满怀/v 信心/n 地/u 开创/v 新/a 的/u 业绩/n",
    "今天/t 是/v 一九九八年/t 的/u 第一/m 天/q",
    "北京/ns 的/u 冬天/t 很/d 冷/a",
]


def _cycle(pool, n):
    return list(itertools.islice(itertools.cycle(pool), n))


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _json_array(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _text(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _seg_only(line: str) -> str:
    return "  ".join(item.rsplit("/", 1)[0] for item in line.split())   # SIGHAN files use two spaces


def _unlabelled(rows, drop):
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def write_released(name: str, root, sizes: dict | None = None) -> Path:
    """DIR/<name>/ in the released format of `name` (train/dev/test); returns DIR (= root)."""
    root, sizes = Path(root), {**SIZES, **(sizes or {})}
    d = root / name
    n = sizes
    if name == "ccpm":
        _jsonl(d / "train.jsonl", _cycle(CCPM, n["train"]))
        _jsonl(d / "valid.jsonl", _cycle(CCPM, n["dev"]))
        _jsonl(d / "test_public.jsonl", _cycle(CCPM, n["test"]))
    elif name == "c3":
        _json_array(d / "train.json", _cycle(C3, n["train"]))
        _json_array(d / "dev.json", _cycle(C3, n["dev"]))
        _json_array(d / "test.json", [[c, [{k: v for k, v in q.items() if k != "answer"} for q in qs], i]
                                      for c, qs, i in _cycle(C3, n["test"])])
    elif name == "gcrc":
        _json_array(d / "train.json", _cycle(GCRC, n["train"]))
        _json_array(d / "valid.json", _cycle(GCRC, n["dev"]))
        _json_array(d / "test.json", _unlabelled(_cycle(GCRC, n["test"]), {"answer", "evidences", "error_type"}))
    elif name == "sogou_log":
        _jsonl(d / "train.jsonl", _cycle(SOGOU_PAIRS, n["train"]))
        _jsonl(d / "dev.jsonl", _cycle(SOGOU_QUERIES, n["dev"]))
        _jsonl(d / "test.jsonl", [{**q, "doc": [{k: v for k, v in doc.items() if k != "label"} for doc in q["doc"]]}
                                  for q in _cycle(SOGOU_QUERIES, n["test"])])
    elif name == "lcsts":
        for split, fname in (("train", "train.jsonl"), ("dev", "dev.jsonl"), ("test", "test.jsonl")):
            _jsonl(d / fname, _cycle(LCSTS, n[split]))
    elif name == "kdconv":
        for split, fname in (("train", "train.jsonl"), ("dev", "dev.jsonl"), ("test", "test.jsonl")):
            _jsonl(d / fname, _cycle(KDCONV, n[split]))
    elif name == "wmt20_enzh":
        for split in ("train", "dev", "test"):
            _json_array(d / f"{split}.json", [{**r, "index": i} for i, r in enumerate(_cycle(WMT20, n[split]))])
    elif name == "math23k":
        for split in ("train", "dev", "test"):
            _json_array(d / f"{split}.json", [{**r, "id": str(i)} for i, r in enumerate(_cycle(MATH23K, n[split]))])
    elif name in ("pku_seg", "pku_segpos", "wordseg_weibo"):
        fix = (lambda s: s) if name == "pku_segpos" else _seg_only
        for split in ("train", "dev", "test"):
            _text(d / f"{split}.txt", [fix(s) for s in _cycle(PKU, n[split])])
    else:
        raise ValueError(f"no released-format fixture for {name!r}")
    return root


LITE = ("ccpm", "c3", "sogou_log", "lcsts", "kdconv", "wmt20_enzh", "math23k")


def write_lite(root, sizes: dict | None = None) -> Path:
    """The 7 lite datasets in their released formats under DIR = root."""
    for name in LITE:
        write_released(name, root, sizes)
    return Path(root)


def _cpmant_lines(name: str, n: int, split: str) -> list:
    """CPM-Ant's lines for `name`: NLU {"input", "options", "target": int} for choice/rank kinds,
    NLG {"input", "target": str} otherwise; generic Chinese content shaped like each task."""
    from benchmarks.cuge.registry import get
    ds = get(name)
    kind = ds.kind_of(split)
    if kind == "choice":
        pool = [{"input": f"{r['translation']}", "options": r["choices"], "target": r["answer"]} for r in CCPM]
        if name in ("spr", "finre"):
            pool = [{"input": "甲：你怎么又迟到了？乙：我在等明天。", "options": ["不幽默", "幽默"], "target": 1},
                    {"input": "今天会议改到下午三点。", "options": ["不幽默", "幽默"], "target": 0}]
        if name == "sogou_log":
            pool = [{"input": f"查询：{r['query']}标题：", "options": [r["pos_doc"], r["neg_doc"]], "target": 0}
                    for r in SOGOU_PAIRS]
    elif kind == "rank":
        pool = [{"input": f"查询：{q['query']}", "query_id": q["query_id"],
                 "options": [f"查询：{q['query']}标题：{d['title']}" for d in q["doc"]],
                 "doc_ids": [d["sogou_id"] for d in q["doc"]], "target": [d["label"] for d in q["doc"]]}
                for q in SOGOU_QUERIES]
    elif kind == "math":
        pool = [{"input": r["text"], "target": r["equation"]} for r in MATH23K]
    elif kind == "tag":
        keep_pos = "segpos_f1" in ds.metrics
        pool = [{"input": "分词：" + "".join(i.rsplit("/", 1)[0] for i in s.split()),
                 "target": s if keep_pos else " ".join(i.rsplit("/", 1)[0] for i in s.split())} for s in PKU]
    elif name == "kdconv":
        pool = [{"input": f"历史：{r['history']} 图谱：{r['kg']}", "target": r["response"]} for r in KDCONV]
    else:
        pool = [{"input": r["text"], "target": r["summary"]} for r in LCSTS]
    return _cycle(pool, n)


def write_cpmant(name: str, root, sizes: dict | None = None) -> Path:
    """DIR/<name>/{train,eval,test}.jsonl in CPM-Ant's layout; returns DIR (= root)."""
    root, sizes = Path(root), {**SIZES, **(sizes or {})}
    for split, fname in (("train", "train.jsonl"), ("dev", "eval.jsonl"), ("test", "test.jsonl")):
        _jsonl(root / name / fname, _cpmant_lines(name, sizes[split], split))
    return root
