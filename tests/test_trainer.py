"""deltakit.trainer.DeltaTrainer: transformers.Trainer training deltas, with checkpoints that hold the
deltas only; resuming ends where an uninterrupted run ends; load_best_model_at_end restores the best
step's deltas."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import deltakit
import tiny_models as tm

transformers = pytest.importorskip("transformers")
from deltakit.errors import CheckpointError  # noqa: E402
from deltakit.trainer import DeltaTrainer  # noqa: E402

STEPS = 6


class Rows(torch.utils.data.Dataset):
    """Random token rows; the label says whether the first token id is in the upper half."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, tm.VOCAB, (n, 8), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": int(self.ids[i, 0] >= tm.VOCAB // 2)}


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=5e-3,
                lr_scheduler_type="linear", warmup_steps=1, save_strategy="steps", save_steps=3, logging_steps=1,
                report_to=[], seed=0, data_seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def setup(way):
    """A tiny XLM-R classifier with LoRA and a trainable head: as a full@head delta or unfrozen by hand."""
    model = tm.make("xlmr")
    torch.manual_seed(0)   # LoRA's A is drawn at attach, before Trainer seeds anything
    if way == "full":
        h = deltakit.attach(model, "lora(r=4,alpha=8,dropout=0.1)@attn.q,attn.v; full@head")
    else:
        h = deltakit.attach(model, "lora(r=4,alpha=8,dropout=0.1)@attn.q,attn.v")
        model.classifier.requires_grad_(True)
    return model, h


def weights(model, h):
    out = dict(h.state_dict())
    out.update({f"classifier.{n}": p.detach().clone() for n, p in model.classifier.named_parameters()})
    return out


class StopAt(transformers.TrainerCallback):
    """A crash after `step` steps (after that step's checkpoint is written)."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("way", ["full", "unfrozen"])
def test_checkpoints_hold_deltas_and_resume_exactly(way, tmp_path):
    model, h = setup(way)
    DeltaTrainer(model=model, args=args(tmp_path / "a"), train_dataset=Rows(48, 1)).train()
    want = weights(model, h)
    assert not torch.equal(want["classifier.out_proj.weight"] if way == "unfrozen" else
                           want["head.full.value.out_proj__weight"], tm.make("xlmr").classifier.out_proj.weight)

    ckpt = tmp_path / "b" / "checkpoint-3"
    model, h = setup(way)
    with pytest.raises(KeyboardInterrupt):
        DeltaTrainer(model=model, args=args(tmp_path / "b"), train_dataset=Rows(48, 1), callbacks=[StopAt(3)]).train()
    files = sorted(p.name for p in ckpt.iterdir())
    assert "deltas.safetensors" in files and "deltakit.json" in files
    assert not [f for f in files if f.startswith(("model", "pytorch_model"))], files
    assert ("trainable.safetensors" in files) == (way == "unfrozen")
    backbone = sum(p.numel() for _, p in deltakit.backbone_params(model)) * 4
    assert (ckpt / "deltas.safetensors").stat().st_size < backbone / 4

    model, h = setup(way)   # a new process would start from scratch like this
    DeltaTrainer(model=model, args=args(tmp_path / "b"), train_dataset=Rows(48, 1)).train(resume_from_checkpoint=str(ckpt))
    got = weights(model, h)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=lambda m: f"{k}: {m}")

    # the checkpoint is an ordinary deltakit checkpoint
    fresh = tm.make("xlmr")
    deltakit.load(fresh, ckpt)


def test_load_best_model_at_end_restores_the_best_step(tmp_path):
    model, h = setup("full")
    saved = {}

    class Record(transformers.TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved[state.global_step] = {k: v.clone() for k, v in h.state_dict().items()}

    scores = iter([1.0, 3.0, 2.0])   # evaluations at steps 2, 4, 6: the best is step 4, not the last
    trainer = DeltaTrainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2,
                                                  load_best_model_at_end=True, metric_for_best_model="score"),
                           train_dataset=Rows(48, 1), eval_dataset=Rows(16, 2), callbacks=[Record()],
                           compute_metrics=lambda prediction: {"score": next(scores)})
    trainer.train()
    best = trainer.state.best_global_step
    assert best == 4 and trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    now = h.state_dict()
    assert any(not torch.equal(saved[STEPS][k], saved[best][k]) for k in now)
    for k in now:
        assert torch.equal(now[k], saved[best][k]), k


def test_a_model_without_deltas_is_refused(tmp_path):
    from deltakit.errors import HandleError
    with pytest.raises(HandleError, match="attach"):
        DeltaTrainer(model=tm.make("xlmr"), args=args(tmp_path), train_dataset=Rows(16, 1))


def test_resume_with_another_spec_is_refused(tmp_path):
    model, _ = setup("full")
    DeltaTrainer(model=model, args=args(tmp_path, max_steps=3), train_dataset=Rows(16, 1)).train()
    other = tm.make("xlmr")
    deltakit.attach(other, "lora(r=2)@attn.q; full@head")
    with pytest.raises(CheckpointError, match="attach the same spec"):
        DeltaTrainer(model=other, args=args(tmp_path, max_steps=3), train_dataset=Rows(16, 1)).train(
            resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
