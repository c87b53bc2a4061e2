"""The call ledger: checkpoints and the cache (`dbmagic.batching.ledger`).

This module is the public import path; the code lives in `dbmagic.batching.ledger`.
"""

from .batching.ledger import *  # noqa: F403
from .batching.ledger import __all__  # noqa: F401
