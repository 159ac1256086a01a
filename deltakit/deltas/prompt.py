"""Prompt tuning (Lester et al. 2021): n soft prompt vectors before the input, `prompt@embed`.

How they enter (and what happens to masks, positions, labels and the output length) is in
`deltakit/joins/prompt.py`: in short, outputs keep the caller's length (the prompt positions
are stripped again) except a T5 encoder's, whose output keeps them for the decoder to attend to.

init: `vocab` (default) copies n random rows of the input embedding, which Lester et al. found
best; `normal` draws N(0, std of the embedding); `ids` option: comma-free list written as
`ids=5-9-12` picks those vocabulary rows (repeated to n).

Native CPM-Ant stores prompts as rows of `prompt_embedding`, selected by task id (a position of kind
`rows`): `prompt@prompt` is a zero-initialised delta on those rows (a reparameterisation, so it merges).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..spec import check
from . import Delta, DeltaType


@dataclass(frozen=True)
class Options:
    n: int = 10
    init: Literal["vocab", "normal"] = "vocab"
    ids: str = ""          # vocabulary ids to start from, e.g. ids=17-4-33 (overrides init)
    at: int = 0            # leading tokens to keep before the prompt (at=1 keeps BERT's [CLS] first)
    seed: int = 0          # which vocabulary rows init=vocab picks

    def __post_init__(self):
        check(self.n >= 1, f"prompt option n={self.n} must be at least 1")
        check(self.at >= 0, f"prompt option at={self.at} must be 0 or more")
        check(all(p.isdigit() for p in self.ids.split("-")) if self.ids else True,
              f"prompt option ids={self.ids!r} must be vocabulary ids joined by '-', e.g. ids=17-4-33")


class Prompt(Delta):
    def __init__(self, embedding: torch.Tensor, opts: Options):
        super().__init__()
        rows, dim = embedding.shape
        self.prompt = nn.Parameter(torch.empty(opts.n, dim))
        with torch.no_grad():
            if embedding.is_meta:
                return
            if opts.ids:
                ids = torch.tensor([int(i) for i in opts.ids.split("-")])
                self.prompt.copy_(embedding[ids.repeat(opts.n // len(ids) + 1)[:opts.n]])
            elif opts.init == "vocab":
                g = torch.Generator().manual_seed(opts.seed)
                self.prompt.copy_(embedding[torch.randint(0, rows, (opts.n,), generator=g)])
            else:
                nn.init.normal_(self.prompt, std=float(embedding.float().std()))

    def forward(self, batch: int):
        return self.prompt[None].expand(batch, -1, -1)


class PromptRows(Delta):
    """A delta on a native prompt table: added to its rows."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(rows, dim))

    def new_params(self, params):
        return {"weight": params["weight"] + self.delta}


JOIN = {"embed": "prompt", "rows": "reparam"}   # position kind -> how the prompt joins there


def join_of(opts: Options, pos) -> str:
    return JOIN[pos.kind]


def count(opts: Options, pos) -> int:
    rows, dim = pos.shape
    return rows * dim if pos.kind == "rows" else opts.n * dim


def build(opts: Options, pos, target):
    if pos.kind == "rows":
        return PromptRows(*pos.shape)
    return Prompt(target.weight.detach(), opts)


TYPE = DeltaType("prompt", Options, kinds=("embed", "rows"), join="prompt", count=count, build=build,
                 default="embed", doc="soft prompt vectors before the input (Lester et al.)", join_of=join_of)
