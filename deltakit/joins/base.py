"""What every join shares: the Entry (one delta at one position) and the Site (the deltas joined at
one place of the model, and the hooks that join them).

Hooks rather than module replacement: the backbone's modules, names and state_dict keys stay as
they were, and removing the hooks and the delta submodules gives back exactly the original model.
A site lives in its holder's `__dict__` (a plain attribute: not a submodule, not in state_dict);
the first entry creates it, the last one to leave removes its hooks.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from ..errors import CallError


@dataclass(eq=False)
class Entry:
    """One delta at one position, and how it is joined."""
    handle: object            # the Handle it belongs to
    position: object          # deltakit.positions.Position
    type: object              # deltakit.deltas.DeltaType
    options: object           # the type's Options
    module: nn.Module         # the delta module (a deltakit.deltas.Delta)
    rule: str                 # the spec rule that placed it
    join: str                 # parallel | sequential | reparam | prefix | prompt
    merged: bool = False
    undo: list = field(default_factory=list)   # what uninstall() calls, last first
    target: object = None     # the module (or model) whose hooks join it, set by install
    seen: object = None       # parallel deltas on sub-blocks: the sub-block input of this forward
    shared_input: object = None   # LoRAs at positions that read one tensor (joins/shared_input.py)

    @property
    def key(self) -> str:
        return f"{self.position.name}.{self.type.name}"

    @property
    def active(self) -> bool:
        return self.handle.enabled and not self.merged

    @property
    def gate(self):
        return self.module.gate

    @gate.setter
    def gate(self, value):
        self.module.gate = value

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def __repr__(self):
        return f"Entry({self.key})"


class Site:
    """The entries joined at one holder (a module, an attention module, a model's input)."""

    attr = "_deltakit_site"   # the holder's __dict__ key; each kind of site has its own

    def __init__(self, holder):
        self.holder, self.entries, self.hooks = holder, [], []

    def active(self) -> list:
        return [e for e in self.entries if e.active]

    def remove(self):
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def join_site(entry: Entry, holder, kind: type, *args) -> Site:
    """The site of class `kind` at `holder` (created on first use, as kind(holder, *args)) with
    `entry` added to it."""
    site = holder.__dict__.get(kind.attr)
    if site is None:
        site = kind(holder, *args)
        holder.__dict__[kind.attr] = site
    site.entries.append(entry)
    entry.undo.append(lambda: leave_site(entry, holder, kind.attr))
    return site


def leave_site(entry: Entry, holder, attr: str):
    """Take `entry` off the site at `holder.<attr>`; the last one out removes the site."""
    site = holder.__dict__.get(attr)
    if site is None:
        return
    site.entries = [e for e in site.entries if e is not entry]
    if not site.entries:
        site.remove()
        del holder.__dict__[attr]


def common_parent(paths) -> str:
    """The longest dotted path every one of `paths` lies under ("" for the model itself)."""
    common = []
    for segs in zip(*(p.split(".") for p in paths)):
        if len(set(segs)) > 1:
            break
        common.append(segs[0])
    return ".".join(common)


def bind(signature: inspect.Signature, args, kwargs, module) -> dict:
    """A call's arguments by name, **kwargs flattened, so a pre-hook can hand them back as kwargs."""
    try:
        a = dict(signature.bind(*args, **kwargs).arguments)
    except TypeError as e:
        raise CallError(f"{type(module).__name__} was called with arguments its forward{signature} does not take "
                        f"({e}); a deltakit prompt/prefix hook reads them by name, so call it as the model "
                        f"expects") from None
    for name, p in signature.parameters.items():
        if p.kind is p.VAR_KEYWORD and name in a:
            a.update(a.pop(name))
        elif p.kind is p.VAR_POSITIONAL and a.get(name):
            raise CallError(f"{type(module).__name__} got extra positional arguments; deltakit's prompt and "
                            f"prefix hooks re-route arguments by name: pass them as keywords")
        elif p.kind is p.VAR_POSITIONAL:
            a.pop(name, None)
    return a
