"""Re-run the shipped notebooks and store their outputs (what nbval compares against).

    python scripts/refresh_notebooks.py [NAME ...]      # default: every notebook in dbmagic/notebooks

Run it after a change that alters what a notebook shows, then read the diff.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "dbmagic" / "notebooks"


def main(names: list[str]) -> None:
    paths = [NOTEBOOKS / f"{n}.ipynb" for n in names] if names else sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
                       store_widget_state=True).execute()
        nbformat.write(nb, path)
        print(f"refreshed {path.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
