"""Re-run the shipped notebooks and store their outputs (what nbval compares against).

    python scripts/refresh_notebooks.py [NAME ...]      # default: every notebook in dbmagic/notebooks

Run it after a change that alters what a notebook shows, then read the diff.
"""

from __future__ import annotations

import re
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
                       store_widget_state=False).execute()
        nb.metadata.pop("widgets", None)  # no saved widget state: the cells make the widgets again
        text = nbformat.writes(nb)
        # the local workspace's port changes at every run: the stored outputs keep none (nbval's sanitize
        # file reads PORT the same way)
        path.write_text(re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text) + "\n")
        print(f"refreshed {path.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
