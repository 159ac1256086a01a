"""The search on a native CPM-Ant (`--model` a CPM-Live checkpoint with its config JSON and vocab):
class scores are the LM head's next-token logits at the label words, exactly what generation would
compute; padding changes nothing; the whole search -> retrain -> save runs, and its outputs re-apply
on a freshly loaded CPM-Ant; bad folders and verbalisers get clear errors."""
import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import deltakit
from deltakit.backbones import cpmant, cpmant_generate as gen
from search.cpm import CPMAntBackbone
from search.data import Encoded
from search.errors import SearchError
from search.models import load_backbone
from search.tiny import make_cpmant, make_task


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cpmant")
    return make_cpmant(d / "model"), make_task(d / "task.jsonl", n=240)


def _cfg(files, out, **kw):
    from search.s3pet import Config
    ckpt, task = files
    base = dict(budget="2%", model=str(ckpt.parent), task=str(task), n_train=None, n_dev=24, n_test=48,
                batch_size=8, search_steps=12, retrain_epochs=1, lr_weights=3e-3, retrain_lr=1e-2,
                output_dir=str(out), progress=False)
    return Config(**{**base, **kw})


def test_class_scores_are_the_first_generation_step_at_the_label_words(files):
    backbone = load_backbone(str(files[0]), ["neg", "pos"], seed=0)
    assert isinstance(backbone, CPMAntBackbone) and backbone.fixed is None
    texts = ["good food", "the room was very slow and bland", "love it"]
    enc = Encoded([(t, 0) for t in texts], backbone, max_length=40)
    assert all(ids[0] == backbone.tokenizer.bos_id for ids in enc.ids)
    backbone.model.eval()
    with torch.no_grad():
        scores = backbone.logits(enc.batch(range(3)))             # one padded batch
        for i, ids in enumerate(enc.ids):
            x = gen._batch(backbone.model, [ids], task_id=1, device="cpu")
            first, _ = gen._step(backbone.model, x, None)          # what generation's first step sees
            torch.testing.assert_close(scores[i], first[0, backbone.word_ids], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(backbone.logits(enc.batch([i]))[0], scores[i], rtol=1e-5, atol=1e-5)
    words = backbone.tokenizer.convert_ids_to_tokens(backbone.word_ids.tolist())
    assert words == ["neg", "pos"]


def test_search_runs_on_native_cpmant_and_its_outputs_reapply(files, tmp_path):
    from search.s3pet import run
    out = tmp_path / "run"
    result = run(_cfg(files, out))
    cfg = cpmant.CPMAntConfig.from_json(files[0].with_suffix(".json"))
    assert result.budget.backbone == cpmant.num_params(cfg)       # the whole backbone, embeddings too
    assert 0 < result.cost <= result.budget.params
    assert result.fixed_spec is None and result.spec == result.structure_spec   # no head: the LM head scores
    structure = json.loads((out / "structure.json").read_text())
    assert {c["key"].rsplit(".", 1)[1] for c in structure["candidates"]} >= {"lora", "bitfit", "lnfit", "lowrank_adapter"}
    assert (out / "gates.png").stat().st_size > 2000

    fresh = cpmant.load_cpmant(files[0], cfg, dtype=torch.float32)
    h = deltakit.attach(fresh, result.spec)
    assert sum(e.num_params for e in h.entries) == result.cost
    h.detach()
    loaded = deltakit.load(fresh, out / "deltas")
    x = cpmant.make_inputs(cfg, [[6, 12, 5, 20, 5, 33]], task_id=1)
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(**x)[0], fresh(**x)[0], rtol=1e-5, atol=1e-5)
    loaded.detach()


def test_search_on_a_bf16_backbone_keeps_float32_deltas_and_moves_the_gates(files, tmp_path, monkeypatch):
    """What a GPU run does (bf16 weights), on the CPU."""
    import search.cpm
    from search.s3pet import run
    monkeypatch.setattr(search.cpm, "weights_dtype", lambda device: torch.bfloat16)
    r = run(_cfg(files, tmp_path / "bf16", search_steps=6))
    assert {p.dtype for p in r.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in r.handle.parameters()} == {torch.float32}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in json.loads((tmp_path / "bf16" / "metrics.json")
                                                                          .read_text())["search_history"])
    assert max(r.probs) - min(r.probs) > 1e-3       # the gate logits received gradients


def test_training_through_the_lm_head_learns_the_task(files):
    from search.s3pet import Config, evaluate, prepare, train_structure
    cfg = Config(model=str(files[0]), task=str(files[1]), n_train=None, n_dev=24, n_test=48, batch_size=8,
                 retrain_epochs=3, retrain_lr=1e-2, retrain_evals=3, progress=False)
    setup = prepare(cfg)
    before = evaluate(setup.backbone, setup.trn, 8)["accuracy"]
    r = train_structure(cfg, setup.backbone, "lora(r=8,alpha=16)@attn.*,ffn.*", setup.trn, setup.dev)
    after = evaluate(setup.backbone, setup.trn, 8)["accuracy"]
    assert r["final_loss"] < 0.6 and after > max(0.75, before + 0.15), (before, after, r["final_loss"])
    r["handle"].detach()


def test_checkpoint_file_named_after_a_size_needs_no_json(files, tmp_path):
    ckpt, _ = files
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(ckpt.parent / "ant.txt", d / "ant.txt")
    # a checkpoint of the named 'tiny' shape loads under that name, without a JSON beside it
    torch.save(cpmant.build("tiny").state_dict(), d / "tiny.pt")
    backbone = load_backbone(str(d / "tiny.pt"), ["neg", "pos"], seed=0)
    assert backbone.model.config == cpmant.CONFIGS["tiny"]
    # the task's checkpoint is not that shape (its vocab is the task's): the name does not fit, and
    # the error says so
    shutil.copy(ckpt, d / "tiny.pt")
    with pytest.raises(SearchError, match="shapes differ|does not fit"):
        load_backbone(str(d / "tiny.pt"), ["neg", "pos"], seed=0)
    (d / "tiny.pt").unlink()
    shutil.copy(ckpt, d / "mine.pt")
    with pytest.raises(SearchError, match="no CPM-Ant config .*config JSON"):
        load_backbone(str(d / "mine.pt"), ["neg", "pos"], seed=0)
    shutil.copy(ckpt.with_suffix(".json"), d / "mine.json")
    assert isinstance(load_backbone(str(d / "mine.pt"), ["neg", "pos"], seed=0), CPMAntBackbone)
    (d / "ant.txt").unlink()
    with pytest.raises(SearchError, match="no CPM-Ant vocab"):
        load_backbone(str(d), ["neg", "pos"], seed=0)


def test_folder_with_two_checkpoints_is_ambiguous(files, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(files[0].parent, d)
    shutil.copy(files[0], d / "other.safetensors")
    with pytest.raises(SearchError, match="2 checkpoint files"):
        load_backbone(str(d), ["neg", "pos"], seed=0)


def test_label_words_must_be_in_the_vocab_and_differ(files, tmp_path):
    from search.s3pet import prepare, run
    with pytest.raises(SearchError, match="label word 'positive' .*--verbalizer"):
        load_backbone(str(files[0]), ["neg", "positive"], seed=0)   # 'pos' + <unk>: not a vocab word
    with pytest.raises(SearchError, match="same token"):
        load_backbone(str(files[0]), ["good", "good"], seed=0)
    with pytest.raises(SearchError, match="gives 3 words for the 2 labels"):
        run(_cfg(files, tmp_path / "v", verbalizer="bad,good,fine"))
    # a verbaliser maps labels to other words: here the task's labels (neg, pos) read as 'bad' / 'good'
    backbone = prepare(_cfg(files, tmp_path / "v2", verbalizer="bad， good")).backbone   # full-width comma
    assert backbone.tokenizer.convert_ids_to_tokens(backbone.word_ids.tolist()) == ["bad", "good"]
