"""A safe arithmetic evaluator for Math23K equations and predictions: the text is parsed to a Python
AST and only numbers, + - * / ^ (power), unary signs and parentheses are evaluated; nothing is ever
passed to eval. Math23K's notations are read first: "x=" in front, percentages ("20%" = 0.2),
mixed numbers ("3(1/2)" = 3 + 1/2), full-width operators and brackets."""
from __future__ import annotations

import ast
import math
import operator
import re

from .errors import CugeError


class ArithError(CugeError):
    """The text is not an arithmetic expression this evaluator accepts (or has no finite value)."""


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_WIDE = str.maketrans({"（": "(", "）": ")", "[": "(", "]": ")", "［": "(", "］": ")", "×": "*", "＊": "*",
                       "÷": "/", "／": "/", "＋": "+", "－": "-", "—": "-", "％": "%", "＾": "^", "＝": "=",
                       "．": "."})
_NUMBER = r"\d+(?:\.\d+)?"
_MIXED = re.compile(rf"({_NUMBER})\(({_NUMBER})/({_NUMBER})\)")     # 3(1/2) -> (3+1/2)
_PERCENT = re.compile(rf"({_NUMBER})%")                              # 20% -> (20/100)
MAX_CHARS = 400
MAX_EXPONENT = 64


def normalise(text: str) -> str:
    """Math23K's notation as plain Python arithmetic (still unevaluated)."""
    s = str(text).translate(_WIDE).replace(" ", "").strip()
    if "=" in s:            # "x=1+2" -> "1+2"; a prediction may also be "1+2=3": keep the left side
        left, _, right = s.partition("=")
        s = right if left.lower() in ("x", "") else left
    s = _MIXED.sub(r"(\1+\2/\3)", s)
    s = _PERCENT.sub(r"(\1/100)", s)
    return s.replace("^", "**")


def value(text) -> float:
    """The value of `text` (an expression or a number, in Math23K's notation), or ArithError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    s = normalise(text)
    if not s or len(s) > MAX_CHARS:
        raise ArithError(f"not an arithmetic expression: {str(text)[:80]!r} (empty or longer than {MAX_CHARS})")
    try:
        tree = ast.parse(s, mode="eval")
        result = _eval(tree.body)
    except ArithError:
        raise
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ArithError(f"not an arithmetic expression: {str(text)[:80]!r}; expected numbers, + - * / ^, "
                         "parentheses and percentages") from None
    except (ZeroDivisionError, OverflowError) as e:
        raise ArithError(f"{str(text)[:80]!r} has no finite value ({e})") from None
    if not math.isfinite(result):
        raise ArithError(f"{str(text)[:80]!r} has no finite value")
    return result


def _eval(node) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > 1e6):
            raise ArithError(f"power {left:g}^{right:g} is out of the range this evaluator computes")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise ArithError(f"power {left:g}^{right:g} has no real value")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    raise ArithError(f"{type(node).__name__} is not allowed in an arithmetic expression "
                     "(numbers, + - * / ^, parentheses and percentages only)")


def same_value(a: float, b: float, rel: float = 1e-4) -> bool:
    """Answers agree to a relative 1e-4 (Math23K answers are often rounded fractions)."""
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)
