"""Schemas for answers: ``--schema S``, ``schema=S`` (`dbmagic.call.schema`).

This module is the public import path; the code lives in `dbmagic.call.schema`.
"""

from .call.schema import *  # noqa: F403
from .call.schema import __all__  # noqa: F401
