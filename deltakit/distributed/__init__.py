"""deltakit.distributed: a frozen backbone sharded over processes by PyTorch FSDP2 (`fully_shard`,
launched by torchrun), with only the deltas in gradients and optimizer state.

    from deltakit import distributed as dist
    dist.init()                                           # the process group torchrun describes
    model = build(); h = deltakit.attach(model, spec)     # 1. the deltas
    dist.shard(model, checkpointing=True)                 # 2. shard (a 2-D mesh: dist.mesh(nodes="auto"))
    opt = torch.optim.AdamW(h.parameters(), lr=1e-4)      # 3. the optimizer, over the sharded deltas
    with dist.guard("training"):
        ...                                               # every rank: its batches (dist.sampler)
    h.save("out")                                         # every rank calls it; rank 0 writes

Or build, attach and shard in one go without the whole model in memory: `dist.load_sharded`.
After sharding, attach / load / detach / merge raise a HandleError; `h.state_dict()`,
`h.load_state_dict()` and `h.save()` work on the shards and are collectives (every rank calls them).

    group.py    init, rank, world_size, mesh, on_main (rank-0 work), guard (a dead rank: an error, not a hang)
    shard.py    shard(): fully_shard per transformer block, then the root; the layout and dtype checks
    tensors.py  DTensor helpers the engine uses (gather a delta whole, write a rank's slice), the guards
    load.py     load_sharded(): meta build, shard, each rank reads its slices; to_safetensors
    memory.py   memory_per_rank(): what a rank holds, computed from a (meta) model
    state.py    save_state / load_state: deltas + optimizer state + step, at any world size
    data.py     sampler, split, share, reduce, gather, lockstep / generate_in_lockstep
"""
from .data import gather, generate_in_lockstep, lockstep, reduce, sampler, share, split
from .group import (DistributedError, barrier, device, guard, init, is_distributed, is_main, local_rank, mesh, on_main,
                    rank, shutdown, world_size)
from .load import load_sharded, read_checkpoint, to_safetensors
from .memory import memory_per_rank
from .shard import check_dtypes, check_layout, default_mp_policy, find_blocks, shard
from .state import load_state, save_state
from .tensors import full_tensor, is_dtensor, is_sharded, like, local_slice, reshard

__all__ = ["init", "shutdown", "rank", "world_size", "local_rank", "is_main", "is_distributed", "device", "mesh",
           "barrier", "on_main", "guard", "DistributedError", "shard", "find_blocks", "default_mp_policy",
           "check_layout", "check_dtypes", "is_sharded", "is_dtensor", "full_tensor", "local_slice", "like", "reshard", "load_sharded",
           "read_checkpoint", "to_safetensors", "memory_per_rank", "save_state", "load_state", "sampler", "split", "share", "reduce", "gather",
           "lockstep", "generate_in_lockstep"]
