"""Judge the answers a batch or a comparison has (`dbmagic.observe.judging`).

This module is the public import path; the code lives in `dbmagic.observe.judging`.
"""

from .observe.judging import *  # noqa: F403
from .observe.judging import __all__  # noqa: F401
