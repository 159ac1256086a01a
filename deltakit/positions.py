"""Canonical positions of a model, and matching of position patterns against them.

`positions(model)` reads the model with the family tables of `families.py` (`detect` picks the one
that fits best and fits every layer list; `families.py` says the rule) and returns `Position`
records; a model no table fits gets its Linear, norm and embedding modules by raw name, and a note
saying which table came closest and what it lacked. Patterns are globs over dotted names where
`*` is one segment and `a-b` is a range of layer numbers; a pattern without a stack or a
`layers.N` part applies to every stack and every layer. `re:` patterns are regexes fully matched
against raw module paths.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, replace

from torch import nn

from .errors import PatternError, nearest, listing
from .families import FAMILIES, Family, Slice, Sub


@dataclass(frozen=True)
class Position:
    name: str                  # canonical name, e.g. "layers.3.attn.q" or "encoder.layers.0.ffn"
    path: str                  # raw path of the module deltas attach to
    kind: str                  # linear | norm | attention | block | embed | rows | module
    shape: tuple               # linear: (in, out); norm/attention/block: (dim,); embed: (rows, dim)
    local: str = ""            # name inside one layer ("attn.q"), or the model-level name
    stack: str | None = None
    layer: int | None = None
    slice: tuple | None = None  # (start, stop) output features of a fused projection
    inp: str | None = None      # sub-blocks: module whose input is the sub-block input
    out: str | None = None      # sub-blocks: module whose output is the residual branch
    params: int = 0             # parameters of the module at `path` (what `full` would tune)
    kv: int | None = None       # attention sub-blocks: width of the projected keys (what a prefix needs)
    raw: bool = False           # found by a `re:` pattern, outside the canonical table
    calls: tuple = ()           # modules that run this position's parameters when `path` is never called

    @property
    def pattern(self) -> str:
        """A spec pattern that selects this position again (what a rebuilt spec writes)."""
        return f"re:{re.escape(self.path)}" if self.raw else self.name

    @property
    def width(self) -> int:
        """The width of what the position puts out: a projection's out features (of its slice),
        else the hidden size of the norm, sub-block or embedding."""
        return self.shape[1] if self.kind in ("linear", "embed", "rows") else self.shape[0]

    def __str__(self):
        return f"{self.name:<28} {self.kind:<9} {str(self.shape):<14} {self.path}"


def is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # HF GPT-2 Conv1D


def is_norm(module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "Norm" in type(module).__name__


def linear_dims(module) -> tuple:
    if isinstance(module, nn.Linear):
        return (module.in_features, module.out_features)
    return tuple(module.weight.shape)  # Conv1D stores weight as (in, out)


def module_kind(module) -> str:
    if is_linear(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embed"
    if is_norm(module) and getattr(module, "weight", None) is not None:
        return "norm"
    return "module"


def module_shape(module) -> tuple:
    kind = module_kind(module)
    if kind == "linear":
        return linear_dims(module)
    if kind == "embed":
        return tuple(module.weight.shape)
    if kind == "norm":
        return (module.weight.shape[-1],)
    return ()


HOLDER = "deltakit"   # every delta lives in a child module of this name, next to what it changes


def is_backbone(name: str) -> bool:
    """Is this dotted parameter or module name the backbone's own (not inside a delta holder)?"""
    return HOLDER not in name.split(".")


def backbone_modules(model) -> dict:
    """Named modules, without deltas that deltakit placed in the model."""
    return {n: m for n, m in model.named_modules() if is_backbone(n)}


def backbone_params(module) -> list:
    """(name, parameter) of the backbone's own parameters, without deltas."""
    return [(n, p) for n, p in module.named_parameters() if is_backbone(n)]


# ---- building the table ------------------------------------------------------------------------

def _kind_of(local: str, module) -> str:
    if local in ("attn", "cross"):
        return "attention"
    if local == "ffn":
        return "block"
    if local.startswith("ln."):
        return "norm"
    if local == "embed":
        return "embed"
    if local == "prompt":   # a native prompt table whose rows are picked by task id (CPM-Ant's prompt_embedding)
        return "rows"
    return module_kind(module)


def _resolve(entry, base: str, modules: dict):
    """The raw path (and slice spec) of one table entry under `base`, or None if absent."""
    if isinstance(entry, Slice):
        path = f"{base}{entry.path}"
        return (path, entry) if path in modules else None
    for alt in (entry if isinstance(entry, tuple) else (entry,)):
        if f"{base}{alt}" in modules:
            return f"{base}{alt}", None
    return None


def _layer_positions(family: Family, stack: str, prefix: str, index: int, modules: dict) -> list:
    base = f"{prefix}{index}."
    table = family.layer_table(stack)
    head = (f"{stack}." if stack else "") + f"layers.{index}."
    found: dict[str, Position] = {}
    for local, entry in table.items():
        if isinstance(entry, Sub):
            continue
        hit = _resolve(entry, base, modules)
        if hit is None:
            continue
        path, sl = hit
        module = modules[path]
        shape = module_shape(module) if local.startswith("ln.") else None
        cut = None
        if sl is not None:  # a part of a fused projection: the slice of output features
            fan_in, fan_out = linear_dims(module)
            step = fan_out // sl.parts
            cut = (sl.index * step, (sl.index + 1) * step)
            shape = (fan_in, step)
        found[local] = Position(head + local, path, _kind_of(local, module), shape or module_shape(module),
                                local, stack or None, index, cut)
    for local, entry in table.items():  # sub-blocks refer to projections found above
        if not isinstance(entry, Sub) or entry.inp not in found or entry.out not in found:
            continue
        module_path = f"{base}{entry.module}" if entry.module else found[entry.out].path
        if module_path not in modules:
            continue
        dim = found[entry.out].shape[1]
        keys = found.get(f"{local}.k")   # attn -> attn.k, cross -> cross.k
        found[local] = Position(head + local, module_path, _kind_of(local, None), (dim,), local, stack or None,
                                index, None, found[entry.inp].path, found[entry.out].path,
                                kv=keys.shape[1] if keys is not None else None)
    order = list(table)
    return sorted(found.values(), key=lambda p: order.index(p.local))


def _layer_lists(modules: dict) -> dict:
    """Every list of numbered layers: path -> sorted layer indices. A list inside a layer of another
    list is part of that layer (T5's `block.N.layer`), not a stack of its own."""
    lists: dict[str, set] = {}
    for name in modules:
        head, _, last = name.rpartition(".")
        if head and last.isdigit():
            lists.setdefault(head, set()).add(int(last))

    def nested(path):
        parts = path.split(".")
        return any(parts[k].isdigit() and ".".join(parts[:k]) in lists for k in range(1, len(parts)))
    return {path: sorted(idx) for path, idx in lists.items() if not nested(path)}


def _layer_linears(modules: dict, lists: dict) -> dict:
    """(layer-list path, index) -> raw paths of the projections inside that layer."""
    out: dict[tuple, list] = {}
    for name, module in modules.items():
        if not is_linear(module):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) - 1):
            if parts[k].isdigit() and ".".join(parts[:k]) in lists:
                out.setdefault((".".join(parts[:k]), int(parts[k])), []).append(name)
                break
    return out


TOWER_LINEARS = 4   # a layer with this many projections is a transformer block (q, k, v, o / qkv, o, in, out)


def _towers(lists: dict, linears: dict) -> list:
    """The layer lists that look like stacks of transformer blocks: nothing may be placed on some
    of them silently, so a family fits only if it names all of them."""
    return [path for path, indices in lists.items()
            if max(len(linears.get((path, i), ())) for i in indices) >= TOWER_LINEARS]


@dataclass
class _Fit:
    """One family stack read over one layer list."""
    stack: str
    path: str
    layers: dict          # index -> [Position]
    score: int            # required entries found, over all layers
    problem: str | None   # why the table does not fit every layer, or None


def _layer_range(indices) -> str:
    return ", ".join(str(i) for i in indices[:6]) + (", ..." if len(indices) > 6 else "")


def _fit(family: Family, stack: str, path: str, indices: list, modules: dict, linears: dict) -> _Fit:
    """A layer may lack an entry only where it has nothing the entry could be: a compressed CPM-Ant
    layer without attention has no projection the table leaves unread, while a LLaMA table reading
    a BART layer leaves `out_proj`, `fc1`, `fc2` unread. An optional entry may also be missing from
    every layer (a mixture-of-experts decoder has no `mlp`): then no pattern can hit part of it."""
    layers = {i: _layer_positions(family, stack, f"{path}.", i, modules) for i in indices}
    found = {i: {p.local for p in ps} for i, ps in layers.items()}
    need = family.required_in(stack)
    score = sum(len(set(need) & f) for f in found.values())
    unread = {i: sorted(set(linears.get((path, i), ())) - {p.path for p in layers[i]}) for i in indices}
    for local in dict.fromkeys((*need, *family.layer_table(stack))):
        lacking = [i for i in indices if local not in found[i] and unread[i]]
        if lacking and (local in need or any(local in f for f in found.values())):
            first = unread[lacking[0]]
            problem = (f"fits {path!r} only in part: layer{'s' * (len(lacking) > 1)} {_layer_range(lacking)} "
                       f"of {len(indices)} lack{'s' * (len(lacking) == 1)} {local!r} but "
                       f"ha{'ve' if len(lacking) > 1 else 's'} projections it does not read "
                       f"({first[0]!r}{', ...' if len(first) > 1 else ''})")
            return _Fit(stack, path, layers, score, problem)
    return _Fit(stack, path, layers, score, None)


@dataclass
class Detection:
    """Which family a model is, where its stacks are, and (when none fits) why not."""
    family: Family | None
    stacks: dict          # stack name -> layer-list path
    layers: list          # the per-layer Positions, in stack order
    score: int = 0
    note: str | None = None


def _read(family: Family, modules: dict, lists: dict, linears: dict, towers: list) -> Detection | None:
    fits = []
    for stack, layer_re in family.stacks.items():
        pattern = re.compile(rf"(?:.*\.)?{layer_re}")
        for path, indices in lists.items():
            if pattern.fullmatch(path):
                fit = _fit(family, stack, path, indices, modules, linears)
                if fit.score:
                    fits.append(fit)
    if not fits:
        return None
    score = sum(f.score for f in fits)
    problem = next((f.problem for f in fits if f.problem), None)
    for stack in family.stacks:
        paths = [f.path for f in fits if f.stack == stack]
        if problem is None and len(paths) > 1:
            problem = (f"fits {len(paths)} layer lists ({', '.join(paths)}) with its one "
                       f"{repr(stack) + ' ' if stack else ''}stack, so a pattern could not tell them apart")
    placed = {f.path for f in fits}
    if problem is None and len(placed) < len(fits):
        problem = "reads one layer list as two of its stacks"
    missing = [p for p in towers if p not in placed]
    if problem is None and missing:
        problem = (f"has no stack for {', '.join(f'{p!r} ({len(lists[p])} layers)' for p in missing)}, "
                   f"{'a stack' if len(missing) == 1 else 'stacks'} of transformer blocks")
    layers = [p for f in fits for i in sorted(f.layers) for p in f.layers[i]]
    return Detection(family, {f.stack: f.path for f in fits}, layers, score,
                     None if problem is None else f"{family.name}, {problem}")


def detect(model_or_modules) -> Detection:
    """Read the model with every family's tables; the best one that fits every layer wins."""
    modules = model_or_modules if isinstance(model_or_modules, dict) else backbone_modules(model_or_modules)
    lists = _layer_lists(modules)
    linears = _layer_linears(modules, lists)
    towers = _towers(lists, linears)
    reads = [d for d in (_read(f, modules, lists, linears, towers) for f in FAMILIES) if d is not None]
    fitting = [d for d in reads if d.note is None]
    if fitting:
        return max(fitting, key=lambda d: d.score)   # max keeps the first of equal scores
    if not reads:
        return Detection(None, {}, [])
    closest = max(reads, key=lambda d: d.score)
    note = (f"no family table fits every layer of this model: the closest, {closest.note}. Canonical names would "
            f"place a spec on part of the model, so it has only raw module names: address them with 're:<regex>' "
            f"patterns")
    return Detection(None, {}, [], note=note)


def _top_positions(family: Family, modules: dict) -> list:
    out = []
    for name, suffixes in family.top.items():
        for suffix in (suffixes if isinstance(suffixes, tuple) else (suffixes,)):
            path = next((n for n in modules if n == suffix or n.endswith("." + suffix)), None)
            if path is not None:
                module = modules[path]
                stack = name.split(".")[0] if name.split(".")[0] in family.stacks and "." in name else None
                local = name[len(stack) + 1:] if stack else name
                kind = _kind_of(local, module)
                shape = module_shape(module)
                if kind in ("embed", "rows") and not shape and hasattr(module, "weight"):   # not an nn.Embedding
                    shape = tuple(module.weight.shape)
                calls = tuple(n for suffix in family.called_as.get(name, ()) for n in modules
                              if n == suffix or n.endswith("." + suffix))
                out.append(Position(name, path, kind, shape, local, stack, calls=calls))
                break
    return out


def _generic_positions(modules: dict) -> list:
    out = []
    for path, module in modules.items():
        kind = module_kind(module)
        if path and kind != "module":
            out.append(Position(path, path, kind, module_shape(module), path))
    return out


def family(model) -> Family | None:
    return detect(model).family


def _num_params(module) -> int:
    return sum(p.numel() for _, p in backbone_params(module))


class PositionTable(list):
    """A list of Positions that prints as a table (in a terminal and in Jupyter). `note` says why a
    model has only raw names when a family table nearly fits it."""

    note: str | None = None
    family: Family | None = None   # the family whose tables the names come from

    def __str__(self):
        head = f"{'name':<28} {'kind':<9} {'shape':<14} module"
        return "\n".join(([f"# {self.note}"] if self.note else []) + [head] + [str(p) for p in self])

    def _repr_pretty_(self, printer, cycle):   # IPython / Jupyter
        printer.text(str(self))

    def names(self) -> list[str]:
        return [p.name for p in self]


def positions(model) -> PositionTable:
    """The canonical position table of `model` (a generic table of raw names for unknown models)."""
    modules = backbone_modules(model)
    found = detect(modules)
    if found.family is not None:
        table = found.layers + _top_positions(found.family, modules)
    else:
        table = _generic_positions(modules)
    out = PositionTable(replace(p, params=_num_params(modules[p.path])) for p in table)
    out.note, out.family = found.note, found.family
    return out


# ---- matching ----------------------------------------------------------------------------------

_GLOB = re.compile(r"[A-Za-z0-9_*?\[\]!\-]+(\.[A-Za-z0-9_*?\[\]!\-]+)*")
_RANGE = re.compile(r"(\d+)-(\d+)")


def _segment_match(pat: str, seg: str) -> bool:
    if pat == "*":
        return True
    m = _RANGE.fullmatch(pat)
    if m:
        return seg.isdigit() and int(m.group(1)) <= int(seg) <= int(m.group(2))
    return fnmatch.fnmatchcase(seg, pat)


def _glob_match(pat: list, name: list) -> bool:
    return len(pat) == len(name) and all(_segment_match(p, s) for p, s in zip(pat, name))


def _expansions(pattern: str, stacks: set, canonical: bool) -> list[list[str]]:
    """A pattern without a stack or layer part stands for every stack and every layer."""
    segs = pattern.split(".")
    if not canonical:
        return [segs]
    stack = [segs[0]] if segs[0] in stacks else None
    rest = segs[1:] if stack else segs
    stack_opts = [stack] if stack else ([[]] + ([["*"]] if stacks else []))
    layer_opts = [[]] if "layers" in rest else [[], ["layers", "*"]]
    return [s + l + rest for s in stack_opts for l in layer_opts]


def check_pattern(pattern: str):
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except (re.error, OverflowError, RecursionError) as e:  # a{4294967296}; deeply nested groups
            raise PatternError(f"bad regular expression in pattern {pattern!r}: {e}") from None
        if not pattern[3:]:
            raise PatternError("empty regular expression after 're:'")
        return
    if not _GLOB.fullmatch(pattern):
        raise PatternError(f"{pattern!r} is not a position pattern: use dotted names with '*' for one segment "
                           f"and 'a-b' for layer ranges (e.g. 'layers.0-5.attn.q'), or 're:<regex>' for raw "
                           f"module names")
    for seg in pattern.split("."):
        m = _RANGE.fullmatch(seg)
        if m and int(m.group(1)) > int(m.group(2)):
            raise PatternError(f"layer range {seg!r} in {pattern!r} is empty: write low-high, e.g. '0-11'")


def match(model, table: list, pattern: str) -> list[Position]:
    """Positions of `table` that `pattern` selects; a PatternError if there are none."""
    check_pattern(pattern)
    if pattern.startswith("re:"):
        return _match_regex(model, table, pattern)
    canonical = any(p.layer is not None for p in table)
    stacks = {p.stack for p in table if p.stack}
    hits = []
    for segs in _expansions(pattern, stacks, canonical):
        hits += [p for p in table if _glob_match(segs, p.name.split(".")) and p not in hits]
    hits.sort(key=table.index)
    if not hits:
        names = {p.local for p in table} | {p.name for p in table if p.layer is None}
        if stacks:
            names |= {f"{p.stack}.{p.local}" for p in table if p.stack}
        note = getattr(table, "note", None) or (None if canonical else detect(model).note)
        if note:   # a family nearly fits: say what it lacks rather than suggest raw names
            raise PatternError(f"pattern {pattern!r} matches no position of this {type(model).__name__}: {note} "
                               f"(deltakit.positions(model) lists them, e.g. {listing(names, 3)})")
        raise PatternError(f"pattern {pattern!r} matches no position of this {type(model).__name__}."
                           f"{nearest(pattern, names)} Positions here: {listing(names)} "
                           f"(all of them: deltakit.positions(model); raw module names: 're:<regex>')")
    return hits


def _match_regex(model, table, pattern) -> list[Position]:
    regex = re.compile(pattern[3:])
    modules = backbone_modules(model)
    by_path = {}
    for p in table:  # a raw path that is a canonical position keeps its canonical name
        if p.slice is None:
            by_path.setdefault(p.path, []).append(p)
    hits = []
    for path, module in modules.items():
        if path and regex.fullmatch(path):
            # one module can be two positions (BERT's output.dense: ffn.out, and the ffn block that ends
            # there): the module's own kind names it
            named = sorted(by_path.get(path, ()), key=lambda p: p.kind != module_kind(module))
            hits.append(named[0] if named else Position(path, path, module_kind(module), module_shape(module), path,
                                                      params=_num_params(module), raw=True))
    if not hits:
        raise PatternError(f"regex {pattern!r} matches no module name (it must match a whole path such as "
                           f"{next((n for n in modules if n.count('.') >= 2), 'encoder.layer.0')!r}; "
                           f"try 're:.*<name>')")
    return hits
