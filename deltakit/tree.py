"""deltakit.show(model): the model as a rich tree, runs of identical layers folded into one node,
deltas marked, trainable and frozen parameter counts on every node."""
from __future__ import annotations

from torch import nn


def _own_params(module):
    return list(module.parameters(recurse=False))


def _counts(module):
    total = trainable = 0
    for p in module.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def _signature(module) -> tuple:
    """Modules with the same signature print the same, so a run of them is shown once."""
    return (type(module).__name__,
            tuple((n, tuple(p.shape), p.requires_grad) for n, p in module.named_parameters()),
            tuple(type(m).__name__ for m in module.modules()))


def _label(name: str, module, times: int = 1) -> str:
    cls = type(module).__name__
    total, trainable = _counts(module)
    if name == "deltakit":
        return f"[bold magenta]deltas[/] ({trainable:,} trainable)"
    fold = f" [cyan]x{times}[/]" if times > 1 else ""
    shape = ""
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter):
        shape = f" {tuple(weight.shape)}"
    if not total:
        return f"[bold]{name}[/] {cls}{fold}"
    state = (f"[green]{trainable:,} trainable[/]" if trainable == total else
             f"[dim]{total:,} frozen[/]" if not trainable else
             f"[green]{trainable:,} trainable[/] / [dim]{total - trainable:,} frozen[/]")
    each = " each" if times > 1 else ""
    return f"[bold]{name}[/] {cls}{shape}{fold}: {state}{each}"


def _runs(children):
    """Group consecutive numbered children with equal signatures: [(first, last, module), ...]."""
    runs = []
    for name, module in children:
        sig = _signature(module)
        if runs and name.isdigit() and runs[-1][3] == sig and runs[-1][1].isdigit() \
                and int(runs[-1][1]) + 1 == int(name):
            runs[-1] = (runs[-1][0], name, runs[-1][2], sig)
        else:
            runs.append((name, name, module, sig))
    return [(a, b, m) for a, b, m, _ in runs]


def _add(tree, module, depth, max_depth):
    if max_depth is not None and depth >= max_depth:
        return
    for first, last, child in _runs(list(module.named_children())):
        name = first if first == last else f"{first}-{last}"
        times = 1 if first == last else int(last) - int(first) + 1
        if first == "deltakit":
            node = tree.add(_label("deltakit", child))
            for key, delta in child.named_children():
                n = sum(p.numel() for p in delta.parameters())
                node.add(f"[magenta]{key}[/] {type(delta).__name__}: {n:,} params")
            continue
        _add(tree.add(_label(name, child, times)), child, depth + 1, max_depth)


def show(model: nn.Module, max_depth: int | None = None, file=None):
    """Print the tree (to `file`, default stdout) and return it (a rich Tree; Jupyter renders it)."""
    from rich.console import Console
    from rich.tree import Tree
    tree = Tree(_label("model", model))
    _add(tree, model, 0, max_depth)
    Console(file=file, width=140).print(tree)
    return tree
