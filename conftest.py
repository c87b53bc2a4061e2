"""The notebooks (``dbmagic/notebooks``, shipped in the package) run under nbval when nbval is
installed (the ``test`` extra).

The nbval flags live here, not in ``addopts``, so ``pytest tests/test_wire.py`` works in an
environment with only dbmagic's core and pytest: there nbval is absent and no notebook is collected.
"""

from __future__ import annotations

from pathlib import Path

SANITIZE = Path(__file__).resolve().parent / "tests" / "nbval_sanitize.cfg"


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("nbval"):
        return
    option = config.option
    if not option.nbval_lax:
        option.nbval = True
    option.nbval_current_env = True
    option.nbval_sanitize_with = option.nbval_sanitize_with or str(SANITIZE)
    if option.nbval_cell_timeout == 2000:  # nbval's default: far too long for a cell of ours
        option.nbval_cell_timeout = 120
