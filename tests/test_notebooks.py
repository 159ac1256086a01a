"""The notebooks in notebooks/ run top to bottom with small parameters (a cell that raises fails the
test), as papermill would run them: the cell tagged "parameters" is followed by an injected cell of
overrides. And they are stored clean: no outputs, no execution counts, one parameter cell each."""
import ast
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _s3pet(tmp: Path) -> dict:
    from search.tiny import make_model, make_task   # a 2-layer XLM-R and a bag-of-words task: seconds a search
    return dict(model=str(make_model(tmp / "tiny-xlmr")), task=str(make_task(tmp / "task.jsonl", n=160)),
                budgets=["1k", "2k"], n_train=None, n_dev=24, n_test=48, batch_size=8, search_steps=6, lr=3e-3,
                out_dir=str(tmp / "s3pet"))


SMALL = {   # notebook -> the CI-size values that replace the full-size defaults of its parameter cell
    "01_quick_start": lambda tmp: dict(n_train=32, n_test=16, max_length=24, batch_size=16, out_dir=str(tmp / "quick")),
    "02_delta_types": lambda tmp: dict(n_train=16, n_test=16, max_length=16, batch_size=16, epochs=1),
    "03_s3pet": _s3pet,
    "04_cuge": lambda tmp: dict(tasks="ccpm,lcsts,math23k", max_steps=2, batch_size=2, max_new=4,
                                out_dir=str(tmp / "cuge")),
}


def parameters(nb) -> set:
    """The names the "parameters" cell assigns (read, not run)."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets}


def inject(nb, values: dict):
    """papermill's way: a cell tagged "injected-parameters" right after the "parameters" cell."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# Injected by tests/test_notebooks.py (CI size)\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_and_with_one_parameter_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
    assert not dirty, f"{path.name}: code cells {dirty} hold outputs or execution counts; clear them before committing"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code", f"{path.name} needs exactly one 'parameters' cell"


def test_every_notebook_is_listed_in_the_readme_and_has_ci_parameters():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert {p.stem for p in NOTEBOOKS} == set(SMALL)
    assert all(f"notebooks/{p.name}" in readme for p in NOTEBOOKS)


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernel of this very Python (not whatever 'python3' a user's Jupyter set-up points to)."""
    from ipykernel.kernelspec import write_kernel_spec
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "deltakit-tests")     # argv: sys.executable
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "deltakit-tests"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom_with_small_parameters(path, tmp_path, monkeypatch, kernel):
    values = SMALL[path.stem](tmp_path)
    nb = nbformat.read(path, as_version=4)
    assert set(values) <= parameters(nb), f"not parameters of {path.name}: {set(values) - parameters(nb)}"
    inject(nb, values)
    for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "2",
                       "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, value)               # the kernel inherits this environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()                                 # raises CellExecutionError, naming the cell, when one fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} drew no inline picture"
