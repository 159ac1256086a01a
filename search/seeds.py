"""Derived seeds: every random draw of a run (initialisation, dropout masks, gate noise) is seeded
from (seed, step, pass), so a resumed run draws exactly what an uninterrupted one does."""
from __future__ import annotations


def derive(*parts) -> int:
    """A 63-bit seed from integers (FNV-1a over their low 32 bits)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
