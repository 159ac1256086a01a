"""CUGE metrics on hand-computed examples; BLEU and ROUGE also against the libraries' own numbers;
the safe arithmetic evaluator; `metrics.score` on every lite dataset's fixture rows."""
import math

import pytest

from benchmarks.cuge import fixtures as fx
from benchmarks.cuge import arith, data, metrics
from benchmarks.cuge.errors import CugeError


def test_accuracy_and_macro_f1_by_hand():
    assert metrics.accuracy([0, 1, 2, 3], [0, 1, 0, 3]) == 75.0
    # class 0: P 1/2, R 1 -> F 2/3; class 1: P 1, R 2/3 -> F 4/5; mean 11/15
    assert metrics.f1_macro([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx(100 * 11 / 15)


def test_bleu_matches_sacrebleus_documented_example():
    # sacrebleu's README: BLEU = 48.53 for these three sentences against two reference streams
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert metrics.bleu(hyps, [list(r) for r in zip(*refs)]) == pytest.approx(48.530827, abs=1e-4)


def test_bleu_tokenises_chinese_by_character():
    # characters: 1-grams 4/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3, same length (BP 1)
    expected = 100 * (4 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu(["今天天气很好"], ["今天天气不错"]) == pytest.approx(expected, abs=1e-6)
    assert metrics.bleu(["今天天气很好。"], ["今天天气很好。"]) == pytest.approx(100.0)


def test_character_rouge_by_hand_and_as_rouge_score_counts_tokens():
    r = metrics.rouge(["今天天气很好"], ["今天天气不错"])
    assert r["rouge_1"] == pytest.approx(100 * 4 / 6)      # 今 天 天 气 shared of 6 each
    assert r["rouge_2"] == pytest.approx(100 * 3 / 5)      # 今天 天天 天气 of 5 each
    assert r["rouge_l"] == pytest.approx(100 * 4 / 6)      # LCS 今天天气
    # rouge-score's own tokenizer on the same sequences spelled as ASCII tokens gives the same numbers
    from rouge_score import rouge_scorer
    spell = lambda s: " ".join(f"c{ord(c)}" for c in s)   # noqa: E731
    pairs = [("国家统计局发布数据", "统计局今天发布了数据"), ("北方将迎大风降温", "北方大部地区将出现大风降温天气")]
    ref_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    ours = metrics.rouge([h for h, _ in pairs], [g for _, g in pairs])
    theirs = [ref_scorer.score(spell(g), spell(h)) for h, g in pairs]
    for mine, key in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
        assert ours[mine] == pytest.approx(100 * sum(t[key].fmeasure for t in theirs) / 2)
    # rouge-score's README example (English words): P 6/8, R 6/9
    s = ref_scorer.score("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log.")
    assert s["rouge1"].fmeasure == pytest.approx(2 * (6 / 8) * (6 / 9) / (6 / 8 + 6 / 9))


def test_distinct_n():
    # 4-grams: 今天天气 twice, 天天气很 天气很好 天天气不 天气不错: 5 distinct of 6
    assert metrics.distinct(["今天天气很好", "今天天气不错"], 4) == pytest.approx(100 * 5 / 6)
    assert metrics.distinct(["好"], 4) == 0.0


def test_ndcg_and_mrr_by_hand():
    # ranked: doc1 (rel 0), doc2 (rel 1), doc0 (rel 2); linear gains as scikit-learn
    dcg = 0 / math.log2(2) + 1 / math.log2(3) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert metrics.ndcg([[0.1, 0.9, 0.5]], [[2, 0, 1]], 10) == pytest.approx(100 * dcg / idcg)
    assert metrics.ndcg([[0.9, 0.1, 0.5]], [[2, 0, 1]], 10) == pytest.approx(100.0)
    assert metrics.ndcg([[0.1, 0.9, 0.5]], [[2, 0, 1]], 1) == 0.0
    assert metrics.mrr([[0.1, 0.9, 0.5], [0.3, 0.2]], [[2, 0, 1], [0, 0]]) == pytest.approx(100 * (1 / 2 + 0) / 2)
    with pytest.raises(CugeError, match="one score per document"):
        metrics.ndcg([[0.1]], [[1, 0]], 10)


def test_safe_arithmetic():
    assert arith.value("x=(11-1)*2") == 20
    assert arith.value("3(1/2)") == 3.5 and arith.value("200*(1-40%)") == 120
    assert arith.value("2^3") == 8 and arith.value("（1＋2）×3÷2") == 4.5 and arith.value(7) == 7
    assert arith.value("1+2=3") == 3     # a prediction written as an equation: its left side
    for bad in ("__import__('os').system('true')", "a+1", "[1,2]", "2**99999", "1/0", "9^9^9", "", "lambda: 1",
                "(" * 500 + "1" + ")" * 500):
        with pytest.raises(arith.ArithError):
            arith.value(bad)


def test_math_accuracy_by_value():
    preds = ["12-3+5", "x=14", "14.0000001", "13", "__import__('os')"]
    assert metrics.math_accuracy(preds, ["14"] * 5) == pytest.approx(60.0)
    assert metrics.math_accuracy(["1/3"], ["0.333333"]) == 100.0


def test_segmentation_f1_by_span():
    # gold 6 words, predicted 6 words, 3 of them (充满, 希望, 的) at the same span
    assert metrics.seg_f1(["迈 向 充满 希望 的 新世纪"], ["迈向 充满 希望 的 新 世纪"]) == pytest.approx(50.0)
    # same words at other positions do not count: the 的 here starts at 2, in gold at 4
    assert metrics.seg_f1(["新 的"], ["新 的"]) == 100.0
    assert metrics.seg_f1(["的 新"], ["新 的"]) == 0.0
    assert metrics.seg_f1(["迈向/v 充满/n 希望/n"], ["迈向/v 充满/v 希望/n"], with_pos=True) == pytest.approx(100 * 2 / 3)


def test_set_and_edit_f1():
    assert metrics.set_f1(["发热；咳嗽、头痛"], ["发热；咳嗽；乏力"]) == pytest.approx(100 * 2 / 3)
    src = "我今天去学校了了"
    assert metrics.edit_f1(["我今天去学校了"], ["我今天去学校了"], [src]) == 100.0
    assert metrics.edit_f1([src], ["我今天去学校了"], [src]) == 0.0          # no edit made: recall 0
    # two edits (今->昨, the second 了 deleted), one of them the reference's: P 1/2, R 1 -> F 2/3
    assert metrics.edit_f1(["我昨天去学校了"], ["我今天去学校了"], [src]) == pytest.approx(100 * 2 / 3)


def test_exact_match_and_accuracy_at_1():
    assert metrics.exact_match([" 北京 ", "上海"], ["北京", "广州"]) == 50.0
    assert metrics.accuracy_at_1([["高兴", "快乐"], "伤心"], ["高兴", "难过"]) == 50.0


# ---- metrics.score per dataset --------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite")
    fx.write_lite(root)
    fx.write_released("pku_segpos", root)
    fx.write_released("pku_seg", root)
    return root


def _gold(ds, name):
    kind = ds.column_names
    if "relevance" in kind:
        return list(ds["relevance"])
    if "label" in kind:
        return list(ds["label"])
    if name == "math23k":
        return list(ds["answer"])
    return list(ds["target"])


@pytest.mark.parametrize("name, metric_names", [
    ("ccpm", ["accuracy"]), ("c3", ["accuracy"]), ("sogou_log", ["ndcg@10", "mrr"]),
    ("lcsts", ["rouge_l", "rouge_1", "rouge_2"]), ("kdconv", ["bleu", "distinct_4"]), ("wmt20_enzh", ["bleu"]),
    ("math23k", ["math_accuracy"]), ("pku_seg", ["seg_f1"]), ("pku_segpos", ["segpos_f1", "seg_f1"])])
def test_gold_predictions_score_100(lite, name, metric_names):
    ds = data.load(name, lite, "dev")
    scores = metrics.score(name, _gold(ds, name), ds)
    assert list(scores) == metric_names
    for k, v in scores.items():
        assert v == pytest.approx(100.0) or k == "distinct_4"


def test_score_on_wrong_predictions_and_tag_lists(lite):
    ccpm = data.load("ccpm", lite, "dev")
    assert metrics.score("ccpm", [0, 0, 0, 0], ccpm) == {"accuracy": 25.0}
    seg = data.load("pku_segpos", lite, "dev")
    assert metrics.score("pku_segpos", list(seg["tags"]), seg) == {"segpos_f1": 100.0, "seg_f1": 100.0}
    assert metrics.score("pku_segpos", [t.replace("/", "/x") for t in seg["target"]], seg)["seg_f1"] == 100.0
    plain = data.load("pku_seg", lite, "dev")
    assert metrics.score("pku_seg", [" ".join(r["input"]) for r in plain], plain)["seg_f1"] < 50


def test_score_refuses_a_split_without_gold_and_a_length_mismatch(lite):
    test = data.load("c3", lite, "test")
    with pytest.raises(CugeError, match=r"6 of 6 C3 examples have no gold 'label'"):
        metrics.score("c3", [0] * 6, test)
    with pytest.raises(CugeError, match=r"2 predictions for 4 CCPM examples"):
        metrics.score("ccpm", [0, 1], data.load("ccpm", lite, "dev"))
    with pytest.raises(CugeError, match="no gold 'relevance'"):
        metrics.score("sogou_log", [[1.0, 0.0, 0.5]] * 4, data.load("sogou_log", lite, "test"))
