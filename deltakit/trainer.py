"""Training deltas with `transformers.Trainer`: `DeltaTrainer` is Trainer with deltakit's checkpoints.

    from deltakit.trainer import DeltaTrainer
    h = deltakit.attach(model, "lora(r=8,alpha=16)@attn.q,attn.v; full@head")
    DeltaTrainer(model=model, args=TrainingArguments(...), train_dataset=...).train()

Trainer itself would train the deltas as they are (only they require grad, so its optimizer holds
only them), but would write the whole model into every checkpoint. DeltaTrainer changes only where
model weights go and come from:
* a checkpoint (and `save_model`) holds each handle's deltas as `h.save` writes them (safetensors +
  deltakit.json; one handle: in the folder itself, so `deltakit.load(model, "out/checkpoint-500")`
  works; several: one subfolder per handle name), plus `trainable.safetensors` with any backbone
  parameter the user set `requires_grad=True` after attach (a head unfrozen by hand; a `full@head`
  rule is a delta and needs no such file). Trainer's own optimizer, scheduler, RNG and state files
  are written beside them as usual; nothing of the model is pickled.
* `resume_from_checkpoint` and `load_best_model_at_end` load those files back into the attached
  handles (the spec must be the same: a clear error otherwise).
transformers is imported here only, never at `import deltakit` time.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .errors import CheckpointError, HandleError, listing
from .handle import handles
from .io import atomic_write
from .positions import backbone_params

try:
    from transformers import Trainer
except ImportError as e:   # deltakit itself does not need transformers; this module does
    raise ImportError("deltakit.trainer needs transformers: pip install 'transformers>=5.16'") from e

TRAINABLE = "trainable.safetensors"


def _folders(model, path) -> dict:
    """handle name -> the folder its deltas go to."""
    found = handles(model)
    if not found:
        raise HandleError("DeltaTrainer needs a model with deltas: call deltakit.attach(model, spec) first")
    if len(found) == 1:
        return {name: Path(path) for name in found}
    return {name: Path(path) / name for name in found}


def trainable_backbone(model) -> dict:
    """Backbone parameters that require grad (set by the user after attach), by name."""
    return {n: p for n, p in backbone_params(model) if p.requires_grad}


def save(model, path):
    """Write every handle's deltas and the trainable backbone parameters to `path`."""
    from safetensors.torch import save_file
    for name, folder in _folders(model, path).items():
        handles(model)[name].save(folder)
    extra = {n: p.detach().contiguous().cpu() for n, p in trainable_backbone(model).items()}
    if extra:
        atomic_write(Path(path) / TRAINABLE, lambda tmp: save_file(extra, str(tmp), metadata={"format": "pt"}))


def load(model, path):
    """Load what `save` wrote into the handles attached to `model` (same names, same specs)."""
    from safetensors.torch import load_file
    for name, folder in _folders(model, path).items():
        handle = handles(model)[name]
        config = checkpoint.read_config(folder)
        if config["spec"] != handle.spec:
            raise CheckpointError(f"the deltas in {folder} were trained with spec {config['spec']!r}, but handle "
                                  f"{name!r} here has {handle.spec!r}; attach the same spec before resuming")
        handle.load_state_dict(checkpoint.read_tensors(folder))
    want = trainable_backbone(model)
    file = Path(path) / TRAINABLE
    saved = load_file(str(file)) if file.is_file() else {}
    if set(saved) != set(want):
        raise CheckpointError(f"{path} holds trainable backbone parameters {listing(sorted(saved), 4) or 'none'}, "
                              f"but here {listing(sorted(want), 4) or 'none'} require grad; set requires_grad "
                              f"as in the run that wrote it")
    with torch.no_grad():
        for n, value in saved.items():
            want[n].copy_(value)


class DeltaTrainer(Trainer):
    """transformers.Trainer whose checkpoints hold the deltas (and user-unfrozen backbone
    parameters) only, in deltakit's files; resuming and load_best_model_at_end read them back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.model is not None:   # a model without deltas would save nothing: say so before training
            _folders(self.accelerator.unwrap_model(self.model), self.args.output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        save(model, output_dir)
        if self.processing_class is not None:   # as Trainer does: the tokenizer goes with the weights
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load(self.accelerator.unwrap_model(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
