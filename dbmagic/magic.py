"""``%%dbllm`` and ``%dbllm``: the IPython extension (`dbmagic.frontends.magic`). ``%load_ext dbmagic``.

This module is the public import path; the code lives in `dbmagic.frontends.magic`.
"""

from .frontends.magic import *  # noqa: F403
from .frontends.magic import __all__  # noqa: F401
