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
