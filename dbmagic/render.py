"""How an answer looks in the notebook (`dbmagic.frontends.render`).

This module is the public import path; the code lives in `dbmagic.frontends.render`.
"""

from .frontends.render import *  # noqa: F403
from .frontends.render import __all__  # noqa: F401
