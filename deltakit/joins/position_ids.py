"""Position ids counted from each row's first real token, while a prefix or prompt delta is active.

Some families number positions 0, 1, ... whatever the padding (LLaMA, GPT-2: `counted_positions`
in their family table).
Prefix keys have no position, so a rotary query must sit where it would sit alone, and a prompt
must sit right before the real tokens: with left padding, these stacks get position ids counted
from each row's first real token (what the example alone gets). Without padding, or with right
padding, those ids are the model's own 0, 1, ... at every real token, so they are always passed
(testing the mask for left padding would cost a device sync on every forward).
"""
from __future__ import annotations

import inspect

from .base import Site, bind, join_site

class PositionSite(Site):
    attr = "_deltakit_position_site"

    def __init__(self, model):
        super().__init__(model)
        self.stack = getattr(model, "base_model", model)
        self.signature = inspect.signature(self.stack.forward)
        self.hooks = [self.stack.register_forward_pre_hook(self.before, with_kwargs=True)]

    def before(self, module, args, kwargs):
        if not self.active():
            return None
        a = bind(self.signature, args, kwargs, module)
        mask, x = a.get("attention_mask"), a.get("input_ids")
        x = a.get("inputs_embeds") if x is None else x
        if a.get("position_ids") is not None or mask is None or mask.dim() != 2 or x is None:
            return None   # given by the caller, or nothing to count from
        a["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
        return (), a


def install(entry, model):
    fam = entry.handle.family
    if fam is not None and fam.counted_positions:
        join_site(entry, model, PositionSite)
