"""The search and asset packages import in one direction (no module imports, even lazily inside a
function, one that imports it back), and importing any of their modules, or the benchmarks that
build on them, leaves os.environ alone."""
import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search", "deltakit_assets")
BENCHMARKS = ("benchmarks.sentiment", "benchmarks.hyper_sentiment", "benchmarks.search_compare")


def _modules(package: str) -> dict:
    return {f"{package}.{p.stem}": p for p in sorted((ROOT / package).glob("*.py")) if p.stem != "__init__"}


def _imports(name: str, path: Path, known) -> set:
    """The package's own modules that `name` imports anywhere in its file (module level or in a function)."""
    package = name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "")
            if node.level and node.module:
                base = f"{package}.{node.module}"
            for alias in node.names:   # `from . import data` names a module; `from .x import y` names x
                found |= {m for m in (f"{base}.{alias.name}", base) if m in known}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found - {name}


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_circle_in_search_or_assets():
    for package in PACKAGES:
        mods = _modules(package)
        graph = {name: _imports(name, path, mods) for name, path in mods.items()}
        assert _cycle(graph) is None, f"import circle: {' -> '.join(_cycle(graph))}"
    # and the detector finds one when there is one
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_backbone_has_its_own_module():
    mods = _modules("search")
    assert _imports("search.cpm", mods["search.cpm"], mods) == {"search.backbone", "search.errors"}


def test_importing_a_module_sets_no_environment_variable():
    names = [*_modules("search"), *_modules("deltakit_assets"), "deltakit.assets", *BENCHMARKS]
    code = ("import importlib, json, os, sys; before = dict(os.environ); "
            f"[importlib.import_module(m) for m in {names!r}]; "
            "print(json.dumps(sorted(k for k in os.environ.keys() | before.keys() if os.environ.get(k) != before.get(k))))")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("HF_HUB_OFFLINE", "WANDB_MODE")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
