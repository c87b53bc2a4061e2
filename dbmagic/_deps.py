"""Optional packages, imported when the feature that needs them runs (``import dbmagic`` stays light)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigurationError


def pandas(feature: str) -> Any:
    """pandas, or a `ConfigurationError` naming ``feature`` and the install command."""
    try:
        import pandas
    except ImportError:
        raise ConfigurationError(f"{feature} needs pandas: pip install pandas.") from None
    return pandas
