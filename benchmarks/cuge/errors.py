"""The one error benchmarks.cuge raises on purpose. It is a `deltakit.DeltakitError`, so
`except deltakit.DeltakitError` catches it too, and a ValueError for callers that expect one."""
from __future__ import annotations

from deltakit.errors import DeltakitError


class CugeError(DeltakitError, ValueError):
    """A CUGE dataset name, data folder, file, metric input or run folder is wrong; the message says
    where (path:line for files), what was wrong and what would be right."""
