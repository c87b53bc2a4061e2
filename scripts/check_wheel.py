"""Install dbmagic as a user does, and use it from outside the repository (run by .ci/run).

    python scripts/check_wheel.py

Builds the wheel and the sdist, checks that both carry the shipped notebooks, installs the wheel
(not editable) with the ``demo`` extra into a fresh virtual environment in a temporary folder, and
from that folder runs ``python -m dbmagic --version``, ``python -m dbmagic.demo`` (the shipped
quickstart) and a smoke test of ``%load_ext dbmagic``, a ``%%dbllm`` cell and ``dbmagic.testing``.
A notebook or module left out of the wheel fails it. Needs ``build`` (in the ``test`` extra) and
the package index.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("dbmagic/notebooks/quickstart.ipynb", "dbmagic/notebooks/panel.ipynb")
SMOKE = r'''
import os, dbmagic
from IPython.core.interactiveshell import InteractiveShell
from dbmagic.testing import LocalWorkspace

assert "site-packages" in dbmagic.__file__, dbmagic.__file__  # the installed wheel, not the source tree
with LocalWorkspace() as ws:
    os.environ.update(ws.environ())
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "dbmagic")
    ip.run_cell_magic("dbllm", "-e databricks-meta-llama-3-3-70b-instruct -o answer --no-stream", "Hi {{ 1 + 1 }}")
    assert ip.user_ns["answer"] == "Echo: Hi 2", ip.user_ns.get("answer")
    assert ws.requests[-1].json["messages"] == [{"role": "user", "content": "Hi 2"}]
print("smoke test: %load_ext, %%dbllm and dbmagic.testing work from the installed wheel")
'''


def run(*args: str | Path, cwd: Path, check_output: str | None = None) -> None:
    print("$", " ".join(str(a) if len(str(a)) < 80 else "..." for a in args), flush=True)
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0 or (check_output and check_output not in result.stdout):
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(str(a) for a in args)}")
    print(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(ok)")


def main() -> int:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with tempfile.TemporaryDirectory(prefix="dbmagic-wheel-") as tmp:
        tmp_path = Path(tmp)
        dist = tmp_path / "dist"
        # a clean copy: a stale *.egg-info/SOURCES.txt from an editable install would list files
        # that the package configuration itself no longer ships
        source = tmp_path / "source"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            "*.egg-info", ".git", ".venv", "artifacts", "build", "dist", "__pycache__", ".pytest_cache"))
        run(sys.executable, "-m", "build", "--wheel", "--sdist", "--outdir", dist, source, cwd=source)
        wheel = next(dist.glob("dbmagic-*.whl"))
        sdist = next(dist.glob("dbmagic-*.tar.gz"))
        in_wheel = set(zipfile.ZipFile(wheel).namelist())
        in_sdist = {name.split("/", 1)[1] for name in tarfile.open(sdist).getnames() if "/" in name}
        for notebook in NOTEBOOKS:
            if notebook not in in_wheel or notebook not in in_sdist:
                raise SystemExit(f"{notebook} is missing from the {'wheel' if notebook not in in_wheel else 'sdist'}: "
                                 "check [tool.setuptools.package-data] in pyproject.toml")
        print(f"{wheel.name} and {sdist.name} carry {', '.join(NOTEBOOKS)}")
        venv = tmp_path / "venv"
        run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
        python = venv / "bin" / "python"
        run(python, "-m", "pip", "install", "-q", f"{wheel}[demo]", cwd=tmp_path)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        run(python, "-m", "dbmagic", "--version", cwd=elsewhere, check_output=f"dbmagic {version}")
        run(python, "-m", "dbmagic.demo", cwd=elsewhere, check_output="Saved the executed notebook")
        if not (elsewhere / "artifacts" / "quickstart.ipynb").is_file():
            raise SystemExit("the demo did not save artifacts/quickstart.ipynb in the folder it ran from")
        run(python, "-m", "dbmagic.demo", "panel", cwd=elsewhere, check_output="Saved the executed notebook")
        run(python, "-c", SMOKE, cwd=elsewhere, check_output="smoke test")
    print("the wheel installs and works from outside the repository")
    return 0


if __name__ == "__main__":
    sys.exit(main())
