"""dbmagic's version, read once from the installed metadata (pyproject.toml's version)."""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dbmagic")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
