"""The CUGE recipes against references written here from the originals' code, and the training loop.

CPM-Ant: CPM-Live (cpm-ant branch, 121a23f) examples/tune.py `CPMAntNLGTune.process_data` /
`CPMAntNLUTune` and examples/infer.py `CPMAntScoreInfer`, rebuilt sample by sample (no padding).
CPM-2: CPM-2-Finetune `CPM2Datasets.py` layouts (`target = [1, <s_0>] + ... (+ <s_1>)`, dec = target[:-1],
labels = target[1:]) and `finetune_cpm2.py::forward_step`'s per-sample mean."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("jieba")

import deltakit  # noqa: E402
from benchmarks.cuge import recipes, registry, tiny  # noqa: E402
from benchmarks.cuge import train as tr  # noqa: E402
from benchmarks.cuge.errors import CugeError  # noqa: E402
from benchmarks.cuge.recipes import cpmant as rc  # noqa: E402

TEXTS = ["今天天气很好", "我在北京大学读书", "床前明月光疑是地上霜", "举头望明月低头思故乡"]
CHARS = sorted(set("".join(TEXTS)) | set(tiny.TEMPLATE_CHARS))


@pytest.fixture(scope="module")
def ant(tmp_path_factory):
    return rc.load(tiny.make_cpmant(tmp_path_factory.mktemp("ant"), CHARS))


@pytest.fixture(scope="module")
def cpm2(tmp_path_factory):
    from benchmarks.cuge.recipes import cpm2
    return cpm2.load(tiny.make_cpm2(tmp_path_factory.mktemp("cpm2"), CHARS))


def setup(recipe, name, **hp):
    ds = registry.get(name)
    recipe.setup(ds, recipe.hparams(ds).but(**hp))
    return ds


# ---- CPM-Ant --------------------------------------------------------------------------------------

def live_nlg(tok, row, max_len, P=4, task_id=1):
    """CPMAntNLGTune.process_data for one row (prompt length P): input, context, segment, target."""
    input_ids = [tok.bos_id] + tok.encode(row["input"])
    target_ids = tok.encode(row["target"]) + [tok.eos_id]
    if P + len(input_ids) + len(target_ids) > max_len:
        tr_input_length = max_len - P - len(target_ids)
        if tr_input_length > 0:
            input_ids = input_ids[-tr_input_length:]
        else:
            input_ids, target_ids = [], target_ids[-(max_len - P):]
    ids = [x + P * task_id for x in range(P)] + input_ids + target_ids
    context = [True] * (len(ids) - len(target_ids)) + [False] * len(target_ids)
    segment = [0] * P + [2] * (len(input_ids) + len(target_ids))
    tgt = [-100] * len(ids)
    for i in range(len(ids) - 1):
        tgt[i] = -100 if context[i + 1] else ids[i + 1]
    return ids, context, segment, tgt


@pytest.mark.parametrize("max_len", [64, 14, 9])   # 14: the input is cut from the left; 9: the target too
def test_cpmant_nlg_loss_is_cpm_live_target_only_cross_entropy(ant, max_len):
    setup(ant, "lcsts", max_len=max_len)
    rows = [{"id": "a", "input": TEXTS[1], "target": "读书"}, {"id": "b", "input": TEXTS[2] + TEXTS[3], "target": "明月"}]
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:   # one unpadded sample at a time, as CPM-Live's batch of one
            ids, context, segment, tgt = live_nlg(ant.tokenizer, r, max_len)
            x = {"input": torch.tensor([ids]), "length": torch.tensor([len(ids)]),
                 "context": torch.tensor([context]).long(), "segment": torch.tensor([segment])}
            logits = ant.model(**x)[0][0].float()
            t = torch.tensor(tgt)
            total += F.cross_entropy(logits, t, ignore_index=-100, reduction="sum").item()
            count += int((t != -100).sum())
        assert torch.allclose(ant.loss(rows, "generate"), torch.tensor(total / count), atol=1e-5)


def test_cpmant_choice_scores_are_the_yes_logit_after_each_option(ant):
    setup(ant, "c3", max_len=64)
    tok = ant.tokenizer
    rows = [{"id": "a", "input": TEXTS[0], "options": ["北京", "明月", "读书"], "label": 2},
            {"id": "b", "input": TEXTS[3], "options": ["天气", "故乡"], "label": 1}]
    with torch.no_grad():
        scores = rc.choice_logits(ant.model, tok, rows, max_len=64)
        yes = tok.encode("是")[0]
        for b, r in enumerate(rows):
            for k, option in enumerate(r["options"]):
                ids = [tok.bos_id] + tok.encode(r["input"]) + tok.encode(option) + tok.encode("[是否正确]")
                x = ant.model.inputs([ids], task_id=1)            # all context, as CPMAntNLUTune
                want = ant.model(**x)[0][0, -1, yes].float()
                assert torch.allclose(scores[b, k], want, atol=1e-5)
        assert scores[1, 2] == float("-inf")
        assert ant.predict(rows, "choice") == scores.argmax(-1).tolist()
        assert torch.allclose(ant.loss(rows, "choice"), F.cross_entropy(scores, torch.tensor([2, 1])))
    with pytest.raises(CugeError, match="no valid label"):
        ant.loss([{**rows[0], "label": -1}], "choice")


def test_cpmant_rank_reads_each_candidate_alone(ant):
    setup(ant, "sogou_log", max_len=64)
    tok = ant.tokenizer
    row = {"id": "q", "input": "查询：天气", "options": ["查询：天气标题：今天天气很好", "查询：天气标题：明月"],
           "relevance": [2.0, 0.0]}
    with torch.no_grad():
        got = ant.predict([row], "rank")[0]
        for k, option in enumerate(row["options"]):
            x = ant.model.inputs([[tok.bos_id] + tok.encode(option) + tok.encode("[是否正确]")], task_id=1)
            assert got[k] == pytest.approx(ant.model(**x)[0][0, -1, tok.encode("是")[0]].item(), abs=1e-5)
        assert ant.loss([row], "rank").item() == pytest.approx(F.cross_entropy(torch.tensor([got]),
                                                                               torch.tensor([0])).item(), abs=1e-5)


def test_cpmant_generation_is_beam_search_from_prompt_and_input(ant):
    from deltakit.backbones.cpmant_generate import beam_search
    setup(ant, "lcsts", max_len=64, max_new=5)
    tok = ant.tokenizer
    rows = [{"id": "a", "input": TEXTS[0]}, {"id": "b", "input": TEXTS[2]}]
    want = beam_search(ant.model, [[tok.bos_id] + tok.encode(r["input"]) for r in rows], beam_size=3,
                       max_new_tokens=5, eos_id=tok.eos_id, task_id=1)
    assert ant.predict(rows, "generate") == [tok.decode(w) for w in want]
    with pytest.raises(CugeError, match="cannot take 'classify'"):
        ant.predict(rows, "classify")


def test_cpmant_prompt_delta_trains_task_1s_rows_only(ant):
    setup(ant, "lcsts", max_len=64)
    handle = deltakit.attach(ant.model, rc.DEFAULT_DELTA + "; prompt@prompt")
    try:
        opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
        for _ in range(2):
            ant.loss([{"id": "a", "input": TEXTS[0], "target": "很好"}], "generate").backward()
            opt.step()
            opt.zero_grad()
        delta = dict(handle.named_parameters())["prompt.prompt.delta"].detach()
        P = ant.model.config.prompt_length
        assert (delta.abs().sum(1) > 0).nonzero().flatten().tolist() == list(range(P, 2 * P))   # task id 1
    finally:
        handle.detach()


def test_cpmant_default_delta_is_cpm_lives_lora_count_on_10b():
    from deltakit.backbones import cpmant
    model = cpmant.build("cpm-ant-10b", device="meta")
    assert deltakit.plan(model, rc.DEFAULT_DELTA).num_params == 6_291_456


# ---- CPM-2 ----------------------------------------------------------------------------------------

def test_cpm2_choice_source_is_cpm2_finetune_layout(cpm2):
    setup(cpm2, "ccpm")
    tok = cpm2.tokenizer
    row = {"id": "a", "input": TEXTS[0], "options": ["北京", "明月"], "label": 1}
    ids = cpm2._choice_source(row)
    e = tok.encode   # CCPMDataset: 选项： + [number, 、] + choice + [；] per option + 文章： + context
    assert ids == e("选项：") + e("一") + e("、") + e("北京") + e("；") + e("二") + e("、") + e("明月") + e("；") \
        + e("文章：") + e(TEXTS[0])
    assert tok.decode(ids) == "选项：一、北京；二、明月；文章：" + TEXTS[0]


def test_cpm2_generation_loss_is_per_sample_mean_over_sentinel_framed_targets(cpm2):
    setup(cpm2, "lcsts", max_len=64)
    tok, model = cpm2.tokenizer, cpm2.model
    rows = [{"id": "a", "input": TEXTS[1], "target": "读书"}, {"id": "b", "input": TEXTS[0], "target": "今天天气"}]
    losses = []
    with torch.no_grad():
        for r in rows:
            target = [1, tok.sentinel_id(0)] + tok.encode(r["target"]) + [tok.sentinel_id(1)]   # LCSTSDataset
            out = model(input_ids=torch.tensor([tok.encode(r["input"])]), decoder_input_ids=torch.tensor([target[:-1]]))
            losses.append(F.cross_entropy(out.logits[0].float(), torch.tensor(target[1:])))
        assert torch.allclose(cpm2.loss(rows, "generate"), torch.stack(losses).mean(), atol=1e-5)
        # choice: target [1, <s_0>, number word], no <s_1> (CCPMDataset, add_target_post=False)
        setup(cpm2, "ccpm", max_len=64)
        row = {"id": "c", "input": TEXTS[2], "options": ["北京", "明月", "读书"], "label": 2}
        target = [1, tok.sentinel_id(0), tok.encode("三")[0]]
        out = model(input_ids=torch.tensor([cpm2._choice_source(row)]), decoder_input_ids=torch.tensor([target[:-1]]))
        want = F.cross_entropy(out.logits[0].float(), torch.tensor(target[1:]))
        assert torch.allclose(cpm2.loss([row], "choice"), want, atol=1e-5)
        number_ids = [tok.encode(n)[0] for n in "一二三"]
        assert cpm2.predict([row], "choice") == [int(out.logits[0, 1, number_ids].argmax())]


def test_cpm2_rank_is_the_relevant_logit_and_generation_drops_the_frame(cpm2):
    setup(cpm2, "sogou_log", max_len=64)
    tok = cpm2.tokenizer
    row = {"id": "q", "input": "", "options": ["查询：天气标题：今天天气很好", "查询：天气标题：明月"],
           "relevance": [1.0, 0.0]}
    with torch.no_grad():
        got = cpm2.predict([row], "rank")[0]
        for k, option in enumerate(row["options"]):   # SogouLogDataset: decoder [1, <s_0>], logit of token 相关
            out = cpm2.model(input_ids=torch.tensor([tok.encode(option)]),
                             decoder_input_ids=torch.tensor([[1, tok.sentinel_id(0)]]))
            assert got[k] == pytest.approx(out.logits[0, -1, tok.encode("相关")[0]].item(), abs=1e-5)
    setup(cpm2, "lcsts", max_len=64, max_new=4)
    texts = cpm2.predict([{"id": "a", "input": TEXTS[0]}], "generate")
    frame = [1, tok.sentinel_id(0)]           # the decoder starts from <s>, <s_0> and stops at <s_1>
    out = cpm2.model.generate(input_ids=torch.tensor([tok.encode(TEXTS[0])]), decoder_input_ids=torch.tensor([frame]),
                              decoder_start_token_id=1, num_beams=3, do_sample=False, max_new_tokens=4,
                              eos_token_id=tok.sentinel_id(1), pad_token_id=tok.pad_id)[0].tolist()
    assert out[:2] == frame
    new = out[2:]
    assert texts == [tok.decode(new[:new.index(tok.end_id)] if tok.end_id in new else new)]


# ---- detection, encoders ----------------------------------------------------------------------------

def test_detect_finds_each_backbone_kind(tmp_path):
    assert recipes.detect(tiny.make_cpmant(tmp_path / "ant", CHARS)) == "cpm-ant"
    assert recipes.detect(tmp_path / "ant") == "cpm-ant"
    assert recipes.detect(tiny.make_cpm2(tmp_path / "cpm2", CHARS)) == "cpm-2"
    assert recipes.detect(tiny.make_gpt2(tmp_path / "gpt2", CHARS)) == "hf-causal"
    assert recipes.detect(tiny.make_encoder(tmp_path / "enc", CHARS)) == "encoder"
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text('{"model_type": "mt5", "is_encoder_decoder": true}')
    assert recipes.detect(tmp_path / "t5") == "hf-seq2seq"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CugeError, match="is none of"):
        recipes.detect(tmp_path / "empty")
    with pytest.raises(CugeError, match="does not exist"):
        recipes.detect(tmp_path / "nope")
    with pytest.raises(CugeError, match="encoder model, which cannot write text"):
        recipes.load(tmp_path / "enc", registry.get("lcsts"))


def test_encoder_tags_long_sentences_window_by_window(tmp_path):
    from benchmarks.cuge.recipes import encoder
    sentence = "".join(TEXTS) * 3                      # 102 characters: 2 windows of 60 at max_len 62
    tags = ["S"] * len(sentence)
    rows = [{"id": "a", "input": sentence, "tokens": list(sentence), "tags": tags},
            {"id": "b", "input": TEXTS[0], "tokens": list(TEXTS[0]), "tags": ["B", "E", "B", "E", "B", "E"]}]
    recipe = encoder.load(tiny.make_encoder(tmp_path / "enc", CHARS), registry.get("pku_seg"), rows)
    assert recipe.labels == ["B", "E", "S"]
    setup(recipe, "pku_seg", max_len=62)
    assert recipe.window == 60 and recipe._windows(rows) == [(0, 0), (0, 60), (1, 0)]
    enc = recipe._tag_batch(rows, [(1, 0)])             # [CLS] one piece per character [SEP]
    assert enc["input_ids"][0].tolist() == [0] + recipe.tokenizer.convert_tokens_to_ids(list(TEXTS[0])) + [2]
    with torch.no_grad():
        preds = recipe.predict(rows, "tag")
        assert [len(p) for p in preds] == [len(sentence), 6] and set(sum(preds, [])) <= {"B", "E", "S"}
        assert math.isfinite(recipe.loss(rows, "tag").item())
    with pytest.raises(CugeError, match="no tags to learn"):
        encoder.tag_set([{"tags": []}])


# ---- the training loop -------------------------------------------------------------------------------

def test_schedules():
    noam = tr.TrainConfig(lr=1.0, warmup=4, schedule="noam", max_steps=20)
    assert [noam.lr_factor(s) for s in (0, 3, 8)] == [pytest.approx(1 / 8), pytest.approx(1 / 2), pytest.approx(1 / 3)]
    lin = tr.TrainConfig(warmup=2, schedule="linear", max_steps=10)
    assert [lin.lr_factor(s) for s in (0, 1, 2, 9)] == [0.5, 1.0, pytest.approx(1.0), pytest.approx(1 / 8)]
    assert tr.TrainConfig(schedule="constant", warmup=0).lr_factor(5) == 1.0
    with pytest.raises(CugeError, match="schedule"):
        tr.TrainConfig(schedule="cosine")
    with pytest.raises(CugeError, match="batch_size=0"):
        tr.TrainConfig(batch_size=0)


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    plain = tr.Batches(10, 4, 0)
    epoch = sum((plain(s) for s in range(3)), [])
    assert sorted(epoch) == list(range(10)) and plain(1) == tr.Batches(10, 4, 0)(1)
    assert sorted(sum((plain(s) for s in range(3, 6)), [])) == list(range(10))
    assert epoch != sum((plain(s) for s in range(3, 6)), []) and tr.Batches(10, 4, 1)(0) != plain(0)
    lengths = np.random.default_rng(0).integers(1, 200, 1000)
    bucketed = tr.Batches(1000, 10, 0, lengths)
    batches = [bucketed(s) for s in range(100)]
    assert sorted(sum(batches, [])) == list(range(1000)) and [bucketed(s) for s in (7, 3)] == [batches[7], batches[3]]
    shuffled = tr.Batches(1000, 10, 0)
    spread = lambda bs: np.mean([np.ptp(lengths[b]) for b in bs])   # noqa: E731
    assert spread(batches) < 0.2 * spread([shuffled(s) for s in range(100)])   # similar lengths share a batch
    assert tr.input_lengths([{"input": "今天"}, {"input": "abc"}]).tolist() == [2, 3]


ROWS = [{"id": str(i), "input": t, "target": t[:2]} for i, t in enumerate(TEXTS * 3)]


def _fit(recipe, out, max_steps=8, crash_at=None, **kw):
    """Train a dropout LoRA on ROWS; `crash_at`: the training step whose loss raises (a simulated kill)."""
    setup(recipe, "lcsts", max_len=64)
    torch.manual_seed(0)
    handle = deltakit.attach(recipe.model, "lora(r=4,alpha=8,dropout=0.2)@attn.q,attn.v")
    calls = []

    def loss(rows):
        if len(calls) == crash_at:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return recipe.loss(rows, "generate")
    cfg = tr.TrainConfig(**{"lr": 1e-2, "batch_size": 3, "max_steps": max_steps, "eval_every": 2, "save_every": 3,
                            "schedule": "noam", "warmup": 3, **kw})
    try:
        result = tr.train(handle, loss, ROWS, ROWS[:4], cfg, out, {"test": 1}, progress=False,
                          dev_loss_fn=lambda rows: recipe.loss(rows, "generate"))
        return {k: v.clone() for k, v in handle.state_dict().items()}, result
    finally:
        handle.detach()


def test_resume_from_a_checkpoint_gives_the_same_deltas_bit_for_bit(ant, tmp_path):
    full, result = _fit(ant, tmp_path / "full")
    assert result.steps == 8 and result.resumed_from is None and len(result.evals) == 4
    with pytest.raises(KeyboardInterrupt):   # dies in step 8, after the checkpoints of steps 3 and 6
        _fit(ant, tmp_path / "crash", crash_at=7)
    again, resumed = _fit(ant, tmp_path / "crash")
    assert resumed.resumed_from == 6 and resumed.evals == result.evals and resumed.losses == result.losses
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
    with pytest.raises(CugeError, match="other settings"):
        _fit(ant, tmp_path / "crash", lr=2e-2)


def test_patience_stops_and_keeps_the_best_metric_step(ant, tmp_path):
    scores = iter([5.0, 7.0, 6.0, 6.5, 1.0, 9.0])
    setup(ant, "lcsts", max_len=64)
    handle = deltakit.attach(ant.model, "lora(r=2)@attn.q")
    try:
        cfg = tr.TrainConfig(lr=1e-2, batch_size=4, max_steps=12, eval_every=2, save_every=2, patience=2,
                             select="metric", warmup=1)
        result = tr.train(handle, lambda rows: ant.loss(rows, "generate"), ROWS, ROWS[:2], cfg, tmp_path, {},
                          dev_metric=lambda: next(scores), progress=False)
        assert result.stopped_early and result.steps == 8 and result.best_step == 4 and result.best == 7.0
        assert [e["dev_metric"] for e in result.evals] == [5.0, 7.0, 6.0, 6.5]
        tr.plot(result, tmp_path / "loss.png")
        assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        handle.detach()
    handle = deltakit.attach(ant.model, "lora(r=2)@attn.q")
    try:
        with pytest.raises(CugeError, match="needs a dev metric"):
            tr.train(handle, None, ROWS, ROWS, cfg, tmp_path, {})
    finally:
        handle.detach()
