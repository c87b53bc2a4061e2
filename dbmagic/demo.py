"""``python -m dbmagic.demo [NOTEBOOK] [--save PATH]``: run a notebook headless, show what a user sees.

The main job of the README: from any folder, it executes the quickstart notebook shipped in the
package (``dbmagic/notebooks/quickstart.ipynb``; the notebook starts its own local workspace) in a
fresh kernel, prints each cell with the text of its outputs, and saves the executed notebook
(default ``artifacts/quickstart.ipynb`` under the current folder). A failing cell fails the run.
``python -m dbmagic.demo panel`` runs the shipped panel notebook, ``batch`` the batch and Spark one,
``data`` the answers-as-data one (schemas, typed columns, tool calls; these two also need the
``spark`` extra), ``judge`` the judging one (the ``mlflow`` extra); a path runs any other notebook.
Only what ran is shown and saved: the outputs stored in the notebook are cleared first. Needs the
``demo`` extra: ``pip install 'dbmagic[demo]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "notebooks"
NOTEBOOKS = ("quickstart", "panel", "batch", "data", "judge", "documents")
# a package a shipped notebook imports -> the extra that installs it
_EXTRAS = {"pyspark": "spark", "pyarrow": "spark", "pandas": "spark", "mlflow": "mlflow"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbmagic.demo", description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default="quickstart",
                        help=f"{', '.join(NOTEBOOKS)} (shipped with dbmagic), or the path of a notebook")
    parser.add_argument("--save", default=None, help="where to write the executed notebook "
                                                      "(default: artifacts/<name>.ipynb)")
    args = parser.parse_args(argv)
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError:
        print("The demo needs nbclient and ipykernel: pip install 'dbmagic[demo]'", file=sys.stderr)
        return 2
    shipped = SHIPPED / f"{args.notebook}.ipynb"
    source = shipped if args.notebook in NOTEBOOKS else Path(args.notebook)
    if not source.is_file():
        print(f"No notebook at {source}: pass the path of a notebook, or one of {', '.join(NOTEBOOKS)}.",
              file=sys.stderr)
        return 2
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:  # what the notebook shipped with is not a result of this run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    # a shipped notebook runs in the current folder (site-packages may be read-only), another in its own
    workdir = Path.cwd() if source == shipped else source.parent
    client = NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    failed = None
    try:
        client.execute()
    except CellExecutionError as exc:
        failed = exc
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        ran = cell.get("execution_count") is not None
        print(f"In [{cell.get('execution_count') or ' '}]: " + cell.source.replace("\n", "\n    ...: "))
        for output in cell.get("outputs", []):
            print(_text(output))
        if not ran:
            print("(not run: an earlier cell failed)")
        print()
    save = Path(args.save or Path("artifacts") / source.name)
    save.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, save)
    print(f"Saved the executed notebook to {save}")
    if failed is not None:
        missing = getattr(failed, "ename", "") == "ModuleNotFoundError" and _missing_extra(str(failed.evalue))
        hint = f"\nIt needs the {missing} extra: pip install 'dbmagic[{missing}]'" if missing else ""
        print(f"A cell failed:\n{failed}{hint}", file=sys.stderr)
        return 1
    return 0


def _missing_extra(message: str) -> str | None:
    """The extra that installs the module a ``ModuleNotFoundError`` names (``No module named 'pyspark'``)."""
    for module, extra in _EXTRAS.items():
        if f"'{module}" in message:
            return extra
    return None


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "").rstrip("\n")
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    data = output.get("data", {})
    return str(data.get("text/plain", "")).rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())
