"""The notebook's names, as dbmagic's frames hold them: a mapping whose repr names no value.

``%xmode Verbose`` prints every frame's locals; a frame holding the kernel's namespace as a plain
dict would print every variable of the notebook (data, keys, whatever the user keeps there) under
an unexpected error. `Notebook` wraps it (reads and writes go through to the namespace itself) and
`Notebook.with_row` layers a batch row's values over it, both shown as a short summary.

`lookup` is the one rule for a name an option gives (``--schema models.Ticket``, ``--tools
helpers.lookup``, ``--transform-input clean``, ``--judge polite``): a notebook variable, then
attributes after dots.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

__all__ = ["Notebook", "lookup", "Unresolved"]


class Unresolved(LookupError):
    """A dotted name that names nothing: the notebook has no ``head`` (``where`` is None), or
    ``where`` (``helpers``, ``a.b``) has no attribute ``part``. Each option says it in its words."""

    def __init__(self, head: str, where: str | None = None, part: str | None = None):
        super().__init__(head if where is None else f"{where} has no attribute {part!r}")
        self.head, self.where, self.part = head, where, part


def lookup(name: str, namespace: Mapping[str, Any]) -> Any:
    """What ``name`` (``Ticket``, ``models.Ticket``) is in the notebook: its first part a variable of
    ``namespace``, each part after a dot an attribute of what came before. `Unresolved` when the
    name names nothing."""
    head, *rest = name.split(".")
    if head not in namespace:
        raise Unresolved(head)
    value = namespace[head]
    for i, part in enumerate(rest):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise Unresolved(head, ".".join([head, *rest[:i]]), part) from None
    return value


class Notebook(MutableMapping):
    """The notebook's namespace (``shell.user_ns``), read and written through, shown as
    ``Notebook(42 names)``."""

    __slots__ = ("_names",)

    def __init__(self, names: MutableMapping[str, Any]):
        self._names = names._names if isinstance(names, Notebook) else names

    def __getitem__(self, key: str) -> Any:
        return self._names[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._names[key] = value

    def __delitem__(self, key: str) -> None:
        del self._names[key]

    def __contains__(self, key: object) -> bool:
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"Notebook({len(self._names)} names)"

    def with_row(self, row: Mapping[str, Any]) -> Layered:
        """The names a batch row's template sees: the row's values, then the notebook's."""
        return Layered(row, self._names)


class Layered(Mapping):
    """A row's values over the notebook's names (read only), shown as a short summary."""

    __slots__ = ("_top", "_below")

    def __init__(self, top: Mapping[str, Any], below: Mapping[str, Any]):
        self._top, self._below = top, below

    def __getitem__(self, key: str) -> Any:
        if key in self._top:
            return self._top[key]
        return self._below[key]

    def __contains__(self, key: object) -> bool:
        return key in self._top or key in self._below

    def __iter__(self) -> Iterator[str]:
        yield from self._top
        yield from (k for k in self._below if k not in self._top)

    def __len__(self) -> int:
        return len(set(self._top) | set(self._below))

    def __repr__(self) -> str:
        return f"Layered({len(self._top)} row values over {len(self._below)} names)"
