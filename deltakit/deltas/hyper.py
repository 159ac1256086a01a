"""Hypernetwork deltas (hyperformer, Karimi Mahabadi et al. 2021; HyperPELT, Zhang et al. 2022):
one shared network generates the weights of an adapter, a LoRA or a prefix at every position a
rule places, from learned embeddings of (task, position), so one backbone serves several tasks.

    hyper(adapter,dim=16,tasks=2)@attn,ffn      hyper(lora,r=4)@attn.q      hyper(prefix,n=8)@attn

Per position the delta owns only its `source` embedding (`emb` numbers: which layer and which
kind of position it is). The shared part, built once per rule (`TYPE.shared`) and counted once
(`TYPE.shared_count`), is a task table (tasks x emb), an MLP from [task; source] to `hidden`
features, and one linear head per generated tensor shape. Its size does not depend on depth, so a
deeper model adds `emb` parameters per position where a plain delta adds thousands.

The generated up-projection (adapter) and B (LoRA) start at zero: training starts from the
backbone. `handle.set_task(ids)` picks the task, one int or a (batch,) tensor mixing tasks in a
batch; `handle.materialize(task=k)` turns the generated weights into plain deltas (which merge,
save and export to PEFT like any other).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HandleError
from ..spec import check, format_options
from . import Delta, DeltaType
from .adapter import ACTIVATIONS, Act

KINDS = {"adapter": ("attention", "block", "linear"), "lora": ("linear",), "prefix": ("attention",)}
JOINS = {"adapter": "sequential", "lora": "parallel", "prefix": "prefix"}


@dataclass(frozen=True)
class Options:
    delta: Literal["adapter", "lora", "prefix"] = "adapter"   # what the hypernetwork generates
    tasks: int = 1
    emb: int = 8          # task and source embedding size
    hidden: int = 32      # hypernetwork width
    dim: int = 16         # adapter: bottleneck
    act: Act = "relu"
    r: int = 4            # lora: rank
    alpha: float = 8.0    # lora: scale alpha / r
    n: int = 8            # prefix: vectors

    def __post_init__(self):
        for name in ("tasks", "emb", "hidden", "dim", "r", "n"):
            check(getattr(self, name) >= 1, f"hyper option {name}={getattr(self, name)} must be at least 1")


def shapes(opts: Options, pos) -> dict:
    """Name -> shape of each tensor generated at `pos` (the plain delta's parameters)."""
    if opts.delta == "adapter":
        h = pos.width
        return {"down.weight": (opts.dim, h), "down.bias": (opts.dim,), "up.weight": (h, opts.dim), "up.bias": (h,)}
    if opts.delta == "lora":
        fan_in, fan_out = pos.shape
        return {"lora_A": (opts.r, fan_in), "lora_B": (fan_out, opts.r)}
    return {"key": (opts.n, pos.kv), "value": (opts.n, pos.kv)}


def _zero_start(name: str) -> bool:   # these start at zero so that the delta starts as the identity
    return name in ("up.weight", "up.bias", "lora_B")


def signature(opts: Options, pos) -> str:
    return "_".join(f"{n.replace('.', '')}{'x'.join(map(str, s))}" for n, s in shapes(opts, pos).items())


def _fits(opts, pos) -> bool:
    return pos.kind in KINDS[opts.delta] and (opts.delta != "prefix" or bool(pos.kv))


class HyperNet(nn.Module):
    """The shared generator: task table, MLP, one head per generated tensor shape."""

    def __init__(self, opts: Options, positions):
        super().__init__()
        self.opts = opts
        self.task_embedding = nn.Embedding(opts.tasks, opts.emb)
        self.mlp = nn.Sequential(nn.Linear(2 * opts.emb, opts.hidden), nn.ReLU())
        self.heads = nn.ModuleDict()
        for pos in positions:
            sig = signature(opts, pos)
            if sig in self.heads:
                continue
            heads = nn.ModuleDict()
            for name, shape in shapes(opts, pos).items():
                head = nn.Linear(opts.hidden, math.prod(shape))
                # Each column of a head is one basis tensor, drawn as the plain delta draws its own
                # (std 1/sqrt(fan_in); up and B zero); prefix vectors get a spread to attend to.
                std = 0.0 if _zero_start(name) or len(shape) == 1 else shape[-1] ** -0.5
                nn.init.normal_(head.weight, std=std)
                nn.init.normal_(head.bias, std=0.5 if name in ("key", "value") else 0.0)
                heads[name.replace(".", "_")] = head
            self.heads[sig] = heads
        # the tasks of the current batch, as set_task() found them once (not on every forward):
        # the distinct ids, and for each example the index of its id among them
        self.register_buffer("task_ids", torch.zeros(1, dtype=torch.long), persistent=False)
        self.register_buffer("task_index", torch.zeros(1, dtype=torch.long), persistent=False)

    def set_task(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long).cpu()
        if ids.dim() > 1 or (ids.numel() and (ids.min() < 0 or ids.max() >= self.opts.tasks)):
            raise HandleError(f"task ids must be one int or a (batch,) tensor of ints in [0, {self.opts.tasks}); "
                              f"got {ids.tolist()}")
        tasks, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        if len(tasks) == 1:   # one task for the whole batch: one set of weights, applied as a plain delta
            inverse = inverse[:1]
        self.task_ids = tasks.to(self.task_ids.device)
        self.task_index = inverse.to(self.task_index.device)

    def generate(self, source, sig: str, shapes_: dict, task: int | None = None) -> dict:
        """{name: (b, *shape)}, b = 1 for one task, batch for per-example task ids."""
        uniq, inverse = self.task_ids, self.task_index
        if task is not None:
            uniq, inverse = torch.full_like(uniq[:1], task), torch.zeros_like(inverse[:1])
        src = torch.cat([self.task_embedding(uniq), source[None].expand(len(uniq), -1)], dim=-1)
        # ReLU features scaled to sum to one: each generated tensor is a convex mixture of `hidden`
        # basis tensors (plus the head's bias). So one AdamW step moves it by at most lr per element,
        # as it moves a plain delta; unscaled, a shared head moves every position ~hidden/2 times
        # faster, and at a plain delta's learning rate the generated deltas swamp the backbone.
        h = F.normalize(self.mlp(src), p=1, dim=-1, eps=1e-6)
        heads = self.heads[sig]
        return {name: heads[name.replace(".", "_")](h)[inverse].view(len(inverse), *shape) for name, shape in shapes_.items()}


def _check_batch(tasks: int, batch: int):
    if tasks not in (1, batch):
        raise HandleError(f"{tasks} per-example task ids for a batch of {batch}: set_task() needs one id "
                          f"per example (or one int)")


def _apply(x, w, b=None):
    """x (B, ..., in) through per-example weights w (1|B, out, in)."""
    if w.shape[0] == 1:
        return F.linear(x, w[0], None if b is None else b[0])
    _check_batch(w.shape[0], x.shape[0])
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = flat @ w.transpose(1, 2)
    if b is not None:
        out = out + b[:, None]
    return out.reshape(*x.shape[:-1], w.shape[1])


class HyperDelta(Delta):
    """The delta at one position: its source embedding; the weights come from the shared HyperNet."""

    def __init__(self, opts: Options, pos, shared: HyperNet):
        super().__init__()
        self.opts, self.sig, self.shapes = opts, signature(opts, pos), shapes(opts, pos)
        self.source = nn.Parameter(torch.randn(opts.emb))
        self.__dict__["shared"] = shared   # not a submodule: its parameters are counted once, by the handle
        if opts.delta == "adapter":
            self.act = ACTIVATIONS[opts.act]()

    def generated(self, task=None) -> dict:
        return self.shared.generate(self.source, self.sig, self.shapes, task)

    def forward(self, x):
        w = self.generated()
        if self.opts.delta == "prefix":   # x is the batch size
            _check_batch(w["key"].shape[0], x)
            return w["key"], w["value"]
        x = x.to(self.source.dtype)
        if self.opts.delta == "adapter":
            return _apply(self.act(_apply(x, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])
        return _apply(_apply(x, w["lora_A"]), w["lora_B"]) * (self.opts.alpha / self.opts.r)

    # -- turning into a plain delta -------------------------------------------------------------
    def plain(self) -> tuple[str, str]:
        """The plain delta type and options this one generates."""
        o = self.opts
        return o.delta, {"adapter": f"dim={o.dim},act={o.act}", "lora": f"r={o.r},alpha={o.alpha}",
                         "prefix": f"n={o.n}"}[o.delta]

    def materialize(self, task: int) -> dict:
        with torch.no_grad():
            return {n: t[0].detach().clone() for n, t in self.generated(task).items()}


def plain_deltas(handle, task: int) -> tuple[str, dict]:
    """(spec, weights) of plain deltas holding what the handle's hypernetworks generate for `task`;
    its other deltas are copied as they are. The spec names each position as a pattern that selects
    it again (a `re:` pattern for raw module names), so `attach(model, spec)` rebuilds them."""
    groups: dict = {}
    weights: dict = {}
    for e in handle.entries:
        if isinstance(e.module, HyperDelta):
            tname, opts = e.module.plain()
            tensors = e.module.materialize(task)
        else:
            tname, opts = e.type.name, format_options(e.options)
            tensors = {n: p.detach().clone() for n, p in e.module.named_parameters()}
        groups.setdefault((tname, opts), []).append(e.position.pattern)
        weights.update({f"{e.position.name}.{tname}.{n}": t for n, t in tensors.items()})
    spec = "; ".join(f"{t}({o})@{','.join(where)}" if o else f"{t}@{','.join(where)}"
                     for (t, o), where in groups.items())
    return spec, weights


def count(opts: Options, pos) -> int:
    return opts.emb if _fits(opts, pos) else 0


def count_shared(opts: Options, positions) -> int:
    heads, total = set(), opts.tasks * opts.emb + 2 * opts.emb * opts.hidden + opts.hidden
    for pos in positions:
        sig = signature(opts, pos)
        if sig not in heads:
            heads.add(sig)
            total += sum((opts.hidden + 1) * math.prod(s) for s in shapes(opts, pos).values())
    return total


def build(opts: Options, pos, target, shared: HyperNet) -> HyperDelta:
    return HyperDelta(opts, pos, shared)


TYPE = DeltaType("hyper", Options, kinds=("attention", "block", "linear"), join="sequential", count=count,
                 build=build, default="attn,ffn", positional="delta",
                 doc="adapter/LoRA/prefix weights generated by one shared hypernetwork (multi-task)",
                 join_of=lambda opts, pos: JOINS[opts.delta], build_shared=HyperNet, count_shared=count_shared)
