"""From gate probabilities to a structure that fits the budget.

* `greedy_knapsack`: sort candidates by p (descending; ties by index) and add each one whose cost
  still fits, skipping those that do not (S3PET's `hard_forward_structure`).
* `random_structure`: S3PET's random baseline: keep drawing a uniformly random candidate among
  those that still fit until none does.

`groups[i]` (optional) names a pool of parameters shared by candidate i's rule (a hypernetwork);
its cost `shared[group]` is paid once, when the first candidate of the group is chosen.
"""
from __future__ import annotations

import random

import numpy as np


def _cost(i, sizes, groups, shared, paid) -> int:
    g = groups[i] if groups else None
    return int(sizes[i]) + (int(shared.get(g, 0)) if g is not None and g not in paid else 0)


def greedy_knapsack(p, sizes, budget: int, groups=None, shared=None) -> list[int]:
    """Indices chosen greedily by descending p, never exceeding `budget` parameters in total."""
    p = np.asarray(p, dtype=np.float64)
    shared = shared or {}
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    chosen, used, paid = [], 0, set()
    for i in order:
        c = _cost(i, sizes, groups, shared, paid)
        if used + c <= budget:
            chosen.append(i)
            used += c
            if groups and groups[i] is not None:
                paid.add(groups[i])
    return sorted(chosen)


def random_structure(sizes, budget: int, seed: int, groups=None, shared=None) -> list[int]:
    """Uniformly random candidates that still fit, until nothing fits (seeded)."""
    rng = random.Random(seed)
    shared = shared or {}
    left, chosen, used, paid = list(range(len(sizes))), [], 0, set()
    while True:
        fits = [i for i in left if used + _cost(i, sizes, groups, shared, paid) <= budget]
        if not fits:
            return sorted(chosen)
        i = rng.choice(fits)
        used += _cost(i, sizes, groups, shared, paid)
        chosen.append(i)
        left.remove(i)
        if groups and groups[i] is not None:
            paid.add(groups[i])


def structure_cost(chosen, sizes, groups=None, shared=None) -> int:
    shared = shared or {}
    used = sum(int(sizes[i]) for i in chosen)
    if groups:
        used += sum(int(shared.get(g, 0)) for g in {groups[i] for i in chosen} if g is not None)
    return used
