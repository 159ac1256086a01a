"""docs/reference.md is generated from the code (python -m deltakit.reference): these fail when it
is out of date, when a command line is not in it, or when the generator would miss one."""
import importlib
import re
from pathlib import Path

import pytest

import deltakit
from deltakit import reference
from deltakit.deltas import TYPES, DeltaType
from deltakit.deltas import lora
from deltakit.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text():
    return reference.render()


def test_reference_is_up_to_date(text):
    path = ROOT / "docs" / "reference.md"
    assert path.read_text(encoding="utf-8") == text, "docs/reference.md is out of date: run python -m deltakit.reference"
    assert "python -m deltakit.reference" in text.splitlines()[0]


def test_every_command_in_the_readme_is_in_it(text):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/reference.md" in readme
    commands = set(re.findall(r"python -m ((?:search|benchmarks)[\w.]*)", readme))
    assert {"search.s3pet", "benchmarks.cuge.run", "benchmarks.cuge.score"} <= commands
    for module in commands:
        assert f"### `python -m {module}`" in text, module
    for flag in ("--budget", "--data-dir", "--output-dir", "--model-class"):
        assert f"`{flag}`" in text


def test_every_type_family_and_option_is_in_it(text):
    for name, t in TYPES.items():
        assert f"### `{name}`" in text and t.doc in text
    for family in FAMILIES:
        assert f"### `{family.name}`" in text
    assert "| `init` | kaiming \\| gaussian | kaiming | how A starts; B always starts at zero |" in text
    assert "spec     := rule" in text


def test_a_new_delta_type_appears_without_editing_the_generator():
    t = DeltaType("mydelta", lora.Options, kinds=("linear",), join="parallel", count=lora.count, build=lora.build,
                  default="attn.q", doc="a type registered by a user")
    deltakit.register(t)
    try:
        assert "| `mydelta` | a type registered by a user | linear | parallel | `attn.q` |" in reference.render()
    finally:
        del TYPES["mydelta"]


def test_a_command_line_without_parser_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "fakecli"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("import argparse\n\ndef parser():\n    p = argparse.ArgumentParser()\n"
                                 "    p.add_argument('--level', type=int, default=3, help='how high (%(default)s)')\n"
                                 "    return p\n\nif __name__ == '__main__':\n    parser().parse_args()\n")
    (pkg / "helper.py").write_text("X = 1\n")                     # no __main__: not a command line
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reference.entry_points(("fakecli",)) == ["fakecli.good"]
    md = "\n".join(reference.parser_md("python -m fakecli.good", importlib.import_module("fakecli.good").parser()))
    assert "| `--level` | int | 3 | how high (3) |" in md
    (pkg / "bad.py").write_text("import argparse\n\ndef main():\n    argparse.ArgumentParser().parse_args()\n\n"
                                "if __name__ == '__main__':\n    main()\n")
    with pytest.raises(reference.ReferenceError, match="fakecli.bad run.*parser\\(\\)"):
        reference.entry_points(("fakecli",))


def test_check_flag(tmp_path, capsys):
    out = tmp_path / "reference.md"
    assert reference.main(["--check", "--out", str(out)]) == 1 and "out of date" in capsys.readouterr().err
    assert reference.main(["--out", str(out)]) == 0
    assert reference.main(["--check", "--out", str(out)]) == 0
