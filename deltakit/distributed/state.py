"""Training-state checkpoints for a run that must survive a crash: the deltas, their optimizer state
and the step in one safetensors file (JSON in its metadata), written atomically by rank 0, so a
crash at any moment leaves the previous checkpoint or the new one. Tensors are stored whole, keyed
by the handle's names, so a state saved by N ranks loads at any other number (one included).
Nothing is unpickled: tensors load with safetensors, the rest is JSON.

    state = load_state(path, handle, optimizer)          # None on a fresh start
    start = state["step"] if state else 0
    for step in range(start, steps):
        ...
        save_state(path, handle, optimizer, step + 1)     # every rank calls it
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import read_state, write_state
from . import group
from .tensors import full_tensor, like, reshard

FORMAT = "deltakit-train-state"


def save_state(path, handle, optimizer=None, step: int = 0, extra: dict | None = None) -> Path:
    """Write the state (a collective: every rank calls it; rank 0 writes). extra: JSON for the caller."""
    reshard(handle.model)   # the registered parameters are then the ones the optimizer holds
    tensors = {}
    for key, p in handle.named_parameters():
        tensors[f"delta.{key}"] = full_tensor(p.detach())
        for name, value in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
            if not torch.is_tensor(value):
                value = torch.tensor(value)
            tensors[f"optim.{key}.{name}"] = full_tensor(value.detach())
    state = {"step": step, "world_size": group.world_size(), "extra": extra}
    path = Path(path)
    group.on_main(write_state, path, tensors, state, FORMAT)
    return path


def load_state(path, handle, optimizer=None) -> dict | None:
    """Load a state written by save_state into `handle` (and `optimizer`, built over the handle's
    parameters as when it was saved); returns {"step", "world_size", "extra"}, or None when there is
    no file yet (a fresh start). Every rank reads the file itself and keeps its own slices."""
    loaded = read_state(path, FORMAT, "deltakit training state", CheckpointError)
    if loaded is None:
        return None
    tensors, state = loaded
    reshard(handle.model)
    handle.load_state_dict({k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")})
    if optimizer is not None:
        for key, p in handle.named_parameters():
            prefix = f"optim.{key}."
            saved = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if saved:   # exp_avg and the like are laid out as their parameter, a step count is a scalar
                optimizer.state[p] = {n: like(v, p) if v.shape == p.shape else v for n, v in saved.items()}
    return state
