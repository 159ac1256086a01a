"""Text reports: a handle's summary table (repeated layers folded into ranges)."""
from __future__ import annotations

import io

from .spec import format_options


def layer_ranges(layers) -> str:
    """[0,1,2,3,7,8] -> '0-3,7-8'"""
    layers = sorted(set(layers))
    out, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            out.append(f"{start}" if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def summary_rows(handle) -> list[tuple]:
    """(where, type, options, count, params each, params total), one row per position kind and type."""
    groups: dict = {}
    for e in handle.entries:
        pos = e.position
        key = (pos.stack, pos.local, e.type.name, format_options(e.options), e.num_params)
        groups.setdefault(key, []).append(pos.layer)
    rows = []
    for (stack, local, tname, opts, each), layers in groups.items():
        where = local
        if layers[0] is not None:
            where = f"layers.{layer_ranges(layers)}.{local}"
        if stack:
            where = f"{stack}.{where}"
        rows.append((where, tname, opts, len(layers), each, each * len(layers)))
    for rule, module in handle.shared_modules.items():   # a hypernetwork: counted once, for all its positions
        sp = handle.shared_plans[rule]
        n = sum(p.numel() for p in module.parameters())
        rows.append((f"shared by {len(sp.positions)} positions", sp.type.name, format_options(sp.options), 1, n, n))
    return rows


def summary(handle) -> str:
    from rich.console import Console
    from rich.table import Table
    from .positions import backbone_params
    backbone = sum(p.numel() for _, p in backbone_params(handle.model))
    table = Table(title=f"deltakit handle {handle.name!r} on {type(handle.model).__name__}", title_justify="left")
    for col, justify in (("position", "left"), ("delta", "left"), ("options", "left"), ("n", "right"),
                         ("params each", "right"), ("params", "right")):
        table.add_column(col, justify=justify)
    for where, tname, opts, n, each, total in summary_rows(handle):
        table.add_row(where, tname, opts, str(n), f"{each:,}", f"{total:,}")
    merged = " (merged)" if handle.merged else ""
    pct = 100 * handle.num_trainable / backbone if backbone else 0.0
    table.caption = (f"{handle.num_trainable:,} trainable delta params{merged} = {pct:.4f}% of "
                     f"{backbone:,} backbone params")
    table.caption_justify = "left"
    console = Console(width=110, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.export_text()
