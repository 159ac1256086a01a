"""plan(): resolve a spec against a model without building anything, so every count is known up
front (the structure search and `deltakit plan` on a 10B config need it)."""
from __future__ import annotations

from dataclasses import dataclass

from . import spec as specs
from .deltas import TYPES
from .errors import KindError, SpecError, listing
from .positions import Position, match, positions


@dataclass(frozen=True)
class Planned:
    """One delta that attach() would build: where, what, with which options, and its size."""
    position: Position
    type: object        # deltakit.deltas.DeltaType
    options: object     # the type's Options
    num_params: int
    rule: str

    @property
    def key(self) -> str:
        return f"{self.position.name}.{self.type.name}"


@dataclass(frozen=True)
class SharedPlan:
    """Parameters one rule shares across its positions (a hypernetwork), counted once."""
    type: object
    options: object
    positions: tuple
    num_params: int
    rule: str


class Plan(list):
    """The Planned deltas, plus `shared`: rule text -> SharedPlan. `num_params` counts both."""

    def __init__(self, items=(), shared=None, family=None):
        super().__init__(items)
        self.shared: dict[str, SharedPlan] = dict(shared or {})
        self.family = family   # the model's family (deltakit.families), None for raw-name tables

    @property
    def num_params(self) -> int:
        return sum(p.num_params for p in self) + sum(s.num_params for s in self.shared.values())


def _is_wildcard(pattern: str) -> bool:
    return pattern.startswith("re:") or any(c in pattern for c in "*?[") or "-" in pattern


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _fitting(rule, dtype, opts, pattern: str, hits: list, table) -> list:
    """The hits `dtype` goes at. A glob skips positions of a kind the type cannot take (or where it
    would add nothing); a plain name does not: it is an error that says what fits."""
    wildcard = _is_wildcard(pattern)
    wrong = [p for p in hits if p.kind not in dtype.kinds]
    fits = [p for p in hits if p.kind in dtype.kinds]
    if not fits or (wrong and not wildcard):
        p = wrong[0]
        examples = listing({q.local for q in table if q.kind in dtype.kinds}, 8)
        raise KindError(f"in rule {rule.text!r}: {dtype.name} cannot go at {p.name!r}, {_article(p.kind)} {p.kind} "
                        f"position; {dtype.name} takes {', '.join(dtype.kinds)} positions, such as {examples}")
    sized = [p for p in fits if dtype.count(opts, p) > 0]   # e.g. `full` on a dropout: nothing to tune
    if not sized:
        raise KindError(f"in rule {rule.text!r}: {dtype.name} would add no parameters at "
                        f"{fits[0].name!r} (the module has none); pick a module with parameters")
    if len(sized) < len(fits) and not wildcard:
        bad = next(p for p in fits if p not in sized)
        raise KindError(f"in rule {rule.text!r}: {dtype.name} would add no parameters at {bad.name!r}")
    return sized


def plan(model, spec: str, table: list | None = None) -> Plan:
    """Resolve a spec against a model without building anything (counts are known up front).
    Shared parameters (hypernetworks) are in `.shared`, once per rule; `.num_params` is the total."""
    table = positions(model) if table is None else table
    planned, seen = Plan(family=getattr(table, "family", None)), {}
    for rule in specs.parse(spec):
        if rule.type not in TYPES:
            raise specs.unknown_type(rule.type, TYPES)
        dtype = TYPES[rule.type]
        opts = specs.make_options(dtype, rule.options, where=f"in rule {rule.text!r}: ")
        for pattern in rule.patterns or tuple(p.strip() for p in dtype.default.split(",")):
            for p in _fitting(rule, dtype, opts, pattern, match(model, table, pattern), table):
                item = Planned(p, dtype, opts, dtype.count(opts, p), rule.text)
                if item.key in seen:
                    if seen[item.key].rule != rule.text:
                        raise SpecError(f"{dtype.name} at {p.name!r} is asked for twice, by {seen[item.key].rule!r} "
                                        f"and {rule.text!r}; keep one (or use a second handle with name=...)")
                    continue
                seen[item.key] = item
                planned.append(item)
        if dtype.build_shared is not None:
            where = tuple(p.position for p in planned if p.rule == rule.text)
            planned.shared[rule.text] = SharedPlan(dtype, opts, where, dtype.count_shared(opts, where), rule.text)
    return planned
