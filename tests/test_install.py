"""One source of truth for the version; the shipped notebooks; the demo from any folder.

The whole wheel (built, installed in a fresh environment, used from outside the repository) is
checked by scripts/check_wheel.py, which .ci/run runs.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import dbmagic
from dbmagic import demo

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_comes_from_the_installed_metadata():
    assert dbmagic.__version__ == VERSION
    out = subprocess.run([sys.executable, "-m", "dbmagic", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"dbmagic {VERSION}"


def test_the_notebooks_ship_inside_the_package_and_the_package_data_names_them():
    assert {p.name for p in demo.SHIPPED.glob("*.ipynb")} == {f"{n}.ipynb" for n in demo.NOTEBOOKS}
    assert demo.SHIPPED.parent == Path(dbmagic.__file__).parent
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "notebooks/*.ipynb" in pyproject["tool"]["setuptools"]["package-data"]["dbmagic"]


def test_an_unknown_notebook_names_the_choices(tmp_path, capsys):
    assert demo.main([str(tmp_path / "nope.ipynb")]) == 2
    assert "pass the path of a notebook, or one of quickstart, panel" in capsys.readouterr().err
