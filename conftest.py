"""The notebooks (``dbmagic/notebooks``, shipped in the package) run under nbval when nbval is
installed (the ``test`` extra).

The nbval flags live here, not in ``addopts``, so ``pytest tests/test_wire.py`` works in an
environment with only dbmagic's core and pytest: there nbval is absent and no notebook is collected.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

SANITIZE = Path(__file__).resolve().parent / "tests" / "nbval_sanitize.cfg"
CATALOG = Path(__file__).resolve().parent / "tests" / "model_catalog"


def pytest_configure(config):
    # MLflow's default store is ./mlflow.db, its artifacts ./mlruns: a test (or a notebook's kernel,
    # which inherits this) that falls back to the default writes to a temporary folder, never the checkout
    if "MLFLOW_TRACKING_URI" not in os.environ:
        folder = Path(tempfile.mkdtemp(prefix="dbmagic-mlflow-"))
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    # MLflow prices a span by its model and provider from a catalog it downloads (no network here):
    # the tests' own catalog, made-up prices for the local workspace's models (tests/model_catalog)
    os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", CATALOG.as_uri())
    # mlflow.genai.evaluate's workers and its trace logging outnumber SQLAlchemy's default pool (5 + 10)
    # on a sqlite store: each waits 30 s for a connection and its trace is lost (see README, "Judge")
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "32")
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "32")
    if not config.pluginmanager.hasplugin("nbval"):
        return
    option = config.option
    if not option.nbval_lax:
        option.nbval = True
    option.nbval_current_env = True
    option.nbval_sanitize_with = option.nbval_sanitize_with or str(SANITIZE)
    if option.nbval_cell_timeout == 2000:  # nbval's default: far too long for a cell of ours
        option.nbval_cell_timeout = 120
