"""The call ledger: checkpoints and the cache (`dbmagic.call.ledger`).

This module is the public import path; the code lives in `dbmagic.call.ledger`.
"""

from .call.ledger import *  # noqa: F403
from .call.ledger import __all__  # noqa: F401
