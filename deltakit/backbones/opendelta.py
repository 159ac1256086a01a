"""Load LoRA deltas saved by CPM-Live's OpenDelta recipe (`LoraModel(model, modified_modules=
["project_q", "project_v"])`) into a deltakit handle.

Such checkpoints hold `<module path>.lora.lora_A` [r, in] and `.lora.lora_B` [out, r] next to (or
without) the backbone's own tensors; OpenDelta's LoRA adds (alpha / r) B A x to the module's output,
exactly what deltakit's LoRA does, so the tensors are copied as they are. OpenDelta's defaults are
r=8, alpha=16; pass `alpha` when the run used another.
"""
from __future__ import annotations

from collections import defaultdict

import deltakit
from ..errors import CheckpointError
from .cpmant import read_state_dict


def load_opendelta_lora(model, checkpoint, alpha: float = 16.0, name: str = "default"):
    """Attach the LoRA deltas of an OpenDelta checkpoint (path or dict of tensors) to `model`."""
    sd = read_state_dict(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    lora = defaultdict(dict)
    for key, tensor in sd.items():
        head, sep, leaf = key.rpartition(".lora.")
        if sep and leaf in ("lora_A", "lora_B"):
            lora[head][leaf] = tensor
    if not lora:
        raise CheckpointError("no OpenDelta LoRA tensors (keys ending in '.lora.lora_A' / '.lora.lora_B') in the checkpoint")
    by_path = {p.path: p for p in deltakit.positions(model)}
    found, ranks = {}, set()   # canonical position name -> OpenDelta module path
    for path, pair in sorted(lora.items()):
        # a checkpoint saved from a wrapped model may carry a prefix such as `module.`: match by suffix
        pos = by_path.get(path) or next((p for q, p in by_path.items() if path.endswith("." + q)), None)
        if pos is None:
            raise CheckpointError(f"OpenDelta LoRA on {path!r}: no such projection in this model")
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"OpenDelta LoRA on {path!r} lacks {({'lora_A', 'lora_B'} - set(pair)).pop()}")
        ranks.add(pair["lora_A"].shape[0])
        found[pos.name] = path
    if len(ranks) != 1:
        raise CheckpointError(f"OpenDelta LoRA ranks differ between modules ({sorted(ranks)}): one rank per checkpoint expected")
    handle = deltakit.attach(model, f"lora(r={ranks.pop()},alpha={alpha})@{','.join(found)}", name=name)
    handle.load_state_dict({f"{pos_name}.lora.{leaf}": lora[path][leaf]
                            for pos_name, path in found.items() for leaf in ("lora_A", "lora_B")})
    return handle
