"""docs/reference.md, generated from the code so it cannot drift: `python -m deltakit.reference`
writes it, `python -m deltakit.reference --check` exits 1 when it is out of date (a test runs that).

What it reads, and nothing else: the spec grammar (the docstrings of deltakit/spec.py and
deltakit/positions.py), the delta type registry (`deltakit.delta_types`: options with their types,
defaults and the comments beside them in the source, position kinds, joins, default placement),
the family tables (`deltakit.families.FAMILIES`), and the argparse parser of every command line:
`deltakit` (deltakit/cli.py) and every module of the `search` and `benchmarks` packages that runs
as `python -m` (it has an `if __name__ == "__main__":` block). Each exposes a `parser()` function;
one without it is an error here, so a new command line cannot be left out.

It lives in deltakit (not tools/) so that it runs, and its test imports it, wherever the package is
installed; nothing in deltakit imports it, and it imports search and benchmarks only when run.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import io
import pkgutil
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

COMMAND = "python -m deltakit.reference"
PATH = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
PACKAGES = ("search", "benchmarks")   # scanned for `python -m` entry points
WIDTH = 100                           # usage lines are wrapped here, whatever the terminal


class ReferenceError(Exception):
    pass


# ---- markdown helpers --------------------------------------------------------------------------

def _cell(value) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header, rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _docstring_md(doc: str) -> list[str]:
    """A docstring as markdown: indented blocks (after '::') become code blocks."""
    out, lines = [], inspect.cleandoc(doc).split("\n")
    code = False
    for line in lines:
        indented = line.startswith("    ")
        if indented and not code:
            out.append("```")
            code = True
        elif code and line.strip() and not indented:
            out += ["```", ""]
            code = False
        if code and not line.strip():
            continue
        out.append(line[4:] if code else line.replace("::", ":"))
    return out + (["```"] if code else [])


def _comments(obj) -> dict:
    """Source line number -> the comment on it, for an object whose source is available."""
    try:
        source, first = inspect.getsourcelines(obj)
    except (OSError, TypeError):
        return {}
    tokens = tokenize.generate_tokens(io.StringIO("".join(source)).readline)
    return {tok.start[0] + first - 1: tok.string.lstrip("#").strip() for tok in tokens if tok.type == tokenize.COMMENT}


# ---- the spec grammar and the delta types ------------------------------------------------------

def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _field_comments(cls) -> dict:
    """Option name -> the comment beside its declaration in the Options class."""
    try:
        source, first = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    comments = _comments(cls)
    out = {}
    for i, line in enumerate(source, first):
        m = re.match(r"\s+(\w+)\s*:", line)
        if m and i in comments:
            out[m.group(1)] = comments[i]
    return out


def _default(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return repr(value) if value == "" else str(value)


def _join(dtype) -> str:
    if dtype.join_of is None:
        return dtype.join
    return f"{dtype.join} by default; chosen per position and options (`join_of`)"


def delta_types_md() -> list[str]:
    from .deltas import TYPES
    out = ["## Delta types", "",
           f"{len(TYPES)} types are registered (`deltakit.delta_types`; `deltakit.register` adds one). "
           "Kinds are `Position.kind` values (`deltakit positions MODEL` shows each position's kind).", ""]
    out += _table(("type", "what", "position kinds", "joins as", "default placement"),
                  [(f"`{name}`", t.doc, ", ".join(t.kinds), _join(t), f"`{t.default}`") for name, t in TYPES.items()])
    for name, t in TYPES.items():
        out += ["", f"### `{name}`", ""]
        module_doc = inspect.getdoc(sys.modules.get(t.build.__module__)) or ""
        if module_doc:
            out += [" ".join(module_doc.split("\n\n")[0].split()), ""]
        extras = []
        if t.positional:
            extras.append(f"the first value may be written without its name: `{name}(x, ...)` sets `{t.positional}`")
        if t.build_shared is not None:
            extras.append("one module per rule is shared by all its positions and counted once (`Plan.shared`)")
        out += [f"* {e}" for e in extras] + ([""] if extras else [])
        fields = dataclasses.fields(t.options)
        if not fields:
            out.append("No options.")
            continue
        hints = typing.get_type_hints(t.options)
        notes = _field_comments(t.options)
        out += _table(("option", "type", "default", "note"),
                      [(f"`{f.name}`", _type_name(hints[f.name]), _default(f), notes.get(f.name, "")) for f in fields])
    return out


def grammar_md() -> list[str]:
    from . import spec
    positions = importlib.import_module("deltakit.positions")   # (deltakit.positions is also the function)
    record = positions.Position
    hints, notes = typing.get_type_hints(record), _field_comments(record)
    return ["## Spec strings", "", *_docstring_md(spec.__doc__), "", "### Positions and patterns", "",
            *_docstring_md(positions.__doc__), "",
            "`deltakit.positions(model)` returns one `Position` record per position:", "",
            *_table(("field", "type", "note"), [(f"`{f.name}`", _type_name(hints[f.name]), notes.get(f.name, ""))
                                                for f in dataclasses.fields(record)])]


# ---- families ----------------------------------------------------------------------------------

def _entry(value) -> str:
    from .families import Slice, Sub
    if isinstance(value, Slice):
        return f"`{value.path}`, output part {value.index + 1} of {value.parts}"
    if isinstance(value, Sub):
        return (f"sub-block `{value.module}`" if value.module else "sub-block") + \
            f" (input of {value.inp}, output of {value.out})"
    if isinstance(value, tuple):
        return " or ".join(f"`{v}`" for v in value)
    return f"`{value}`"


def _family_notes() -> dict:
    """Family name -> the comment on its name line in families.py (e.g. which models it covers)."""
    from . import families
    comments = _comments(families)
    try:
        source, first = inspect.getsourcelines(families)
    except (OSError, TypeError):
        return {}
    out = {}
    for i, line in enumerate(source, first):
        m = re.match(r'\s+"(\w+)",', line)
        if m and i in comments and "Family(" in source[i - first - 1]:
            out[m.group(1)] = comments[i]
    return out


JOIN_FIELDS = ("called_as", "prefix_cache", "prompt_slots", "weight_scale", "counted_positions")


def families_md() -> list[str]:
    from .families import FAMILIES, Family
    notes = _family_notes()
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(Family) if f.name in JOIN_FIELDS}
    out = ["## Families and their positions", "",
           "Each family is one data table in `deltakit/families.py` (its docstring says how a model's family is "
           "found). Per-layer names are written after `layers.N.` (and the stack, when a family has several); "
           "required entries (**bold**) must be in every layer that has projections for them.", ""]
    for fam in FAMILIES:
        out += [f"### `{fam.name}`", ""]
        if fam.name in notes:
            out += [notes[fam.name], ""]
        stacks = ", ".join(f"`{s or '(one stack)'}` = layers matching `{r}`" for s, r in fam.stacks.items())
        out += [f"Stacks: {stacks}.", ""]
        tables = {s: fam.layer_table(s) for s in fam.stacks}
        groups: dict = {}   # stacks with the same table share one listing
        for stack, table in tables.items():
            groups.setdefault(id(table), ([], table))[0].append(stack)
        for stacks_, table in groups.values():
            if len(tables) > 1:
                out += [f"Layers of {', '.join(f'`{s}`' for s in stacks_)}:", ""]
            need = set(fam.required_in(stacks_[0]))
            out += _table(("position", "module in the layer"),
                          [(f"**{k}**" if k in need else k, _entry(v)) for k, v in table.items()])
            out.append("")
        out += ["Model-level positions:", ""]
        out += _table(("position", "module (path suffix)"), [(k, _entry(v)) for k, v in fam.top.items()])
        special = [f"`{name}` = {getattr(fam, name)!r}" for name in JOIN_FIELDS if getattr(fam, name) != defaults[name]]
        if special:
            out += ["", "How deltas reach it (see the families.py docstring): " + "; ".join(special) + "."]
        out.append("")
    return out


# ---- command lines -----------------------------------------------------------------------------

def _runs_as_main(path: Path) -> tuple[bool, bool]:
    """(has an `if __name__ == "__main__":` block, defines parser()) of a module's source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    main = any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test)
               for node in tree.body)
    has_parser = any(isinstance(node, ast.FunctionDef) and node.name == "parser" for node in tree.body)
    return main, has_parser


def entry_points(packages=PACKAGES) -> list[str]:
    """Every module of `packages` that runs as `python -m`; a ReferenceError names those without parser()."""
    found, lacking = [], []
    for package in packages:
        pkg = importlib.import_module(package)
        for info in sorted(pkgutil.walk_packages(pkg.__path__, package + "."), key=lambda i: i.name):
            origin = importlib.util.find_spec(info.name).origin
            if not origin or not origin.endswith(".py"):
                continue
            main, has_parser = _runs_as_main(Path(origin))
            if main and has_parser:
                found.append(info.name)
            elif main:
                lacking.append(info.name)
    if lacking:
        raise ReferenceError(f"{', '.join(lacking)} run{'s' * (len(lacking) == 1)} as python -m but define no "
                             f"parser() function returning its argparse parser: factor it out of main() so "
                             f"{COMMAND} can document the flags")
    return found


def _value(action) -> str:
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return " | ".join(map(str, action.choices))
    if action.metavar:
        return str(action.metavar)
    kind = getattr(action.type, "__name__", None) if action.type else "text"
    return "text" if kind in (None, "str") or (kind and kind.startswith("_")) else kind


def _default_text(action) -> str:
    d = action.default
    if d is None or d is argparse.SUPPRESS or action.nargs == 0 or action.required:
        return ""
    return repr(d) if d == "" else str(d)


def _help(action, prog: str) -> str:
    text = action.help or ""
    if "%(" in text:   # what argparse's formatter does with %(default)s, %(prog)s
        params = {**vars(action), "prog": prog}
        params = {k: getattr(v, "__name__", v) for k, v in params.items()}
        text = text % params
    return text


def parser_md(name: str, p: argparse.ArgumentParser, level: int = 3) -> list[str]:
    p.prog = name
    p.formatter_class = functools.partial(p.formatter_class, width=WIDTH)
    out = [f"{'#' * level} `{name}`", ""]
    if p.description:
        out += [" ".join(p.description.split("\n\n")[0].split()), ""]
    out += ["```", p.format_usage().strip(), "```", ""]
    rows, subcommands = [], []
    for action in p._actions:   # argparse's documented parsers keep their arguments here
        if isinstance(action, argparse._HelpAction) or action.help is argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            subcommands = list(action.choices.items())
            continue
        flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
        rows.append((flags, _value(action), _default_text(action), _help(action, name)))
    if rows:
        out += _table(("argument", "value", "default", "help"), rows) + [""]
    if p.epilog:
        out += [" ".join(p.epilog.split()), ""]
    for sub_name, sub in subcommands:
        sub.epilog = None   # said once, above
        out += parser_md(f"{name} {sub_name}", sub, level + 1)
    return out


def commands_md(packages=PACKAGES) -> list[str]:
    from . import cli
    out = ["## Command lines", "",
           "Every flag of every command, read from its argparse parser (`--help` prints the same).", ""]
    out += parser_md("deltakit", cli.parser())
    for module in entry_points(packages):
        out += parser_md(f"python -m {module}", importlib.import_module(module).parser())
    return out


# ---- the file ----------------------------------------------------------------------------------

def render(packages=PACKAGES) -> str:
    lines = [f"<!-- Generated from the code by `{COMMAND}`: edit the code, then run it. Do not edit by hand. -->",
             "", "# deltakit reference", "",
             "The spec grammar, every delta type with its options, every family's positions and every command "
             "line's flags. The [README](../README.md) is the guide; this file is the lookup.", "",
             "* [Spec strings](#spec-strings)", "* [Delta types](#delta-types)",
             "* [Families and their positions](#families-and-their-positions)", "* [Command lines](#command-lines)",
             "", *grammar_md(), "", *delta_types_md(), "", *families_md(), *commands_md(packages)]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description="Write docs/reference.md from the code.")
    ap.add_argument("--out", type=Path, default=PATH, help="where to write it (default: the repository's docs/)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when the file is out of date")
    args = ap.parse_args(argv)
    try:
        text = render()
    except ReferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        if not args.out.is_file() or args.out.read_text(encoding="utf-8") != text:
            print(f"{args.out} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    from .io import write_text
    write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
