"""Read a Megatron/DeepSpeed model-parallel checkpoint and merge its shards into one state dict.

Folder layout (TsinghuaAI/CPM-1-Generate `change_mp.py`, TsinghuaAI/CPM-2-Pretrain `init_ckpt.py`):

    CKPT/latest_checkpointed_iteration.txt      "80000"   (or "release")
    CKPT/80000/mp_rank_00_model_states.pt       one file per model-parallel rank
    CKPT/80000/mp_rank_01_model_states.pt

Each file is a dict whose weights sit under "module" (DeepSpeed's `save_checkpoint`; read back by
`model.load_state_dict(sd['module'])` in CPM-1-Generate `utils.py`). How one tensor is split over
ranks follows Megatron's `mpu/layers.py` (`_initialize_affine_weight`): the full weight is cut into
`stride * world` equal chunks along the partition dim and rank r keeps chunks r, r+world, ...
So a fused projection with stride s (CPM-1 `query_key_value`, s=3) holds [q_r; k_r; v_r] on rank r,
and merging is "for each of the s parts, concatenate that part of every rank" - exactly the
reordering of the fixed `change_mp.py` of CPM-1-Generate (commit 166ae79). Tensors that are not
split (norms, biases of row-parallel layers, GPT-2 position embeddings) must be equal on all ranks.

Files are read with `torch.load(weights_only=True)`: nothing but tensors and plain containers is
unpickled. The only extra types allowed are the numpy array/dtype constructors that DeepSpeed's
`np_rng_state` entry needs (the allowlist PyTorch documents for numpy arrays).
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
SHARD = re.compile(r"mp_rank_(\d+)_model_states\.pt")
STATE_KEYS = ("module", "model")   # DeepSpeed writes "module"; plain Megatron `save_checkpoint` writes "model"


@dataclass(frozen=True)
class Split:
    """How one tensor is partitioned: along `dim` in `stride` interleaved parts; dim None = replicated."""
    dim: int | None
    stride: int = 1


REPLICATED = Split(None)
COLUMN = Split(0)      # ColumnParallelLinear weight/bias: output features
ROW = Split(1)         # RowParallelLinear weight: input features
VOCAB = Split(0)       # VocabParallelEmbedding: vocabulary rows


def iteration_dir(path) -> Path:
    """The folder holding the shards: `path` itself if it has them, else the one the tracker names."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; give the Megatron checkpoint folder (the one with {TRACKER})")
    if _shard_files(path):
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        inside = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"{path} is not a Megatron checkpoint folder: it has no {TRACKER} and no "
                              f"mp_rank_XX_model_states.pt files (it holds: {inside})")
    name = tracker.read_text().strip()
    folder = path / name
    if not folder.is_dir():
        raise CheckpointError(f"{tracker} names iteration {name!r}, but {folder} does not exist")
    return folder


def _shard_files(folder: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.iterdir() if (m := SHARD.fullmatch(p.name))}


def _safe_globals() -> list:
    """numpy arrays in DeepSpeed's `np_rng_state`: PyTorch's documented allowlist for them, under the
    numpy-2 name and the numpy-1 name (`numpy.core`) that files written in 2021 carry."""
    try:
        import numpy as np
    except ImportError:
        return []
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:   # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def load_file(path: Path) -> dict:
    """torch.load with weights_only=True; a CheckpointError saying how to re-save a file it refuses."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:   # pre-1.6 (non-zip) files cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            found = "see below"
        raise CheckpointError(
            f"{path} holds pickled Python objects other than tensors ({found}); deltakit loads checkpoints "
            "with torch.load(weights_only=True) and never unpickles arbitrary objects. If you trust the file, "
            "re-save only its weights once: sd = torch.load(f, weights_only=False); "
            "torch.save({'module': sd['module']}, f)") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} could not be read as a torch checkpoint ({e}); is the file complete?") from e


def _state_dict(blob, path: Path) -> dict:
    for key in STATE_KEYS:
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            sd = blob[key]
            break
    else:
        have = list(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(f"{path} has no weights under {' or '.join(map(repr, STATE_KEYS))} (it has {have})")
    if sd and all(k.startswith("module.") for k in sd):   # an un-unwrapped FP16_Module / DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_shards(path) -> list[dict]:
    """The per-rank state dicts of a checkpoint, in rank order; an error if a rank is missing."""
    folder = iteration_dir(path)
    files = _shard_files(folder)
    if not files:
        raise CheckpointError(f"{folder} has no mp_rank_XX_model_states.pt files")
    missing = sorted(set(range(max(files) + 1)) - set(files))
    if missing:
        names = ", ".join(f"mp_rank_{r:02d}_model_states.pt" for r in missing)
        raise CheckpointError(f"{folder} misses model-parallel shard(s) {names}: found ranks {sorted(files)}, "
                              f"expected 0..{max(files)}")
    return [_state_dict(load_file(files[r]), files[r]) for r in sorted(files)]


def rule_for(key: str, rules) -> Split:
    """The Split of the first (regex, Split) rule whose regex matches the end of `key`."""
    for pattern, split in rules:
        if re.search(pattern + r"$", key):
            return split
    raise CheckpointError(f"unexpected tensor {key!r} in the checkpoint: no merge rule covers it")


def merge_tensor(key: str, parts: list, split: Split) -> torch.Tensor:
    shapes = {tuple(p.shape) for p in parts}
    if split.dim is None:
        if len(shapes) > 1 or any(not torch.equal(parts[0], p) for p in parts[1:]):
            bad = next(r for r, p in enumerate(parts) if p.shape != parts[0].shape or not torch.equal(parts[0], p))
            raise CheckpointError(f"{key!r} should be replicated on every model-parallel rank, but rank {bad} "
                                  f"differs from rank 0 (shapes {[tuple(p.shape) for p in parts]}); the shards "
                                  "do not come from one checkpoint, or the file is damaged")
        return parts[0]
    if len(shapes) > 1:
        raise CheckpointError(f"{key!r} has different shapes on different ranks: {[tuple(p.shape) for p in parts]}")
    if parts[0].dim() <= split.dim or parts[0].shape[split.dim] % split.stride:
        raise CheckpointError(f"{key!r} of shape {tuple(parts[0].shape)} cannot be split in {split.stride} "
                              f"part(s) along dim {split.dim}")
    chunks = [p.chunk(split.stride, split.dim) for p in parts]          # rank r: [q_r, k_r, v_r]
    return torch.cat([c[s] for s in range(split.stride) for c in chunks], split.dim)   # [q_0..q_n, k_0.., v_0..]


def merge(shards: list[dict], rules, dtype: torch.dtype | None = None) -> dict:
    """One full state dict from per-rank dicts, following `rules` [(key-suffix regex, Split)]."""
    keys = list(shards[0])
    for r, sd in enumerate(shards[1:], 1):
        if set(sd) != set(keys):
            diff = sorted(set(sd) ^ set(keys))[:5]
            raise CheckpointError(f"rank {r} and rank 0 hold different tensors (e.g. {diff})")
    out = {}
    for key in keys:
        t = merge_tensor(key, [sd[key] for sd in shards], rule_for(key, rules))
        out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def split(state_dict: dict, world: int, rules) -> list[dict]:
    """The inverse of `merge` (what Megatron's `_initialize_affine_weight` does): per-rank dicts."""
    ranks = [{} for _ in range(world)]
    for key, t in state_dict.items():
        s = rule_for(key, rules)
        if s.dim is None:
            for sd in ranks:
                sd[key] = t.clone()
            continue
        pieces = t.chunk(s.stride * world, s.dim)
        for r, sd in enumerate(ranks):
            sd[key] = torch.cat(pieces[r::world], s.dim).clone()
    return ranks


def save(path, ranks: list[dict], iteration: int = 1000) -> Path:
    """Write per-rank dicts in the official layout (used by tests and to re-shard a checkpoint)."""
    path = Path(path)
    folder = path / str(iteration)
    folder.mkdir(parents=True, exist_ok=True)
    (path / TRACKER).write_text(f"{iteration}\n")
    for r, sd in enumerate(ranks):
        torch.save({"module": sd, "mp_world_size": len(ranks), "iteration": iteration},
                   folder / f"mp_rank_{r:02d}_model_states.pt")
    return path


def load_merged(path, rules, dtype: torch.dtype | None = None) -> dict:
    """load_shards + merge: the full (model-parallel size 1) state dict of a checkpoint."""
    return merge(load_shards(path), rules, dtype)


def materialize(model, state_dict: dict, what: str = "checkpoint"):
    """Put real tensors into a meta-built model; a CheckpointError on missing, extra or mis-shaped tensors."""
    expected = model.state_dict()
    tied = set(model.all_tied_weights_keys) if hasattr(model, "all_tied_weights_keys") else set()
    missing = sorted(set(expected) - set(state_dict) - tied)
    extra = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)}"
             for k in state_dict if k in expected and state_dict[k].shape != expected[k].shape]
    if missing or extra or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                 f"shape mismatch: {'; '.join(wrong[:5])}" if wrong else ""]
        raise CheckpointError(f"the {what} does not fit the model config: " + "; ".join(p for p in parts if p)
                              + ". Pass the config that matches the checkpoint (layers, d_model, heads, vocab).")
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()   # re-point tied embeddings at the assigned tensors
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"the {what} left tensors unset: {left[:5]}")
    return model.eval()
