"""How prefix deltas reach attention: a small table of joiners (`PREFIX_JOINS`).

A prefix delta returns n learned keys and values (projected space) and the joiner makes them visible
to every query of its attention module. Where they enter is chosen by what the attention module
offers, first match wins:

* `kv_prefix` attribute (deltakit's native CPM-Ant): the module asks for (k, v) itself, prepends
  them when it fills an empty cache, and gives their columns zero position bias.
* transformers' attention interface (BERT/XLM-R, GPT-2, T5/MT5 self and cross attention, LLaMA
  and every model whose attention calls `ALL_ATTENTION_FUNCTIONS`): the module gets its own
  shallow copy of the config whose attention implementation names a wrapper; the wrapper prepends
  the prefix to the keys and values the module hands to the attention function, pads the mask
  (and T5's position bias) with visible, zero-bias columns, and calls the implementation the model
  really uses (eager or sdpa). That point is after the k/v projections, after rotary embeddings
  and after the cache update, so
    - the prefix is never written into a cache: cached and uncached generation see the same keys;
    - prefix keys get no rotation and no position bias (they have no position), and the real tokens
      keep their positions. A rotary query's score against an unrotated key depends on the query's
      absolute position, so for families that count positions from 0 whatever the padding (LLaMA,
      GPT-2) a left-padded batch gets position ids counted from each row's first real token
      (`position_ids.py`): every example then sees what it sees alone, cached or not;
    - every mask the model builds (padding, causal, cross attention) stays as it is, plus n
      visible columns; a `None` mask that means "causal" to sdpa becomes an explicit causal mask.
  Hooks on the k/v projections would be simpler but break on every model that views the projected
  keys with the query length (LLaMA, BERT) and would put the prefix in the cache; a prefilled
  cache (PEFT's way) shifts every position by n and does not reach encoders.
* the cache update (transformers' CpmAnt, no attention interface): a forward pre-hook hands the
  module a stand-in cache whose `update()` returns the real cache's keys with the prefix in front,
  and pads its mask and position bias; the real cache never holds the prefix.
Flash-attention kernels (2D masks) are not supported: the wrapper raises a clear error.
Everything this reads of transformers beyond its documented interfaces is in `hf_compat.py`.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from .. import hf_compat as hf
from ..errors import KindError
from . import position_ids
from .base import Site, bind, join_site

_WRAPPER = "deltakit_prefix"


def prefix_kv(site, batch: int, heads: int, head_dim: int, like):
    """Concatenated (k, v) of the active prefix deltas at one site: (batch, heads, n, head_dim)."""
    ks, vs = [], []
    for e in site.active():
        k, v = e.module(batch)
        if e.module.gate is not None:   # a gate scales what the prefix contributes (its values)
            v = v * e.module.gate
        for t, out in ((k, ks), (v, vs)):
            t = t.to(like.dtype)
            t = t.reshape(t.shape[0], t.shape[1], heads, head_dim).transpose(1, 2)   # (b|1, H, n, hd)
            out.append(t.expand(batch, -1, -1, -1))
    return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


def _pad_mask(mask, n: int, q_len: int, k_len: int, causal: bool, device):
    """The module's mask with n visible columns in front (bool: True sees; float: 0 adds nothing)."""
    if mask is None:
        if not causal:
            return None
        i = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=device)[None, :] <= i)[None, None]
    if mask.dtype == torch.bool:
        return F.pad(mask, (n, 0), value=True)
    return F.pad(mask, (n, 0), value=0.0)


# ---- joiner 1: the native model's kv_prefix attribute --------------------------------------------

class NativeSite(Site):
    attr = "_deltakit_prefix_site"

    def __init__(self, module):
        super().__init__(module)
        module.kv_prefix = self.kv

    def kv(self, batch):
        m = self.holder
        if not self.active():
            return (m.project_k.weight.new_zeros(batch, m.num_heads, 0, m.dim_head),) * 2
        return prefix_kv(self, batch, m.num_heads, m.dim_head, m.project_k.weight)

    def remove(self):
        self.holder.kv_prefix = None


# ---- joiner 2: transformers' attention interface -------------------------------------------------

def _prefix_attention(module, query, key, value, attention_mask, *args, **kwargs):
    site = module.__dict__[InterfaceSite.attr]
    impl = hf.attention_implementation(site.config)
    if impl and "flash" in impl:
        raise KindError(f"prefix deltas need an attention implementation that takes a 4D mask (eager, sdpa); "
                        f"this model uses {impl!r}: load it with attn_implementation='sdpa'")
    inner = hf.attention_functions().get_interface(impl, site.eager)
    if site.active():
        pk, pv = prefix_kv(site, key.shape[0], key.shape[1], key.shape[-1], key)
        n, q_len, k_len = pk.shape[2], query.shape[2], key.shape[2]
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        # eager never treats a missing mask as causal; sdpa does when there is more than one query
        causal = causal and q_len > 1 and impl not in (None, "eager")
        attention_mask = _pad_mask(attention_mask, n, q_len, k_len, causal, query.device)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if kwargs.get("position_bias") is not None:   # T5: prefix columns carry no position bias
            kwargs["position_bias"] = F.pad(kwargs["position_bias"], (n, 0))
    return inner(module, query, key, value, attention_mask, *args, **kwargs)


class InterfaceSite(Site):
    attr = "_deltakit_prefix_site"

    def __init__(self, module):
        from transformers import AttentionInterface
        super().__init__(module)
        if _WRAPPER not in hf.attention_functions():
            AttentionInterface.register(_WRAPPER, _prefix_attention)
        self.config, self.eager = module.config, hf.eager_attention(module)
        # this module only: the model and the other layers keep their config
        module.config = hf.with_attention_implementation(module.config, _WRAPPER)

    def remove(self):
        self.holder.config = self.config


# ---- joiner 3: a stand-in cache (transformers' CpmAnt) -------------------------------------------

class _PrefixedCache:
    """Looks like the module's cache to it: update() stores the real keys in the real cache (if any)
    and returns them with the prefix in front."""

    def __init__(self, cache, pk, pv):
        self.cache, self.pk, self.pv = cache, pk, pv

    def __getattr__(self, name):   # anything else the module asks of its cache: the real one answers
        if self.__dict__.get("cache") is None:
            raise AttributeError(name)
        return getattr(self.cache, name)

    def update(self, key, value, layer_idx, *args, **kwargs):
        if self.cache is not None:
            key, value = self.cache.update(key, value, layer_idx, *args, **kwargs)
        return torch.cat([self.pk, key], dim=2), torch.cat([self.pv, value], dim=2)


class CacheSite(Site):
    attr = "_deltakit_prefix_site"

    def __init__(self, module):
        super().__init__(module)
        self.signature = inspect.signature(module.forward)
        self.hooks = [module.register_forward_pre_hook(self.before, with_kwargs=True)]

    def before(self, mod, args, kwargs):
        if not self.active():
            return None
        a = bind(self.signature, args, kwargs, mod)
        heads, dim_head = getattr(mod, hf.CPMANT_HEADS), getattr(mod, hf.CPMANT_HEAD_DIM)
        key = getattr(mod, hf.CPMANT_KEY).weight
        pk, pv = prefix_kv(self, a[hf.CPMANT_QUERY_ARG].shape[0], heads, dim_head, key)
        n = pk.shape[2]
        a[hf.CPMANT_MASK_ARG] = F.pad(a[hf.CPMANT_MASK_ARG], (n, 0), value=True)
        a[hf.CPMANT_BIAS_ARG] = F.pad(a[hf.CPMANT_BIAS_ARG], (n, 0))
        hf.set_cache(a, self.signature, _PrefixedCache(hf.passed_cache(a), pk, pv))
        return (), a


# Which joiner an attention module gets: (what it offers, site); the first that matches wins.
PREFIX_JOINS = (
    ("a kv_prefix attribute (native CPM-Ant)", lambda m, fam: hasattr(m, "kv_prefix"), NativeSite),
    ("transformers' attention interface", lambda m, fam: hf.calls_attention_interface(m), InterfaceSite),
    ("a cache update its family names (transformers' CpmAnt)",
     lambda m, fam: fam is not None and type(m).__name__ in fam.prefix_cache, CacheSite),
)


def prefix_joiner(module, family):
    """The site class that joins prefixes to this attention module of a `family` model, or None."""
    return next((site for _, offers, site in PREFIX_JOINS if offers(module, family)), None)


def install(entry, model):
    module = model.get_submodule(entry.position.path)
    joiner = prefix_joiner(module, entry.handle.family)
    if joiner is None:
        raise KindError(f"prefix deltas cannot join {type(module).__name__} at {entry.position.name!r}: it offers "
                        f"none of {', '.join(w for w, _, _ in PREFIX_JOINS)}")
    join_site(entry, module, joiner)
    entry.target = module
    position_ids.install(entry, model)
