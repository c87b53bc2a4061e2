"""``python -m dbmagic.demo [NOTEBOOK] [--save PATH]``: run a notebook headless, show what a user sees.

The main job of the README: from any folder, it executes the quickstart notebook shipped in the
package (``dbmagic/notebooks/quickstart.ipynb``; the notebook starts its own local workspace) in a
fresh kernel, prints each cell with the text of its outputs, and saves the executed notebook
(default ``artifacts/quickstart.ipynb`` under the current folder). A failing cell fails the run.
``python -m dbmagic.demo panel`` runs the shipped panel notebook; a path runs any other notebook.
Needs the ``demo`` extra: ``pip install 'dbmagic[demo]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "notebooks"
NOTEBOOKS = ("quickstart", "panel", "batch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dbmagic.demo", description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default="quickstart",
                        help="quickstart or panel (shipped with dbmagic), or the path of a notebook")
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
        print(f"In [{cell.get('execution_count') or ' '}]: " + cell.source.replace("\n", "\n    ...: "))
        for output in cell.get("outputs", []):
            print(_text(output))
        print()
    save = Path(args.save or Path("artifacts") / source.name)
    save.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, save)
    print(f"Saved the executed notebook to {save}")
    if failed is not None:
        print(f"A cell failed:\n{failed}", file=sys.stderr)
        return 1
    return 0


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "").rstrip("\n")
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    data = output.get("data", {})
    return str(data.get("text/plain", "")).rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())
