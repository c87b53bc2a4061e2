"""Prompts over a Spark DataFrame, on the executors (`dbmagic.batching.spark`).

This module is the public import path; the code lives in `dbmagic.batching.spark`.
"""

from .batching.spark import *  # noqa: F403
from .batching.spark import __all__  # noqa: F401
