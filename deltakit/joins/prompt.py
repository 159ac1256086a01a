"""How prompt deltas reach the input: n soft-prompt vectors before the text.

* a stack that takes `inputs_embeds` (BERT, GPT-2, LLaMA, the T5 encoder): a forward pre-hook
  embeds the ids itself, inserts the prompt after any left padding (plus `at` leading tokens, e.g.
  `at=1` keeps BERT's [CLS] first for its pooler), and inserts matching ones into the attention
  mask, zeros into token types and shifted positions into position ids. Decoder-only and
  encoder-only stacks strip the prompt positions from their output again, so hidden states, logits
  and the loss keep the caller's length and labels (what most users want); a T5 encoder keeps them
  so the decoder's cross attention sees the prompt, and the decoder's encoder mask gets the extra
  ones. Generation: the prompt enters the cache with the first step; later steps only get their
  mask and position ids extended.
* transformers' CpmAnt: its forward always embeds `prompt_length` native prompt slots before the
  text; the prompt vectors replace the first n of them (output length is unchanged).
* native CPM-Ant keeps its prompts as rows of a table (`prompt@prompt`, a reparam delta on them).
"""
from __future__ import annotations

import inspect

import torch

from .. import hf_compat as hf
from ..errors import KindError
from . import position_ids
from .base import Site, bind, join_site


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
    return (mask.cumsum(-1) == 0).sum(-1) + at


def _expand_as(index, x):
    return index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])


def insert(x, where, values, n):
    """x (B, S, ...) with `values` (B, n, ...) inserted at per-row index `where` (B,)."""
    B, S = x.shape[:2]
    j = torch.arange(S + n, device=x.device)[None, :].expand(B, -1)
    w = where[:, None]
    src = torch.where(j < w, j, j - n).clamp(0, max(S - 1, 0))
    out = torch.gather(x, 1, _expand_as(src, x)) if S else x.new_zeros(B, n, *x.shape[2:])
    ins = torch.gather(values, 1, _expand_as((j - w).clamp(0, n - 1), x))
    inside = _expand_as((j >= w) & (j < w + n), x)
    return torch.where(inside, ins.to(out.dtype), out)


def strip(x, where, n):
    """The inverse of insert on (B, S + n, ...)."""
    B, L = x.shape[:2]
    j = torch.arange(L - n, device=x.device)[None, :].expand(B, -1)
    src = torch.where(j < where[:, None], j, j + n)
    return torch.gather(x, 1, _expand_as(src, x))


class _Prompts(Site):
    attr = "_deltakit_prompt_site"

    def prompt(self, batch):
        parts = [e.module(batch) for e in self.active()]
        return torch.cat(parts, dim=1) if parts else None

    def at(self):
        return max(e.options.at for e in self.active())


class SlotSite(_Prompts):
    """A stack that embeds native prompt slots (transformers' CpmAnt): the prompt overwrites the
    first n of them in its embedding's output. Which module that is: the family's `prompt_slots`."""

    def __init__(self, model, embedding):
        super().__init__(model)
        self.hooks = [embedding.register_forward_hook(self.after)]

    def after(self, module, args, out):
        prompt = self.prompt(out.shape[0])
        if prompt is None:
            return None
        return torch.cat([prompt.to(out.dtype), out[:, prompt.shape[1]:]], dim=1)


class PromptSite(_Prompts):
    """A stack that takes inputs_embeds: the prompt goes in front of the embedded text."""

    def __init__(self, model):
        super().__init__(model)
        self.stack, self.decoder = prompt_stack(model)
        if "inputs_embeds" not in inspect.signature(self.stack.forward).parameters:
            raise KindError(f"prompt deltas need a model that takes inputs_embeds; {type(self.stack).__name__} does "
                            f"not (native CPM-Ant: use prompt@prompt on its prompt rows)")
        self.signature = inspect.signature(self.stack.forward)
        self.strip = self.decoder is None   # a T5 encoder keeps the prompt positions for the decoder
        self.inserted = None                # (where, n) of the forward running now
        self.hooks = [self.stack.register_forward_pre_hook(self.before, with_kwargs=True),
                      self.stack.register_forward_hook(self.after, with_kwargs=True, always_call=True)]
        if self.decoder is not None:
            self.decoder_signature = inspect.signature(self.decoder.forward)
            self.hooks.append(self.decoder.register_forward_pre_hook(self.cross, with_kwargs=True))

    def before(self, module, args, kwargs):
        self.inserted = None
        if not self.active():
            return None
        a = bind(self.signature, args, kwargs, module)
        cache = hf.passed_cache(a)
        first = cache is None or cache.get_seq_length() == 0
        ids, embeds, mask = a.get("input_ids"), a.get("inputs_embeds"), a.get("attention_mask")
        prompt = self.prompt((ids if ids is not None else embeds).shape[0])
        B, n = prompt.shape[:2]
        where = _leading_pads(mask, self.at())
        if where is None:
            where = torch.full((B,), self.at(), dtype=torch.long, device=prompt.device)
        if mask is not None and mask.dim() == 2:
            a["attention_mask"] = insert(mask, where, mask.new_ones(B, n), n)
        if a.get("position_ids") is not None:
            a["position_ids"] = _shift_positions(a["position_ids"], where, n, first)
        if not first:   # the prompt is in the cache already
            return (), a
        if embeds is None:
            embeds = self.stack.get_input_embeddings()(ids)
        a["input_ids"], a["inputs_embeds"] = None, insert(embeds, where, prompt.to(embeds.dtype), n)
        if a.get("token_type_ids") is not None:
            types = a["token_type_ids"]
            a["token_type_ids"] = insert(types, where, types.new_zeros(B, n), n)
        self.inserted = (where, n)
        return (), a

    def after(self, module, args, kwargs, out):
        inserted, self.inserted = self.inserted, None   # also cleared when the forward raised
        if out is None or inserted is None or not self.strip:
            return None
        where, n = inserted
        if isinstance(out, tuple):
            return (strip(out[0], where, n),) + out[1:]
        out.last_hidden_state = strip(out.last_hidden_state, where, n)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(strip(h, where, n) for h in out.hidden_states)
        return out

    def cross(self, module, args, kwargs):
        """The decoder's mask over the encoder output gets the prompt's columns."""
        if not self.active():
            return None
        a = bind(self.decoder_signature, args, kwargs, module)
        enc, mask = a.get("encoder_hidden_states"), a.get("encoder_attention_mask")
        if enc is None or mask is None or mask.dim() != 2 or enc.shape[1] == mask.shape[1]:
            return None
        n = enc.shape[1] - mask.shape[1]
        where = _leading_pads(mask, self.at())
        a["encoder_attention_mask"] = insert(mask, where, mask.new_ones(mask.shape[0], n), n)
        return (), a


def _shift_positions(pos, where, n, first: bool):
    """Position ids with the prompt's n positions inserted at `where` (first step), or shifted by n."""
    if not first:
        return pos + n
    steps = torch.arange(pos.shape[1], device=pos.device)[None]
    start = torch.gather(pos, 1, where.clamp(max=pos.shape[1] - 1)[:, None])
    return insert(pos + (steps >= where[:, None]) * n, where, start + torch.arange(n, device=pos.device)[None], n)


def install(entry, model):
    stack, _ = prompt_stack(model)
    fam = entry.handle.family
    slots = fam.prompt_slots.get(type(stack).__name__) if fam is not None else None
    if slots is not None:
        join_site(entry, model, SlotSite, getattr(stack, slots))
    else:
        join_site(entry, model, PromptSite)
        position_ids.install(entry, model)
    entry.target = model
