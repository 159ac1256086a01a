"""One matmul for the LoRAs that read the same tensor.

q, k and v of an attention read the same hidden states. A LoRA's first step is t = x A^T, a thin
matmul whose cost is reading x; for LoRAs at q and v it is done once, as x [A_q; A_v]^T, by the
first of them to run, and each takes its columns. Its backward then reads x once and writes one
gradient for it instead of two (benchmarks/RESULTS.md: LoRA's overhead). Which positions read one
tensor is family data (`Family.same_input`); the tensor is also checked by identity, so a member
handed another tensor computes its own t, and whatever is left over is dropped when the module
holding them all returns (or raises), so nothing outlives the forward it was computed in.

A delta takes part by having `down` (the (r, in) matrix of its first matmul) and
`add_into(out, x, t)` (deltas/lora.py).
"""
from __future__ import annotations

import torch

from .base import common_parent


def can_share(entry, x) -> bool:
    m = entry.module
    return (entry.active and m.gate is None and entry.position.slice is None and hasattr(m, "down")
            and getattr(m, "dropout", None) is None and x.dtype == m.down.dtype)


class SharedInput:
    """The entries of one handle at positions of one layer that read one tensor."""

    def __init__(self, entries):
        self.entries = entries
        self.x, self.parts = None, {}

    def part(self, entry, x):
        """This entry's x @ down^T, computed with the others' on first use; None: compute it alone."""
        if self.x is not x:
            members = [e for e in self.entries if can_share(e, x)]
            if entry not in members or len(members) < 2:
                return None
            t = x @ torch.cat([e.module.down for e in members]).t()
            self.x = x
            self.parts = dict(zip(members, t.split([e.module.down.shape[0] for e in members], dim=-1)))
        part = self.parts.pop(entry, None)
        if not self.parts:
            self.x = None
        return part

    def clear(self, *args):
        self.x, self.parts = None, {}


def share_inputs(entries, family, model):
    """Group a handle's entries that read one tensor, as the family's `same_input` says."""
    if family is None:
        return
    groups: dict = {}
    for e in entries:
        pos = e.position
        if e.join != "parallel" or pos.layer is None or not hasattr(e.module, "down"):
            continue
        for i, names in enumerate(family.same_input):
            if pos.local in names:
                groups.setdefault((pos.stack, pos.layer, i), []).append(e)
    for members in groups.values():
        if len({e.position.path for e in members}) < 2:
            continue
        group = SharedInput(members)
        parent = model.get_submodule(common_parent([e.position.path for e in members]))
        hook = parent.register_forward_hook(group.clear, always_call=True)
        for e in members:
            e.shared_input = group
            e.undo.insert(0, hook.remove)   # undone last, after the entry leaves its site
