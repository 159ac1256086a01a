"""Greedy and beam-search generation for the native CPM-Ant, with a key/value cache.

The batch is laid out as [task prompt | left padding | source tokens], so every sample's text ends at
the same column and new tokens are appended to all of them at once. Padding between prompt and text
changes nothing: prompt and text are different segments, and the bias across segments does not depend
on distance. Source tokens are context (seen by everything); generated tokens are not, so they see
only what precedes them: the cache then gives exactly the logits of a full forward (tested).
"""
from __future__ import annotations

import torch

from ..errors import DeltakitError


def _batch(model, sources: list[list[int]], task_id: int, device):
    cfg = model.config
    if not sources or any(len(s) == 0 for s in sources):
        raise DeltakitError("generate needs at least one non-empty source token list per sample")
    if not 0 <= task_id < cfg.prompt_types:
        raise DeltakitError(f"task_id={task_id} is out of range: this model has {cfg.prompt_types} prompt types")
    P, n = cfg.prompt_length, max(len(s) for s in sources)
    B = len(sources)
    input = torch.zeros(B, P + n, dtype=torch.long)
    valid = torch.zeros(B, P + n, dtype=torch.bool)
    input[:, :P] = torch.arange(P) + task_id * P
    valid[:, :P] = True
    for b, s in enumerate(sources):
        input[b, P + n - len(s):] = torch.tensor(s)
        valid[b, P + n - len(s):] = True
    segment = torch.where(torch.arange(P + n) < P, 0, 2).expand(B, -1).clone()
    context = torch.ones(B, P + n, dtype=torch.long)
    return {k: v.to(device) for k, v in dict(input=input, valid=valid, segment=segment, context=context).items()}


def _grow(x: dict, tokens, beam_idx=None) -> dict:
    """Append one generated position (not context, segment of the text, valid)."""
    if beam_idx is not None:
        x = {k: v[beam_idx] for k, v in x.items()}
    col = lambda v, fill: torch.cat([v, torch.full_like(v[:, :1], fill)], dim=1)
    return {"input": torch.cat([x["input"], tokens[:, None]], dim=1), "valid": col(x["valid"], True),
            "segment": torch.cat([x["segment"], x["segment"][:, -1:]], dim=1), "context": col(x["context"], 0)}


def _step(model, x: dict, cache):
    """Logits of the last position; only the new column is computed when a cache is given."""
    new = x["input"][:, -1:] if cache else x["input"]
    logits, _, cache = model(new, context=x["context"], segment=x["segment"], valid=x["valid"], cache=cache)
    return logits[:, -1].float(), cache


@torch.no_grad()
def greedy(model, sources: list[list[int]], max_new_tokens: int = 32, eos_id: int | None = None,
           task_id: int = 1, use_cache: bool = True) -> list[list[int]]:
    """Greedy decoding; returns the generated ids per sample (without the eos)."""
    device = next(model.parameters()).device
    x = _batch(model, sources, task_id, device)
    out, done, cache = [[] for _ in sources], [False] * len(sources), None
    for _ in range(max_new_tokens):
        logits, cache = _step(model, x, cache if use_cache else None)
        if not use_cache:
            cache = None
        tokens = logits.argmax(-1)
        for b, t in enumerate(tokens.tolist()):
            if not done[b]:
                done[b] = t == eos_id
                if not done[b]:
                    out[b].append(t)
        if all(done):
            break
        x = _grow(x, tokens)
    return out


@torch.no_grad()
def beam_search(model, sources: list[list[int]], beam_size: int = 3, max_new_tokens: int = 32,
                eos_id: int | None = None, task_id: int = 1, length_penalty: float = 1.0) -> list[list[int]]:
    """Beam search with the cache; hypotheses are ranked by sum log p / length**length_penalty.
    Returns the best hypothesis per sample (without the eos)."""
    if beam_size < 1:
        raise DeltakitError(f"beam_size={beam_size} must be at least 1")
    device = next(model.parameters()).device
    B, K = len(sources), beam_size
    x = _batch(model, sources, task_id, device)
    x = {k: v.repeat_interleave(K, dim=0) for k, v in x.items()}
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0                           # all beams start identical: keep one alive
    seqs = [[[] for _ in range(K)] for _ in range(B)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    cache = None
    for step in range(max_new_tokens):
        logits, cache = _step(model, x, cache)
        logp = torch.log_softmax(logits, -1).view(B, K, -1) + scores[:, :, None]
        vocab = logp.size(-1)
        top, idx = logp.view(B, -1).topk(2 * K, dim=-1)
        beam_idx, tokens = torch.zeros(B, K, dtype=torch.long), torch.zeros(B, K, dtype=torch.long)
        new_scores = torch.full((B, K), float("-inf"), device=device)
        new_seqs = [[[] for _ in range(K)] for _ in range(B)]
        for b in range(B):
            k = 0
            for score, flat in zip(top[b].tolist(), idx[b].tolist()):
                src, tok = divmod(flat, vocab)
                if score == float("-inf"):
                    break
                if tok == eos_id:
                    seq = seqs[b][src]
                    finished[b].append((score / max(len(seq), 1) ** length_penalty, seq))
                    continue
                beam_idx[b, k], tokens[b, k], new_scores[b, k] = src, tok, score
                new_seqs[b][k] = seqs[b][src] + [tok]
                k += 1
                if k == K:
                    break
        flat_idx = (torch.arange(B)[:, None] * K + beam_idx).view(-1).to(device)
        cache = {"length": cache["length"],
                 "kv": [None if kv is None else (kv[0][flat_idx], kv[1][flat_idx]) for kv in cache["kv"]]}
        x = _grow(x, tokens.view(-1).to(device), flat_idx)
        scores, seqs = new_scores, new_seqs
        if all(len(f) >= K and max(s for s, _ in f) >= scores[b].max().item() / max(step + 1, 1) ** length_penalty
               for b, f in enumerate(finished)):
            break
    results = []
    for b in range(B):
        alive = [(scores[b, k].item() / max(len(seqs[b][k]), 1) ** length_penalty, seqs[b][k]) for k in range(K)]
        results.append(max(finished[b] + alive, key=lambda t: t[0])[1])
    return results
