"""What a rank holds of a model sharded by `shard`, computed from the model (built on the meta
device it costs nothing: `cpmant.build("cpm-ant-10b", torch.bfloat16, "meta")` + attach).

Per rank, before activations:
* its shard of every parameter (FSDP pads dim 0 to a multiple of the shard count);
* the root's parameters gathered whole (embeddings, final norm, LM head: the root keeps them
  through the step);
* `prefetch` blocks gathered at a time (the one running and the next, which FSDP gathers early);
* the deltas' gradients and optimizer state, sharded like the deltas (AdamW: 2 states per value).
Gathered tensors are in the compute dtype (`param_dtype`, bf16 on GPUs), shards in their own.
"""
from __future__ import annotations

import torch

from ..positions import backbone_params
from .shard import find_blocks


def _shard_bytes(p, shards: int) -> int:
    rows = p.shape[0] if p.dim() else 1
    return -(-rows // shards) * (p.numel() // max(rows, 1)) * p.element_size()


def memory_per_rank(model, shards: int, compute_dtype: torch.dtype | None = torch.bfloat16, prefetch: int = 2,
                    optimizer_states: int = 2, blocks: list[str] | None = None) -> dict:
    """Bytes per rank when `model` (deltas attached) is sharded over `shards` ranks (with HSDP: the
    ranks of one node). Keys: backbone_shard, deltas (values, gradients and optimizer state),
    root_gathered, blocks_gathered, total; and backbone_whole, what one process holds of the backbone."""
    paths = blocks if blocks is not None else find_blocks(model)
    in_blocks = {id(p) for path in paths for p in model.get_submodule(path).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    gathered = lambda ps: sum(p.numel() * (torch.finfo(compute_dtype).bits // 8 if compute_dtype and
                                           p.is_floating_point() else p.element_size()) for p in ps)
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    per_block = sorted((gathered(model.get_submodule(path).parameters()) for path in paths), reverse=True)
    out = {
        "backbone_shard": sum(_shard_bytes(p, shards) for _, p in backbone_params(model)),
        "deltas": sum(_shard_bytes(p, shards) for p in trainable) * (2 + optimizer_states),
        "root_gathered": gathered(root),   # FSDP gathers into separate buffers at any number of ranks
        "blocks_gathered": sum(per_block[:prefetch]),
        "backbone_whole": sum(p.numel() * p.element_size() for _, p in backbone_params(model)),
    }
    out["total"] = out["backbone_shard"] + out["deltas"] + out["root_gathered"] + out["blocks_gathered"]
    return out
