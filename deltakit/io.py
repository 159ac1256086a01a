"""Writing files so that a crash never leaves a half-written one: deltas, search checkpoints and
outputs, benchmark results and CUGE runs all go through `atomic_write`."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _file_mode() -> int:
    """What a plain open() would give a new file: 0o666 less the umask (some writers, safetensors
    among them, create their file 0o600, which a shared results folder should not get)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def atomic_write(path, write) -> Path:
    """write(tmp_path), fsync, then rename over `path` (its folder is created): a crash (kill -9, or
    power loss once the rename is synced) leaves the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, _MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:   # make the rename itself durable (not possible on every platform/filesystem)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path, text: str) -> Path:
    """`text` as UTF-8, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj) -> Path:
    """`obj` as indented UTF-8 JSON, atomically."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


# ---- resumable runs: tensors + JSON state in one safetensors file ------------------------------------

def write_state(path, tensors: dict, state: dict, format: str) -> Path:
    """`tensors` and the JSON-able `state` in one safetensors file (the state in its metadata, beside
    `format`), atomically: what a run resumes from. Nothing in it needs unpickling."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": format, "state": json.dumps(state)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_state(path, format: str, what: str, error: type, hint: str = "delete it to start over"):
    """(tensors, state) written by `write_state` with this `format`, or None when there is no file yet.
    A file of another format, or one that cannot be read, raises `error` naming `what` it should be
    and the `hint` (how to start over): never a guess at a damaged file."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != format:
                raise error(f"{path} is not a {what} (format {meta.get('format')!r}, expected {format!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return tensors, json.loads(meta["state"])
    except error:
        raise
    except Exception as e:   # a foreign or damaged file
        raise error(f"cannot read the {what} {path}: {e}; {hint}") from None


def rng_state() -> tuple[dict, dict]:
    """The torch, Python `random` and numpy global RNG states, as (tensors, JSON) for `write_state`."""
    import random

    import numpy as np
    import torch
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py = random.getstate()
    return ({"rng.torch": torch.get_rng_state()},
            {"python": [py[0], list(py[1]), py[2]], "numpy": [kind, keys.tolist(), pos, has_gauss, cached]})


def set_rng_state(tensors: dict, state: dict):
    """Restore what `rng_state` gave (its tensors and its JSON part)."""
    import random

    import numpy as np
    import torch
    torch.set_rng_state(tensors["rng.torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
