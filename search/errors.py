"""Errors a user of the search can cause (bad budget, bad search space, bad data). All are
`deltakit.errors.DeltakitError`s, so `except deltakit.DeltakitError` catches them too."""
from __future__ import annotations

from deltakit.errors import DeltakitError


class SearchError(DeltakitError, ValueError):
    """A search setting or input is wrong; the message says what would be right."""


class BudgetError(SearchError):
    """A budget string is malformed, not positive, or does not fit the search space."""


class DataError(SearchError):
    """A task file is missing, malformed, or has too few examples/labels."""
