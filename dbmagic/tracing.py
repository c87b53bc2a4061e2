"""MLflow traces and the Prompt Registry (`dbmagic.observe.tracing`).

This module is the public import path; the code lives in `dbmagic.observe.tracing`.
"""

from .observe.tracing import *  # noqa: F403
from .observe.tracing import __all__  # noqa: F401
