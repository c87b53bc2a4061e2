"""dbmagic: Databricks-served LLMs as a first-class part of a notebook.

In a notebook::

    %load_ext dbmagic
    %%dbllm --endpoint databricks-meta-llama-3-3-70b-instruct --temperature 0.2
    Summarize {{ text }} in one sentence.

From Python::

    import dbmagic
    dbmagic.get_client().complete("How are you?", endpoint="databricks-meta-llama-3-3-70b-instruct")
    dbmagic.batch("Classify: {{ text }}", df, endpoint="...")        # a prompt over rows
    dbmagic.autolog()                                                 # MLflow traces of every call

``import dbmagic`` stays light: the client (and ``requests``) load on first use, and heavy
packages (ipywidgets, pandas, mlflow, pyspark, databricks-sdk, tqdm) only with the feature that
needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import errors as _errors
from .errors import *  # noqa: F403  (every error class: errors.__all__ is their one list)

_LAZY = {
    "Client": "client",
    "CallOptions": "call.model",
    "Completion": "call.model",
    "Call": "call.call",
    "Usage": "call.answers",
    "ToolCall": "call.answers",
    "Step": "call.model",
    "Schema": "call.schema",
    "subscribe": "call.hooks",
    "Subscriber": "call.hooks",
    "PreparedRequest": "call.model",
    "EndpointInfo": "call.model",
    "get_client": "client",
    "configure": "client",
    "batch": "batching.run",
    "BatchResult": "batching.run",
    "autolog": "observe.tracing",
    "register_prompt": "observe.tracing",
    "evaluate": "observe.judging",
    "use_cache": "call.ledger",
    "judge": "observe.judging",
    "Panel": "frontends.panel",
    "panel": "frontends.panel",
    "panel_result": "frontends.panel",
    "Credentials": "transport.credentials",
    "Timeouts": "transport.http",
    "RetryPolicy": "transport.retry",
}

__all__ = [
    *_LAZY,
    "__version__",  # noqa: F405 (module __getattr__ gives it)
    "load_ipython_extension",
    *(name for name in _errors.__all__ if name not in ("error_from_response", "error_of")),
]


# public modules reached as attributes (``dbmagic.tools.thread_safe``) without an import of their own
_MODULES = frozenset({"tools", "schema", "ledger", "spark", "tracing", "judging", "settings", "hooks", "errors",
                      "transforms", "templating", "render", "testing"})


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read once, from the installed metadata (pyproject.toml's version)
        from ._version import version

        globals()[name] = value = version()
        return value
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dbmagic' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dbmagic``: register ``%%dbllm``, ``%dbllm`` and ``%config DbLLM``."""
    from .frontends.magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .frontends.magic import unload_ipython_extension as unload

    unload(ipython)
