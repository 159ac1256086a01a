"""How prefix deltas reach attention and prompt deltas reach the input: a small table of joiners.

Prefix (`join="prefix"`). A prefix delta returns n learned keys and values (projected space) and
the joiner makes them visible to every query of its attention module. Where they enter is chosen
by what the attention module offers, first match wins (`PREFIX_JOINS`):

* `kv_prefix` attribute (deltakit's native CPM-Ant): the module asks for (k, v) itself, prepends
  them when it fills an empty cache, and gives their columns zero position bias.
* transformers' attention interface (BERT/XLM-R, GPT-2, T5/MT5 self and cross attention, LLaMA
  and every model whose attention calls `ALL_ATTENTION_FUNCTIONS`): the module gets its own
  shallow copy of the config whose `_attn_implementation` names a wrapper; the wrapper prepends
  the prefix to the keys and values the module hands to the attention function, pads the mask
  (and T5's position bias) with visible, zero-bias columns, and calls the implementation the model
  really uses (eager or sdpa). That point is after the k/v projections, after rotary embeddings
  and after the cache update, so
    - the prefix is never written into a cache: cached and uncached generation see the same keys;
    - prefix keys get no rotation and no position bias (they have no position), and the real tokens
      keep their positions. A rotary query's score against an unrotated key depends on the query's
      absolute position, so for families that count positions from 0 whatever the padding (LLaMA,
      GPT-2: `COUNTED_POSITIONS`) a left-padded batch gets position ids counted from each row's
      first real token: every example then sees what it sees alone, cached or not;
    - every mask the model builds (padding, causal, cross attention) stays as it is, plus n
      visible columns; a `None` mask that means "causal" to sdpa becomes an explicit causal mask.
  Hooks on the k/v projections would be simpler but break on every model that views the projected
  keys with the query length (LLaMA, BERT) and would put the prefix in the cache; a prefilled
  cache (PEFT's way) shifts every position by n and does not reach encoders.
* the cache update (transformers' CpmAnt, no attention interface): a forward pre-hook hands the
  module a stand-in cache whose `update()` returns the real cache's keys with the prefix in front,
  and pads its mask and position bias; the real cache never holds the prefix.
Flash-attention kernels (2D masks) are not supported: the wrapper raises a clear error.

Prompt (`join="embed"`). n soft-prompt vectors enter before the input (`PROMPT_JOINS`):

* a stack that takes `inputs_embeds` (BERT, GPT-2, LLaMA, the T5 encoder): a forward pre-hook
  embeds the ids itself, inserts the prompt after any left padding (plus `at` leading tokens, e.g.
  `at=1` keeps BERT's [CLS] first for its pooler), and inserts matching ones into the attention
  mask, zeros into token types and shifted positions into position ids. Decoder-only and encoder-only
  stacks strip the prompt positions from their output again, so hidden states, logits and the loss
  keep the caller's length and labels (what most users want); a T5 encoder keeps them so the
  decoder's cross attention sees the prompt, and the decoder's encoder mask gets the extra ones.
  Generation: the prompt enters the cache with the first step; later steps only get their mask and
  position ids extended.
* transformers' CpmAnt: its forward always embeds `prompt_length` native prompt slots before the
  text; the prompt vectors replace the first n of them (output length is unchanged).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from . import hf_compat as hf
from .errors import KindError

_WRAPPER = "deltakit_prefix"
# where each join keeps its site: on the attention module (prefix) or on the model (prompt)
SITE_ATTR = {"prefix": "_deltakit_prefix_site", "embed": "_deltakit_prompt_site"}


# ---- prefix: shared helpers ---------------------------------------------------------------------

def _bind(sig, args, kwargs) -> dict:
    """A call's arguments by name, **kwargs flattened, so a pre-hook can return them as kwargs."""
    a = dict(sig.bind(*args, **kwargs).arguments)
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_KEYWORD and name in a:
            a.update(a.pop(name))
        elif p.kind is p.VAR_POSITIONAL and a.get(name):
            raise TypeError(f"deltakit cannot re-route extra positional arguments of {sig}")
        elif p.kind is p.VAR_POSITIONAL:
            a.pop(name, None)
    return a


def _prefix_kv(site, batch: int, heads: int, head_dim: int, like):
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


class PrefixSite:
    """The prefix deltas joined to one attention module, and how they were joined."""

    def __init__(self, module, joiner):
        self.module, self.joiner, self.entries = module, joiner, []
        self.remove = joiner(module, self)   # the joiner returns how to undo itself

    def active(self):
        return [e for e in self.entries if e.active]


# ---- joiner 1: the native model's kv_prefix attribute --------------------------------------------

def _join_native(module, site):
    def kv_prefix(batch):
        if not site.active():
            return (module.project_k.weight.new_zeros(batch, module.num_heads, 0, module.dim_head),) * 2
        return _prefix_kv(site, batch, module.num_heads, module.dim_head, module.project_k.weight)
    module.kv_prefix = kv_prefix

    def undo():
        module.kv_prefix = None
    return undo


# ---- joiner 2: transformers' attention interface -------------------------------------------------

def _prefix_attention(module, query, key, value, attention_mask, *args, **kwargs):
    site = module.__dict__["_deltakit_prefix"]
    impl = hf.attention_implementation(site.config)
    if impl and "flash" in impl:
        raise KindError(f"prefix deltas need an attention implementation that takes a 4D mask (eager, sdpa); "
                        f"this model uses {impl!r}: load it with attn_implementation='sdpa'")
    inner = hf.attention_functions().get_interface(impl, site.eager)
    if site.active():
        pk, pv = _prefix_kv(site, key.shape[0], key.shape[1], key.shape[-1], key)
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


def _join_interface(module, site):
    from transformers import AttentionInterface
    if _WRAPPER not in hf.attention_functions():
        AttentionInterface.register(_WRAPPER, _prefix_attention)
    site.config = module.config
    site.eager = hf.eager_attention(module)
    # this module only: the model and the other layers keep their config
    module.config = hf.with_attention_implementation(module.config, _WRAPPER)
    module.__dict__["_deltakit_prefix"] = site

    def undo():
        module.config = site.config
        module.__dict__.pop("_deltakit_prefix", None)
    return undo


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


def _join_cache(module, site):
    signature = inspect.signature(module.forward)

    def pre(mod, args, kwargs):
        if not site.active():
            return None
        a = _bind(signature, args, kwargs)
        heads, dim_head = getattr(mod, hf.CPMANT_HEADS), getattr(mod, hf.CPMANT_HEAD_DIM)
        key = getattr(mod, hf.CPMANT_KEY).weight
        pk, pv = _prefix_kv(site, a[hf.CPMANT_QUERY_ARG].shape[0], heads, dim_head, key)
        n = pk.shape[2]
        a[hf.CPMANT_MASK_ARG] = F.pad(a[hf.CPMANT_MASK_ARG], (n, 0), value=True)
        a[hf.CPMANT_BIAS_ARG] = F.pad(a[hf.CPMANT_BIAS_ARG], (n, 0))
        hf.set_cache(a, signature, _PrefixedCache(hf.passed_cache(a), pk, pv))
        return (), a

    hook = module.register_forward_pre_hook(pre, with_kwargs=True)
    return hook.remove


# Which joiner an attention module gets: (what it offers, joiner); the first that matches wins.
PREFIX_JOINS = (
    ("a kv_prefix attribute (native CPM-Ant)", lambda m: hasattr(m, "kv_prefix"), _join_native),
    ("transformers' attention interface", hf.calls_attention_interface, _join_interface),
    ("a cache update (transformers' CpmAnt)", lambda m: type(m).__name__ == hf.CPMANT_ATTENTION, _join_cache),
)


def prefix_joiner(module):
    for _, offers, joiner in PREFIX_JOINS:
        if offers(module):
            return joiner
    return None


# Families whose stack numbers positions 0, 1, ... whatever the padding. Prefix keys have no
# position, so a rotary query must sit where it would sit alone, and a prompt must sit right
# before the real tokens: with left padding, these get position ids counted from each row's
# first real token (what the example alone gets). Used while a prefix or prompt delta is active.
COUNTED_POSITIONS = ("llama", "gpt2", "llava")


class _PositionSite:
    def __init__(self, model):
        self.stack = getattr(model, "base_model", model)
        self.entries = []
        self.sig = inspect.signature(self.stack.forward)
        self.hook = self.stack.register_forward_pre_hook(self, with_kwargs=True)
        self.remove = self.hook.remove

    def __call__(self, module, args, kwargs):
        if not any(e.active for e in self.entries):
            return None
        a = _bind(self.sig, args, kwargs)
        mask, x = a.get("attention_mask"), a.get("input_ids")
        x = a.get("inputs_embeds") if x is None else x
        if a.get("position_ids") is not None or mask is None or mask.dim() != 2 or x is None or bool(mask[:, 0].all()):
            return None   # given, or no left padding: the model's own 0, 1, ... are right
        a["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
        return (), a


def _position_site(entry, add: bool):
    from .positions import family
    model = entry.handle.model
    site = model.__dict__.get("_deltakit_position_site")
    if add:
        fam = family(model)
        if site is None and fam is not None and fam.name in COUNTED_POSITIONS:
            site = model.__dict__["_deltakit_position_site"] = _PositionSite(model)
        if site is not None:
            site.entries.append(entry)
    else:
        leave_site(entry, model, "_deltakit_position_site")


def install_prefix(entry, module):
    site = module.__dict__.get(SITE_ATTR["prefix"])
    if site is None:
        joiner = prefix_joiner(module)
        if joiner is None:
            raise KindError(f"prefix deltas cannot join {type(module).__name__} at {entry.position.name!r}: it offers "
                            f"none of {', '.join(w for w, _, _ in PREFIX_JOINS)}")
        site = PrefixSite(module, joiner)
        module.__dict__[SITE_ATTR["prefix"]] = site
    site.entries.append(entry)
    entry.site_module = module
    _position_site(entry, add=True)


def leave_site(entry, holder, attr: str):
    """Take `entry` off the site stored at `holder.<attr>`; the last one out removes the site."""
    site = holder.__dict__.get(attr) if holder is not None else None
    if site is None:
        return
    site.entries = [e for e in site.entries if e is not entry]
    if not site.entries:
        site.remove()
        del holder.__dict__[attr]


def uninstall(entry):
    """Undo install_prefix / install_prompt for one entry."""
    _position_site(entry, add=False)
    leave_site(entry, entry.site_module, SITE_ATTR[entry.join])


# ---- prompt: where the input is embedded ----------------------------------------------------------

def prompt_stack(model):
    """The module that embeds the input ids: the encoder of an encoder-decoder, else the base model."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder(), model.get_decoder()
    return getattr(model, "base_model", model), None


def _leading_pads(mask, at: int):
    """Per row: where the prompt goes (after left padding and `at` leading tokens)."""
    if mask is None or mask.dim() != 2:
        return None
    lead = (mask.cumsum(-1) == 0).sum(-1)
    return lead + at


def _insert(x, where, values, n):
    """x (B, S, ...) with `values` (B, n, ...) inserted at per-row index `where` (B,)."""
    B, S = x.shape[:2]
    j = torch.arange(S + n, device=x.device)[None, :]
    w = where[:, None]
    src = torch.where(j < w, j, j - n).clamp(0, max(S - 1, 0))
    pick = src.view(B, S + n, *([1] * (x.dim() - 2))).expand(B, S + n, *x.shape[2:])
    out = torch.gather(x, 1, pick) if S else x.new_zeros(B, n, *x.shape[2:])
    k = (j - w).clamp(0, n - 1)
    ins = torch.gather(values, 1, k.view(B, S + n, *([1] * (x.dim() - 2))).expand(B, S + n, *x.shape[2:]))
    inside = ((j >= w) & (j < w + n)).view(B, S + n, *([1] * (x.dim() - 2)))
    return torch.where(inside, ins.to(out.dtype), out)


def _strip(x, where, n):
    """The inverse of _insert on (B, S + n, ...)."""
    B, L = x.shape[:2]
    j = torch.arange(L - n, device=x.device)[None, :]
    src = torch.where(j < where[:, None], j, j + n)
    return torch.gather(x, 1, src.view(B, L - n, *([1] * (x.dim() - 2))).expand(B, L - n, *x.shape[2:]))


class PromptSite:
    """The prompt deltas on one model's input, and the hooks that put them there."""

    def __init__(self, model):
        self.model, self.entries = model, []
        self.hooks, self.where = [], []
        self.stack, self.decoder = prompt_stack(model)
        self.slots = type(self.stack).__name__ == hf.CPMANT_MODEL
        if self.slots:   # CpmAnt's own prompt slots: overwrite the first n of them
            embedding = getattr(self.stack, hf.CPMANT_EMBEDDING)
            self.hooks.append(embedding.register_forward_hook(self._slots))
            return
        if "inputs_embeds" not in inspect.signature(self.stack.forward).parameters:
            raise KindError(f"prompt deltas need a model that takes inputs_embeds; {type(self.stack).__name__} does "
                            f"not (native CPM-Ant: use prompt@prompt on its prompt rows)")
        self.sig = inspect.signature(self.stack.forward)
        self.hooks.append(self.stack.register_forward_pre_hook(self._pre, with_kwargs=True))
        self.strip = self.decoder is None
        self.hooks.append(self.stack.register_forward_hook(self._post, with_kwargs=True))
        if self.decoder is not None:
            self.dec_sig = inspect.signature(self.decoder.forward)
            self.hooks.append(self.decoder.register_forward_pre_hook(self._cross, with_kwargs=True))

    def active(self):
        return [e for e in self.entries if e.active]

    def _prompt(self, batch):
        parts = [e.module(batch) for e in self.active()]
        return torch.cat(parts, dim=1) if parts else None

    def _at(self):
        return max(e.options.at for e in self.active())

    def _slots(self, module, args, out):
        prompt = self._prompt(out.shape[0])
        if prompt is None:
            return None
        n = prompt.shape[1]
        return torch.cat([prompt.to(out.dtype), out[:, n:]], dim=1)

    def _pre(self, module, args, kwargs):
        self.where.append(None)
        if not self.active():
            return None
        a = _bind(self.sig, args, kwargs)
        cache = hf.passed_cache(a)
        first = cache is None or cache.get_seq_length() == 0
        mask = a.get("attention_mask")
        ids, embeds = a.get("input_ids"), a.get("inputs_embeds")
        B = (ids if ids is not None else embeds).shape[0]
        prompt = self._prompt(B)
        n = prompt.shape[1]
        where = _leading_pads(mask, self._at())
        if where is None:
            where = torch.full((B,), self._at(), dtype=torch.long, device=prompt.device)
        if mask is not None and mask.dim() == 2:
            a["attention_mask"] = _insert(mask, where, mask.new_ones(B, n), n)
        if a.get("position_ids") is not None:
            pos = a["position_ids"]
            if first:
                start = torch.gather(pos, 1, where.clamp(max=pos.shape[1] - 1)[:, None])
                a["position_ids"] = _insert(pos + (torch.arange(pos.shape[1], device=pos.device)[None] >= where[:, None]) * n,
                                            where, start + torch.arange(n, device=pos.device)[None], n)
            else:
                a["position_ids"] = pos + n
        if not first:
            return (), a
        if embeds is None:
            embeds = self.stack.get_input_embeddings()(ids)
        a["input_ids"], a["inputs_embeds"] = None, _insert(embeds, where, prompt.to(embeds.dtype), n)
        if a.get("token_type_ids") is not None:
            tt = a["token_type_ids"]
            a["token_type_ids"] = _insert(tt, where, tt.new_zeros(B, n), n)
        self.where[-1] = (where, n)
        return (), a

    def _post(self, module, args, kwargs, out):
        state = self.where.pop() if self.where else None
        if state is None or not self.strip:
            return None
        where, n = state
        if isinstance(out, tuple):
            return (_strip(out[0], where, n),) + out[1:]
        out.last_hidden_state = _strip(out.last_hidden_state, where, n)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(_strip(h, where, n) for h in out.hidden_states)
        return out

    def _cross(self, module, args, kwargs):
        if not self.active():
            return None
        a = _bind(self.dec_sig, args, kwargs)
        enc, mask = a.get("encoder_hidden_states"), a.get("encoder_attention_mask")
        if enc is None or mask is None or mask.dim() != 2 or enc.shape[1] == mask.shape[1]:
            return None
        n = enc.shape[1] - mask.shape[1]
        where = _leading_pads(mask, self._at())
        a["encoder_attention_mask"] = _insert(mask, where, mask.new_ones(mask.shape[0], n), n)
        return (), a

    def remove(self):
        for h in self.hooks:
            h.remove()


def install_prompt(entry, model):
    site = model.__dict__.get(SITE_ATTR["embed"])
    if site is None:
        site = PromptSite(model)
        model.__dict__[SITE_ATTR["embed"]] = site
    site.entries.append(entry)
    entry.site_module = model
    if not site.slots:
        _position_site(entry, add=True)
