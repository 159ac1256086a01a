"""Heat map of gate probabilities: rows = layers (model-level positions in a last row), columns =
(position in the layer, delta type); chosen candidates are marked with a dot."""
from __future__ import annotations

import numpy as np


def _row(c) -> tuple:
    """(sort key, label): layers by stack then index, model-level positions last."""
    if c.layer is None:
        return (1, "", 0), "model"
    return (0, c.stack or "", c.layer), f"{c.stack + '.' if c.stack else ''}{c.layer}"


def grid(candidates, values):
    rows = [label for _, label in sorted(set(map(_row, candidates)))]
    cols = list(dict.fromkeys(c.column for c in candidates))
    m = np.full((len(rows), len(cols)), np.nan)
    where = {}
    for c, v in zip(candidates, values):
        i, j = rows.index(_row(c)[1]), cols.index(c.column)
        m[i, j] = v
        where[c.index] = (i, j)
    return rows, cols, m, where


def heatmap(candidates, probs, chosen, path, title: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, cols, m, where = grid(candidates, probs)
    fig, ax = plt.subplots(figsize=(1.0 + 0.42 * len(cols), 1.2 + 0.3 * len(rows)))
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(1e-9, float(np.nanmax(m))))
    for i in chosen:
        r, c = where[i]
        ax.plot(c, r, "o", color="red", markersize=4)
    ax.set_xticks(range(len(cols)), cols, rotation=70, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title or "gate probability p (red dot: chosen)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="p")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
