"""Subscribers: your code, told about every call the client makes (`dbmagic.call.hooks`).

This module is the public import path; the code lives in `dbmagic.call.hooks`.
"""

from .call.hooks import *  # noqa: F403
from .call.hooks import __all__  # noqa: F401
