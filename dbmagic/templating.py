"""Prompt templates over the notebook's names (`dbmagic.prompts.templating`).

This module is the public import path; the code lives in `dbmagic.prompts.templating`.
"""

from .prompts.templating import *  # noqa: F403
from .prompts.templating import __all__  # noqa: F401
