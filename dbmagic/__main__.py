"""``python -m dbmagic --version``: the installed version (from the package metadata)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    import dbmagic

    parser = argparse.ArgumentParser(
        prog="python -m dbmagic",
        description="dbmagic: Databricks-served LLMs in a notebook. In a notebook: %load_ext dbmagic. "
                    "The demo: python -m dbmagic.demo. A local workspace: python -m dbmagic.testing.")
    parser.add_argument("--version", action="version", version=f"dbmagic {dbmagic.__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
