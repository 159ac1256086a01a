"""Every place deltakit depends on more of transformers than its documented interfaces.

transformers renames things between releases (5.24 renamed every forward's `past_key_values`
argument and output field to `cache`). Each reach below is named for what it is, so the next
rename is a one-line change here and nowhere else. Supported releases: see README ("Supported
transformers"); `.ci/run` tests the newest and the oldest.

Public interfaces used elsewhere, and not wrapped here: `AttentionInterface` /
`ALL_ATTENTION_FUNCTIONS` (the attention interface), `Cache.update` / `Cache.get_seq_length`.
"""
from __future__ import annotations

import sys

# ---- all families: the cache argument and output field ------------------------------------------

# The names a forward's cache argument (and a model output's cache field) has had, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def cache_arg(signature) -> str:
    """The name under which this forward takes its cache (newest name if it takes **kwargs only)."""
    for name in CACHE_NAMES:
        if name in signature.parameters:
            return name
    return CACHE_NAMES[0]


def passed_cache(args: dict):
    """The cache a call was given, under whichever name the caller used."""
    for name in CACHE_NAMES:
        if args.get(name) is not None:
            return args[name]
    return None


def set_cache(args: dict, signature, cache) -> None:
    """Give a call `cache` under the name its forward reads, and drop the other names."""
    for name in CACHE_NAMES:
        args.pop(name, None)
    args[cache_arg(signature)] = cache


def output_cache(out):
    """The cache a model output carries (`out.cache` from 5.24, `out.past_key_values` before)."""
    for name in CACHE_NAMES:
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


# ---- all families: which attention implementation one module uses ------------------------------

def attention_functions():
    """transformers' registry of attention implementations (the attention interface)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS


def calls_attention_interface(module) -> bool:
    """Does this attention module dispatch through the attention interface? Its modeling file
    imports ALL_ATTENTION_FUNCTIONS and the module keeps the config that names the implementation."""
    cfg = getattr(module, "config", None)
    source = sys.modules.get(type(module).__module__)
    return cfg is not None and hasattr(cfg, "_attn_implementation") and hasattr(source, "ALL_ATTENTION_FUNCTIONS")


def attention_implementation(config) -> str | None:
    return config._attn_implementation


def with_attention_implementation(config, name: str):
    """A shallow copy of `config` whose attention implementation is `name`. The internal field is
    written, not the `_attn_implementation` setter: the setter also rewrites sub-configs, which
    the copy shares with the model's other modules."""
    import copy
    own = copy.copy(config)
    own._attn_implementation_internal = name
    return own


def eager_attention(module):
    """The module's own eager attention function: each modeling file defines one, none is registered."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


# ---- CpmAnt (transformers' `CpmAntAttention`): no attention interface ---------------------------
# (which classes get which join is data in families.CPMANT; these are the internals the join reads)

# CpmAntAttention's attribute and argument names the prefix join uses
CPMANT_HEADS, CPMANT_HEAD_DIM, CPMANT_KEY = "num_heads", "dim_head", "project_k"
CPMANT_QUERY_ARG, CPMANT_MASK_ARG, CPMANT_BIAS_ARG = "hidden_q", "attention_mask", "position_bias"
