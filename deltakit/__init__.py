"""deltakit: put parameter-efficient deltas (LoRA, adapters, prefixes, prompts, hypernetworks, BitFit, ...) at any position
of a frozen pretrained model, first of all the CPM family, and search where they should go.

    import deltakit
    h = deltakit.attach(model, "lora(r=8,alpha=16)@attn.q,attn.v; adapter(dim=64)@ffn")
    h.summary(); h.save("out"); h.merge(); h.detach()
"""
from .deltas import TYPES as delta_types, Delta, DeltaType, register
from .errors import (CallError, CheckpointError, DeltakitError, HandleError, KindError, OptionError, PatternError,
                     SpecError, UnknownDeltaType)
from .handle import Handle, attach, backbone_state_dict, get, handles, load
from .plan import Plan, Planned, SharedPlan, plan
from .positions import Position, backbone_params, positions

__version__ = "0.1.0"


def show(model, **kwargs):
    """Print the model as a tree with repeated layers folded and deltas marked (see deltakit.show)."""
    from .tree import show as _show
    return _show(model, **kwargs)


__all__ = ["attach", "load", "plan", "positions", "show", "get", "handles", "register", "delta_types",
           "backbone_params", "backbone_state_dict", "Handle", "Plan", "Planned", "SharedPlan", "Position", "Delta",
           "DeltaType", "DeltakitError", "SpecError", "UnknownDeltaType", "OptionError", "PatternError", "KindError",
           "CheckpointError", "HandleError", "CallError"]
