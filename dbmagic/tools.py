"""Tools: functions of the notebook the model may ask to call (`dbmagic.call.tools`).

This module is the public import path; the code lives in `dbmagic.call.tools`.
"""

from .call.tools import *  # noqa: F403
from .call.tools import __all__  # noqa: F401
