"""shard(): FSDP2's `fully_shard` on every transformer block of a model with deltas, then on the root.

* One unit per block (the layer stacks of the model's family table, `families.py`: CPM-Ant layers,
  T5/MT5/CPM-2 encoder and decoder blocks, BERT/GPT-2/LLaMA layers), then the root, which keeps the
  rest: embeddings (CPM-2 shares one between encoder, decoder and nothing else), final norms, the
  LM head, and the model-level `deltakit` holder (prompts, hypernetworks). A block's parameters
  are gathered before its forward and freed after it, so a rank holds 1/N of the backbone plus a
  block or two at a time.
* Every deltakit hook site and delta module is strictly inside a unit: the hooks run while the
  unit's parameters are gathered (plain tensors, as in a single process), and the delta's
  parameters belong to the unit that runs them, so FSDP reduce-scatters their gradients. A block
  that itself carries hooks or deltas is refused, as is a delta whose hooks run in another block.
* Frozen parameters get no gradient: only the deltas' gradients are reduced, and only they get
  optimizer state (build the optimizer after shard: sharding replaces every parameter). FSDP
  needs one dtype among a unit's trainable parameters; that is checked here, with names. FSDP
  fixes each unit's reduce dtype at the first forward from what is trainable then: do not unfreeze
  parameters afterwards.
* Activation checkpointing inside, the FSDP unit outside (`_checkpoint`: non-reentrant, the RNG
  state kept so dropout masks repeat). The deltas' hooks run again in the recompute; they keep no
  state across forwards, so that is harmless.
"""
from __future__ import annotations

import re
import warnings

import torch

from ..errors import HandleError, listing
from ..joins.base import Site
from ..joins.position_ids import PositionSite
from ..positions import HOLDER, backbone_modules, family, is_backbone
from . import group
from .group import DistributedError
from .tensors import is_sharded, plain_class_name


def find_blocks(model) -> list[str]:
    """Module paths of the model's transformer blocks, from its family table ([] if it has none)."""
    fam = family(model)
    if fam is None:
        return []
    names = list(backbone_modules(model))
    found = []
    for layer_re in fam.stacks.values():
        pattern = re.compile(rf"(?:(.*)\.)?{layer_re}\.\d+")
        hits = [(m.group(1) or "", n) for n in names if (m := pattern.fullmatch(n))]
        found += [n for prefix, n in hits if prefix == hits[0][0]] if hits else []
    return found


def default_mp_policy(mesh):
    """On GPUs the backbone computes in bf16 and gradients are reduced in fp32; elsewhere every
    tensor computes in its own dtype (the trainable ones are fp32 anyway)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if mesh.device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(model, mesh=None, mp_policy=None, reshard_after_forward=None, checkpointing: bool = False,
          offload: str | None = None, blocks: list[str] | None = None):
    """Shard `model` (deltas attached already) over `mesh` (default: every rank, `group.mesh()`; a 2-D
    mesh shards inside a node and replicates across nodes). mp_policy: FSDP's MixedPrecisionPolicy
    (default: `default_mp_policy`); reshard_after_forward: for the blocks (FSDP's default: True);
    checkpointing: activation checkpointing per block; offload="cpu": the shards, their gradients
    and optimizer states live in CPU memory (FSDP's CPUOffloadPolicy); blocks: module paths to shard
    one by one instead of the family table's layers. Returns the model, changed in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    if is_sharded(model):
        raise HandleError(f"this {plain_class_name(model)} is sharded already")
    if offload not in (None, "cpu"):
        raise DistributedError(f"offload={offload!r}: use None or 'cpu'")
    paths = list(blocks) if blocks is not None else find_blocks(model)
    if not paths:
        raise DistributedError(f"no transformer blocks found in this {type(model).__name__} (its family is not in "
                               f"deltakit's tables): pass blocks=[module paths], e.g. the entries of its layer list")
    units = _units(model, paths)
    check_layout(model, units)
    check_dtypes(model, units)
    mesh = mesh if mesh is not None else group.mesh()
    # the native CPM-Ant's blocks return their key/value cache as views, which nothing changes in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPTransformerBlock|FSDPCPMAnt)\) "
                                              r"returned a view tensor")
    mp = mp_policy if mp_policy is not None else default_mp_policy(mesh)
    off = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if offload == "cpu" else OffloadPolicy()
    for path in units:
        unit = _checkpoint(units[path]) if checkpointing else units[path]
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward, offload_policy=off)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=off)   # the root keeps its parameters gathered
    return model


def _units(model, paths) -> dict:
    units = {}
    for path in paths:
        try:
            units[path] = model.get_submodule(path)
        except AttributeError:
            raise DistributedError(f"blocks: {path!r} is not a module of this {type(model).__name__}") from None
    nested = [f"{a} inside {b}" for a in units for b in units if a != b and a.startswith(f"{b}.")]
    if nested or "" in units or len(units) < len(paths):
        raise DistributedError(f"blocks must be distinct, non-nested submodules (not the model itself): "
                               f"{listing(nested, 4) or 'a path is given twice or is empty'}")
    return units


def _unit_of(name: str, units) -> str:
    """The innermost unit holding the module `name` ("" = the root)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in units:
            return prefix
    return ""


def check_layout(model, units: dict):
    """Sites and delta modules strictly inside units, and each delta run by the unit that owns it."""
    carried, owner = {}, {}
    for name, m in model.named_modules():
        owner[id(m)] = _unit_of(name, units)
        if not is_backbone(name):
            carried[id(m)] = f"{name} is part of a delta"
        elif HOLDER in m._modules:
            carried[id(m)] = f"{name} holds deltas"
        elif any(isinstance(v, Site) for v in vars(m).values()):
            carried[id(m)] = f"{name} carries deltakit hooks"
    bad = [carried[id(u)] for u in units.values() if id(u) in carried]
    if bad:
        raise DistributedError(f"a sharded block must not carry deltas or their hooks itself (they must lie inside it, so "
                               f"they run while its parameters are gathered): {listing(bad, 4)}. Shard the module "
                               f"that contains it (blocks=...), or place the delta on a submodule")
    for name, m in model.named_modules():
        # a position-id site only reads whether its entries are active; the others run the delta modules
        for site in (v for v in vars(m).values() if isinstance(v, Site) and not isinstance(v, PositionSite)):
            for e in site.entries:
                home = owner.get(id(e.module), "")
                if home not in ("", owner[id(m)]):   # the root's parameters stay gathered for the whole step
                    raise DistributedError(f"the delta {e.key} belongs to block {home!r} but runs in "
                                           f"{owner[id(m)] or 'the root'!r}; its parameters would not be gathered "
                                           f"there: shard the blocks so that both lie in one")


def check_dtypes(model, units: dict):
    """FSDP reduces a unit's gradients in one dtype: a unit whose trainable parameters mix dtypes is an
    error here, naming them (FSDP itself would fail at the first forward, without names)."""
    claimed, groups = set(), []
    for path, unit in list(units.items()) + [("", model)]:
        prefix = f"{path}." if path else ""
        own = [(prefix + n, p) for n, p in unit.named_parameters() if id(p) not in claimed]
        claimed.update(id(p) for _, p in own)
        groups.append((path or "the root", own))
    for where, params in groups:
        dtypes = {}
        for n, p in params:
            if p.requires_grad:
                dtypes.setdefault(p.dtype, []).append(n)
        if len(dtypes) > 1:
            mix = "; ".join(f"{str(d).replace('torch.', '')}: {listing(ns, 3)}" for d, ns in dtypes.items())
            raise DistributedError(f"the trainable parameters of {where} mix dtypes ({mix}); FSDP reduces one unit's "
                                   f"gradients in one dtype. Keep every trainable parameter in float32 (deltas are "
                                   f"by default; .float() any backbone parameter you unfroze)")


def _checkpoint(unit):
    """Activation checkpointing of one block, as hooks on the block itself (torch's composable
    `checkpoint`: non-reentrant, the RNG state kept so dropout masks repeat). Unlike
    `checkpoint_wrapper` it leaves module and parameter names alone, so positions, handle keys,
    fingerprints and state_dict keys stay as in a single process. Applied before fully_shard, its
    hooks run inside FSDP's: the block is gathered, then checkpointed."""
    from torch.distributed._composable import checkpoint
    return checkpoint(unit, preserve_rng_state=True)
