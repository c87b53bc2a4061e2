"""One source of truth for the version; the shipped notebooks; the demo from any folder.

The whole wheel (built, installed in a fresh environment, used from outside the repository) is
checked by scripts/check_wheel.py, which .ci/run runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

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


def test_the_repository_and_the_notebooks_carry_no_run_state():
    """On main: an empty mlflow.db at the root, 143 KB of saved widget state in panel.ipynb, a port of
    an old run in quickstart.ipynb's outputs, no LICENSE though pyproject declares Apache-2.0."""
    import json
    import re

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if tracked:  # a git checkout (not an unpacked sdist)
        assert "mlflow.db" not in tracked and not any(p.startswith("mlruns/") for p in tracked)
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "mlflow.db" in ignored and "mlruns/" in ignored
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    for notebook in demo.SHIPPED.glob("*.ipynb"):
        text = notebook.read_text()
        assert "widgets" not in json.loads(text)["metadata"], notebook.name
        assert not re.search(r"127\.0\.0\.1:\d", text), notebook.name
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.count("install -e '.[test]'") + ci.count("install -q -e '.[test]'") == 1


def test_the_extras_install_what_their_features_need():
    """On main dbmagic[mlflow] alone could not write a local trace (MLflow's default store is sqlite:
    SQLAlchemy and Alembic), and dbmagic[spark] took pandas 3, on which PySpark 4.3 warns."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {extra: {re.split(r"[<>=\[; ]", req, maxsplit=1)[0].lower() for req in reqs} for extra, reqs in extras.items()}
    assert {"mlflow-skinny", "sqlalchemy", "alembic"} <= names["mlflow"]
    assert any(req.replace(" ", "").startswith("pandas") and "<3" in req for req in extras["spark"])


def test_test_spark_skips_with_the_reason_where_java_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's python, no java
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_spark.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 5) and "PySpark needs Java 17" in out.stdout, out.stdout[-2000:]  # 5: all skipped


def test_the_demo_shows_only_what_ran_and_names_the_extra_a_notebook_needs(tmp_path, capsys):
    """On main a notebook whose import failed printed and saved the answers stored in it, as if run."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import no_such_module_pyspark_free"),
                                         nbformat.v4.new_code_cell("print('second')")])
    stale = nbformat.v4.new_output("stream", name="stdout", text="an answer from the last run\n")
    nb.cells[1].outputs, nb.cells[1].execution_count = [stale], 7
    source = tmp_path / "stale.ipynb"
    nbformat.write(nb, source)
    assert demo.main([str(source), "--save", str(tmp_path / "out.ipynb")]) == 1
    out = capsys.readouterr().out
    assert "an answer from the last run" not in out and "(not run: an earlier cell failed)" in out
    saved = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert saved.cells[1].outputs == [] and saved.cells[1].execution_count is None
    assert demo._missing_extra("No module named 'pyspark'") == "spark"


def test_the_demo_help_lists_every_notebook():
    out = subprocess.run([sys.executable, "-m", "dbmagic.demo", "--help"], capture_output=True, text=True, check=True)
    assert all(name in out.stdout for name in demo.NOTEBOOKS)
