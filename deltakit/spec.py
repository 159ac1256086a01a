"""Parse spec strings such as ``"lora(r=8,alpha=16)@attn.q,attn.v; adapter(dim=64)@ffn"``.

Grammar (see DESIGN.md)::

    spec     := rule (";" rule)*
    rule     := type ["(" key=value ("," key=value)* ")"] ["@" pattern ("," pattern)*]
    pattern  := canonical position glob | "re:" regex over raw module names

A rule without ``@`` uses the delta type's default placement. Separators inside
brackets are not split, so ``re:layer\\.\\d{1,2}\\.q`` and ``hyper(lora(r=4),dim=8)`` work.
Values are parsed as literals (int, float, bool, none, quoted or bare strings):
nothing is ever evaluated.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass

from .errors import OptionError, PatternError, SpecError, UnknownDeltaType, nearest, listing

_OPEN, _CLOSE = "([{", ")]}"


@dataclass(frozen=True)
class Rule:
    type: str
    options: dict          # raw parsed values, validated later against the type's Options
    patterns: tuple        # empty: the type's default placement
    text: str              # the rule as written, for error messages

    def __str__(self):
        return self.text


def split_top(text: str, sep: str) -> list[str]:
    """Split on `sep` where no bracket is open. A backslash escapes the next character, so a
    regex may hold a literal bracket as ``\\(`` or ``[\\]]``."""
    parts, opened, start, escaped = [], [], 0, False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in _OPEN:
            opened.append(i)
        elif ch in _CLOSE:
            if not opened:
                raise _bracket_error(f"unbalanced '{ch}' at character {i} of {text!r}", text, i)
            opened.pop()
        elif ch == sep and not opened:
            parts.append(text[start:i])
            start = i + 1
    if opened:
        i = opened[0]
        raise _bracket_error(f"unclosed '{text[i]}' at character {i} of {text!r}", text, i)
    parts.append(text[start:])
    return parts


def _bracket_error(message: str, text: str, i: int) -> SpecError:
    """A PatternError when the bracket is in a pattern (after its rule's '@'), else a SpecError."""
    rule_start = text.rfind(";", 0, i) + 1
    if "@" in text[rule_start:i]:
        return PatternError(f"{message}: a bracket in a pattern must be closed; in a 're:' regex, "
                            f"write a literal bracket with a backslash, e.g. '\\('")
    return SpecError(message)


def parse(spec: str) -> list[Rule]:
    if not isinstance(spec, str):
        raise SpecError(f"a spec must be a string such as 'lora@attn.q,attn.v', got {type(spec).__name__}")
    rules = [r.strip() for r in split_top(spec, ";")]
    rules = [r for r in rules if r]
    if not rules:
        raise SpecError("empty spec: write at least one rule, e.g. 'lora@attn.q,attn.v'")
    return [_parse_rule(r) for r in rules]


_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _parse_rule(text: str) -> Rule:
    head, *at = split_top(text, "@")
    if len(at) > 1:
        raise SpecError(f"rule {text!r} has more than one '@'; separate rules with ';'")
    head = head.strip()
    m = _TYPE.match(head)
    if not m:
        raise SpecError(f"rule {text!r} must start with a delta type name such as 'lora' or 'adapter'")
    name, rest = m.group(0), head[m.end():].strip()
    options = {}
    if rest:
        if not (rest.startswith("(") and rest.endswith(")")):
            raise SpecError(f"in rule {text!r}: after the type name {name!r} expected '(key=value, ...)' or '@', got {rest!r}")
        options = _parse_options(rest[1:-1], text)
    patterns = ()
    if at:
        patterns = tuple(p.strip() for p in split_top(at[0], ","))
        if not all(patterns):
            raise SpecError(f"in rule {text!r}: empty pattern after '@' (write e.g. '@attn.q,attn.v')")
    return Rule(name, options, patterns, text)


def _parse_options(body: str, text: str) -> dict:
    options: dict = {}
    if not body.strip():
        return options
    for i, item in enumerate(split_top(body, ",")):
        item = item.strip()
        if not item:
            raise SpecError(f"in rule {text!r}: an empty option (a stray ',' in '({body})')")
        key, *value = split_top(item, "=")   # an '=' inside brackets is part of the value
        key, value, eq = key.strip(), "=".join(value), bool(value)
        if not eq:
            if i == 0:  # a leading positional value, e.g. hyper(lora, ...)
                key, value = "_", item
            else:
                raise SpecError(f"in rule {text!r}: option {item!r} must be written key=value")
        elif not _TYPE.fullmatch(key):
            raise SpecError(f"in rule {text!r}: {key!r} is not a valid option name")
        if key in options:
            raise SpecError(f"in rule {text!r}: option {key!r} is given twice")
        options[key] = literal(value.strip(), text)
    return options


_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def literal(value: str, text: str = ""):
    """A spec value as a Python literal, without eval."""
    if value == "":
        raise SpecError(f"in rule {text!r}: an option has no value")
    try:
        if _INT.fullmatch(value):
            return int(value)
        if _FLOAT.fullmatch(value):
            return float(value)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        raise SpecError(f"in rule {text!r}: the number {value[:20]}... has too many digits") from None
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value  # a bare word, such as init=gaussian or hyper(lora, ...)


# ---- typed options -----------------------------------------------------------------------------

def make_options(delta_type, raw: dict, where: str = ""):
    """Validate raw option values against the delta type's Options dataclass."""
    cls = delta_type.options
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key == "_" and delta_type.positional:
            key = delta_type.positional
        elif key == "_":
            raise OptionError(f"{where}{delta_type.name} takes no unnamed value: write {value!r} as key=value. "
                              f"Valid options: {listing(names) or 'none'}")
        if key in kwargs:  # the positional value and key=value both name it
            raise OptionError(f"{where}{delta_type.name} option {key!r} is given twice")
        if key not in names:
            valid = listing(names) or "none"
            raise OptionError(f"{where}{delta_type.name} has no option {key!r}.{nearest(key, names)} "
                              f"Valid options: {valid}")
        kwargs[key] = _coerce(value, hints[key], f"{where}{delta_type.name} option {key}")
    try:
        return cls(**kwargs)
    except OptionError as e:
        raise OptionError(f"{where}{e}") from None


def _coerce(value, hint, what):
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise OptionError(f"{what}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], what)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise OptionError(f"{what}={value!r} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OptionError(f"{what}={value!r} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise OptionError(f"{what}={value!r} must be a number")
    if hint is str:
        if isinstance(value, bool) or value is None:
            raise OptionError(f"{what}={value!r} must be a word")
        return str(value)
    return value


def check(condition: bool, message: str):
    """Used by Options.__post_init__ to reject values out of range."""
    if not condition:
        raise OptionError(message)


def unknown_type(name: str, known) -> UnknownDeltaType:
    return UnknownDeltaType(f"unknown delta type {name!r}.{nearest(name, known)} Known types: {listing(known)}")


def format_options(opts) -> str:
    """The inverse of parsing: 'r=8,alpha=16.0' with only the non-default values."""
    parts = []
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        parts.append(f"{f.name}={v!r}" if isinstance(v, str) and not _TYPE.fullmatch(v) else f"{f.name}={v}")
    return ",".join(parts)
