"""How built deltas join the backbone's computation, one file per way of joining:

    base.py          Entry (one delta at one position) and Site (the deltas at one place, its hooks)
    site.py          module sites: parallel, sequential and reparam deltas on one module
    fold.py          merge / unmerge: folding deltas into the weights and back, exactly
    prefix.py        prefix keys/values into attention (three joiners, chosen by what a module offers)
    prompt.py        prompt vectors before the input
    position_ids.py  position ids of padded rows while a prefix or prompt is active
    shared_input.py  one matmul for the LoRAs that read one tensor (q, k, v)

`install(entry, model)` joins an entry as its `join` says (`INSTALL`); `uninstall(entry)` undoes it.
"""
from __future__ import annotations

from . import prefix, prompt, site
from .base import Entry
from .shared_input import share_inputs

INSTALL = {
    "parallel": site.install,
    "sequential": site.install,
    "reparam": site.install,
    "prefix": prefix.install,
    "prompt": prompt.install,
}


def install(entry: Entry, model) -> None:
    try:
        INSTALL[entry.join](entry, model)
    except BaseException:
        uninstall(entry)
        raise


def uninstall(entry: Entry) -> None:
    while entry.undo:
        entry.undo.pop()()


__all__ = ["Entry", "INSTALL", "install", "uninstall", "share_inputs"]
