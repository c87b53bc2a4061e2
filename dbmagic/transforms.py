"""The user's transforms, found by name (`dbmagic.prompts.transforms`).

This module is the public import path; the code lives in `dbmagic.prompts.transforms`.
"""

from .prompts.transforms import *  # noqa: F403
from .prompts.transforms import __all__  # noqa: F401
