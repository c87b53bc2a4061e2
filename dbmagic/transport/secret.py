"""A token or secret that never shows: ``repr`` and ``str`` are ``***``; `reveal` only where a header is built.

Keeping secrets in this type, rather than in plain ``str`` locals, keeps them out of Verbose
tracebacks (``%xmode Verbose`` prints every frame's locals), reprs and logs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Secret", "reveal"]


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value.reveal() if isinstance(value, Secret) else value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:  # travels to Spark executors with the task
        return (Secret, (self._value,))


def reveal(value: Any) -> Any:
    """The plain value of a `Secret` (anything else as it is)."""
    return value.reveal() if isinstance(value, Secret) else value
