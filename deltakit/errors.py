"""The exceptions a user can cause. Each message says what was wrong and what would be right."""
from __future__ import annotations

import difflib


class DeltakitError(Exception):
    """Base class of every error deltakit raises on purpose."""


class SpecError(DeltakitError, ValueError):
    """A spec string (or one of its parts) is malformed or names something unknown."""


class UnknownDeltaType(SpecError):
    pass


class OptionError(SpecError):
    """An unknown option, or an option value of the wrong type or range."""


class PatternError(SpecError):
    """A position pattern is malformed, or matches nothing."""


class KindError(SpecError):
    """A delta type was placed at a position kind it cannot take."""


class CheckpointError(DeltakitError):
    """A delta checkpoint is missing, unreadable, or does not fit the backbone."""


class HandleError(DeltakitError):
    """A handle was used in a state that does not allow the operation (detached, merged, name taken...)."""


class CallError(DeltakitError, TypeError):
    """A model with deltas was called in a way its deltas cannot follow (arguments, shapes)."""


def nearest(word: str, choices, n: int = 3) -> str:
    """' Did you mean: a, b?' for error messages, or '' when nothing is close."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    if not close and word:  # too short for difflib: 'rank' -> r, 'drop' -> dropout
        low = word.lower()
        close = [c for c in choices if c and (low.startswith(c.lower()) or c.lower().startswith(low))][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""


def listing(choices, limit: int = 12) -> str:
    choices = sorted(set(choices))
    more = f", ... ({len(choices) - limit} more)" if len(choices) > limit else ""
    return ", ".join(choices[:limit]) + more
