"""Search checkpoints: one safetensors file whose metadata holds the JSON state (step, best score,
history, RNG states, a config fingerprint), written by deltakit.io's `write_state` (temp file, fsync,
rename), so a crash at any moment (kill -9 included) leaves the previous checkpoint or the new one.
Nothing is unpickled: tensors load with safetensors, the rest is JSON."""
from __future__ import annotations

from pathlib import Path

import torch

from deltakit import distributed as dist
from deltakit.io import read_state, write_state

from .errors import SearchError

FORMAT = "deltakit-s3pet-search"


def optimizer_tensors(prefix: str, optimizer, names: dict) -> dict:
    """AdamW state as flat tensors: {prefix.name.exp_avg, .exp_avg_sq, .step}."""
    out = {}
    for p, name in names.items():
        for k, v in optimizer.state.get(p, {}).items():
            out[f"{prefix}.{name}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().clone()
    return out


def load_optimizer(prefix: str, optimizer, names: dict, tensors: dict):
    """Whole saved states; a sharded parameter's (exp_avg, exp_avg_sq) take this rank's slice."""
    for p, name in names.items():
        st = {k.rsplit(".", 1)[1]: dist.like(v, p) if dist.is_dtensor(p) and v.shape == p.shape else v.clone()
              for k, v in tensors.items() if k.startswith(f"{prefix}.{name}.")
              and k.count(".") == f"{prefix}.{name}.".count(".")}
        if st:
            optimizer.state[p] = st


def save(path: Path, tensors: dict, state: dict):
    write_state(path, tensors, state, FORMAT)


def load(path: Path) -> tuple[dict, dict] | None:
    return read_state(path, FORMAT, "search checkpoint", SearchError, "delete it (or pass --fresh) to start over")
