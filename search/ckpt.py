"""Search checkpoints: one safetensors file whose metadata holds the JSON state (step, best score,
history, RNG states, a config fingerprint), written with deltakit's `atomic_write` (temp file,
fsync, rename), so a crash at any moment (kill -9 included) leaves the previous checkpoint or the new one.
Nothing is unpickled: tensors load with safetensors, the rest is JSON."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltakit import distributed as dist
from deltakit.io import atomic_write

from .errors import SearchError

FORMAT = "deltakit-s3pet-search"


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) with the torch, python `random` and numpy global RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return ({"rng.torch": torch.get_rng_state()},
            {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]})


def set_rng_state(tensors: dict, state: dict):
    torch.set_rng_state(tensors["rng.torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


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
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": FORMAT, "state": json.dumps(state)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load(path: Path) -> tuple[dict, dict] | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise SearchError(f"{path} is not a search checkpoint (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(meta["state"])
    except SearchError:
        raise
    except Exception as e:   # a foreign or damaged file: say so, never guess
        raise SearchError(f"cannot read search checkpoint {path}: {e}; delete it (or pass --fresh) to start over") from None
