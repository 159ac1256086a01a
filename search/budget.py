"""Parameter budgets: `0.01%`, `1.39‱` (also written `1.39%%`), `0.5‰`, `1e-4` (fractions of the
backbone's parameters, embeddings included), or absolute counts `25k`, `6.3M`, `2G`, `25000`.

A bare number below 1 is a fraction; a bare whole number >= 1 is a count; anything else is an error.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import BudgetError

_FRACTION = {"%": 1e-2, "%%": 1e-4, "‱": 1e-4, "‰": 1e-3}
_COUNT = {"k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6, "g": 1e9, "G": 1e9, "b": 1e9, "B": 1e9}
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FORM = re.compile(rf"\s*({_NUMBER})\s*(%%|%|‱|‰|[kKmMgGbB])?\s*")
_HELP = "write a fraction of the backbone such as 0.01%, 1.39‱ (or 1.39%%), 1e-4, or a count such as 25k, 6.3M, 25000"


@dataclass(frozen=True)
class Budget:
    text: str           # what the user wrote
    params: int         # the absolute budget B
    fraction: float     # B / backbone parameters
    backbone: int

    def __str__(self):
        return f"{self.params:,} params ({self.fraction * 100:.4g}% of {self.backbone:,}; '{self.text}')"


def parse_budget(text, backbone_params: int) -> Budget:
    """The budget `text` as an absolute parameter count for a backbone of `backbone_params`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(text)
    if not isinstance(text, str):
        raise BudgetError(f"budget must be a string or a number, got {type(text).__name__}; {_HELP}")
    m = _FORM.fullmatch(text)
    if m is None:
        raise BudgetError(f"cannot read budget {text!r}; {_HELP}")
    value, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget {text!r} must be positive; {_HELP}")
    if unit in _FRACTION or (unit is None and value < 1):
        fraction = value * _FRACTION.get(unit, 1.0)
        if fraction >= 1:
            raise BudgetError(f"budget {text!r} is {fraction:.4g} of the backbone, not a fraction below 1; {_HELP}")
        params = math.floor(fraction * backbone_params + 1e-6)
    else:
        count = value * _COUNT.get(unit, 1.0)
        if unit is None and value != math.floor(value):
            raise BudgetError(f"budget {text!r} is neither a fraction below 1 nor a whole count; {_HELP}")
        params = math.floor(count + 1e-6)
    if params <= 0:
        raise BudgetError(f"budget {text!r} is less than one parameter of a {backbone_params:,}-parameter backbone; {_HELP}")
    return Budget(text, params, params / backbone_params, backbone_params)


def check_fits(budget: Budget, sizes, shared: int = 0) -> None:
    """The budget must buy at least the cheapest candidate and leave something to choose."""
    sizes = [int(n) for n in sizes]
    if not sizes:
        raise BudgetError("the search space has no candidates")
    total, cheapest = sum(sizes) + shared, min(sizes)
    if budget.params >= total:
        raise BudgetError(f"budget {budget} covers the whole search space ({total:,} params, {len(sizes)} "
                          f"candidates): nothing to search; pick a smaller budget (below {total:,}) or attach the space directly")
    if budget.params < cheapest + shared:
        raise BudgetError(f"budget {budget} is smaller than the cheapest candidate ({cheapest + shared:,} params); "
                          f"pick at least {cheapest + shared:,} params ({(cheapest + shared) / budget.backbone * 100:.3g}%)")
