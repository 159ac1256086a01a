"""The delta checkpoint files: `deltas.safetensors` + `deltakit.json` (spec, options, a backbone
fingerprint, versions). Only reading and writing them (`deltakit.load` composes plan + attach +
these); files are written atomically, nothing is unpickled on load."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch

from .distributed.group import on_main
from .distributed.tensors import is_sharded, leading_values, plain_class_name, plain_name
from .errors import CheckpointError, listing
from .io import atomic_write, write_text
from .positions import backbone_params, family

FORMAT = "deltakit-deltas"
VERSION = 1
WEIGHTS, CONFIG = "deltas.safetensors", "deltakit.json"


def fingerprint(model, entries) -> dict:
    params = backbone_params(model)
    structure = hashlib.sha256("\n".join(f"{plain_name(n)}:{tuple(p.shape)}" for n, p in params).encode()).hexdigest()
    sample = hashlib.sha256()
    for e in entries:   # a few values of every targeted module: tells checkpoints apart cheaply
        for p in _module_params(model, e.position.path):
            if p.device.type == "meta":
                sample = None
                break
            sample.update(leading_values(p, 16).float().cpu().numpy().tobytes())   # sharded: a collective
        if sample is None:
            break
    fam = family(model)
    return {"class": plain_class_name(model), "family": fam.name if fam else "generic",
            "num_params": sum(p.numel() for _, p in params), "structure": structure,
            "sample": sample.hexdigest() if sample is not None else None}


def _module_params(model, path):
    module = model.get_submodule(path) if path else model
    return [p for n, p in module.named_parameters(recurse=False)]


def _versions() -> dict:
    import importlib.metadata as md
    out = {"torch": torch.__version__}
    for name in ("deltakit", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def describe(handle) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "name": handle.name, "spec": handle.spec,
        "entries": [{"key": e.key, "position": e.position.name, "path": e.position.path, "type": e.type.name,
                     "options": dataclasses.asdict(e.options), "shape": list(e.position.shape),
                     "num_params": e.num_params} for e in handle.entries],
        "shared": [{"rule": rule, "type": handle.shared_plans[rule].type.name,
                    "num_params": sum(p.numel() for p in m.parameters())} for rule, m in handle.shared_modules.items()],
        "fingerprint": fingerprint(handle.model, handle.entries),
        "versions": _versions(),
    }


def save(handle, path) -> Path:
    """On a sharded model every rank calls this: the deltas are gathered (nothing of the backbone) and
    rank 0 writes."""
    from safetensors.torch import save_file
    if not handle.entries:
        raise CheckpointError(f"handle {handle.name!r} has no deltas to save (detached?)")
    folder = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in handle.state_dict().items()}
    config = json.dumps(describe(handle), indent=2, ensure_ascii=False)

    def write():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
        write_text(folder / CONFIG, config)   # written last
    if is_sharded(handle.model):
        on_main(write)
    else:
        write()
    return folder


def read_config(path) -> dict:
    folder = Path(path)
    file = folder / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{folder} is not a deltakit checkpoint: {CONFIG} is missing "
                              f"(saved with h.save(path), or a PEFT folder with adapter_config.json?)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a deltakit delta checkpoint (format {FORMAT!r} expected)")
    if config.get("version", 0) > VERSION:
        raise CheckpointError(f"{file} was written by a newer deltakit (checkpoint version {config['version']}, "
                              f"this one reads up to {VERSION}); upgrade deltakit")
    return config


def read_tensors(path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    file = Path(path) / WEIGHTS
    try:
        return load_file(str(file))
    except (FileNotFoundError, SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {e}") from None


def check_fits(model, config: dict, planned, path):
    """A CheckpointError that says what differs when the saved deltas do not fit `planned`."""
    planned = {p.key: p for p in planned}
    saved = {e["key"]: e for e in config["entries"]}
    missing = sorted(set(saved) - set(planned))
    extra = sorted(set(planned) - set(saved))
    wrong = [f"{k} (saved {tuple(saved[k]['shape'])}, here {tuple(planned[k].position.shape)})"
             for k in saved if k in planned and tuple(saved[k]["shape"]) != tuple(planned[k].position.shape)]
    if missing or extra or wrong:
        fp = config.get("fingerprint", {})
        raise CheckpointError(
            f"the deltas in {path} do not fit this {type(model).__name__} (they were trained on a "
            f"{fp.get('class', '?')} with {fp.get('num_params', 0):,} parameters): "
            + "; ".join(part for part in (
                missing and f"positions missing here: {listing(missing, 6)}",
                extra and f"positions only here: {listing(extra, 6)}",
                wrong and f"shapes differ: {listing(wrong, 6)}") if part))


def warn_if_backbone_differs(model, handle, config: dict, path):
    here, there = fingerprint(model, handle.entries), config.get("fingerprint", {})
    if there.get("structure") and here["structure"] != there["structure"]:
        warnings.warn(f"the backbone's parameter names or shapes differ from the one the deltas in {path} were "
                      f"saved from ({there.get('class')}); the targeted positions fit, so they were loaded", stacklevel=3)
    elif there.get("sample") and here["sample"] and here["sample"] != there["sample"]:
        warnings.warn(f"the backbone's weights differ from the ones the deltas in {path} were trained on "
                      f"(another checkpoint of the same architecture?)", stacklevel=3)
