"""What a batch keeps of each row, as columns rather than one object a row, so that its memory
follows what users read and not what the server sent.

- `Answers`: each row's outcome. An answer keeps its text, value, usage, request id, latency,
  served model, finish reason and tool calls, in columns (usage and latency in arrays; the few
  values that repeat from row to row, such as the endpoint, the served model and the finish reason,
  once in a table); the server's raw response and the request body are not kept (a batch can give
  the request back: `dbmagic.batching.result.BatchResult.request`). An error, and whatever is not
  an answer, is kept as it is. Reading a row builds its `Completion` afresh.
- `Digests`: each row's request identity (a SHA-256), 32 bytes a row rather than a 64-character string.
- `RowValues`: the values each row fills the template with, read from the input as they are needed
  rather than copied into a dict a row (a DataFrame's columns are read once, as lists).
"""

from __future__ import annotations

import math
import uuid
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ..call.answers import Usage
from ..call.model import PARTIAL, Completion
from ..errors import SchemaError, error_of

__all__ = ["Answers", "Digests", "RowValues", "answered"]

_EMPTY, _ANSWER, _OBJECT = 0, 1, 2
_TEXT = object()  # a row's value is its text
_NONE = -1  # a token count the endpoint did not report
_COUNTS = ("input", "output", "total")  # the usage kept in the counts array; the others go with the rare fields
# what repeats from row to row: kept once, in the shapes table
_SHAPE = ("endpoint", "kind", "where", "served_model", "finish_reason", "attempts", "cached", "schema")
# what few answers have: kept only for the rows that have it
_RARE = ("tool_calls", "steps", "choices", "error")


def answered(item: Any) -> bool:
    """A whole answer (a resumed one included), not an error nor a partial answer."""
    return item is not None and not isinstance(item, Exception) and not getattr(item, "is_partial", False)


class Answers:
    """``n`` rows' outcomes as a batch's workers store them (``answers[i] = outcome``, ``answers[i]``),
    one place a row; places past ``n`` (``append``) hold what a batch sends besides its rows (a pack
    of rows) and are kept as objects. A `Completion` stored is read back as a new, equal `Completion`
    without its ``raw`` response, ``request`` body and ``natural`` value."""

    def __init__(self, n: int):
        self.n = n
        self._state = bytearray(n)
        self._text: list[str | None] = [None] * n
        # made when a value is not its text (a transform, a schema, vectors); _TEXT where it is the text
        self._values: list[Any] | None = None
        self._counts = array("q", [_NONE]) * (len(_COUNTS) * n)
        self._latency = array("d", bytes(8 * n))
        self._first = array("d", bytes(8 * n))  # time to the first token; NaN for None
        self._request_id = _Ids(n)
        self._shape = array("I", bytes(4 * n))
        self._shapes: list[tuple[Any, ...]] = []
        self._shape_index: dict[tuple[Any, ...], int] = {}
        self._rare: dict[int, dict[str, Any]] = {}
        self._objects: dict[int, Any] = {}
        self._extra: list[Any] = []  # places past n

    @classmethod
    def of(cls, items: Iterable[Any]) -> Answers:
        items = list(items)
        answers = cls(len(items))
        for i, item in enumerate(items):
            answers[i] = item
        return answers

    def __len__(self) -> int:
        return self.n + len(self._extra)

    def append(self, item: Any) -> None:
        self._extra.append(item)

    def __delitem__(self, key: slice) -> None:
        """Only the places past the rows can go (``del answers[n:]``)."""
        if not isinstance(key, slice) or (key.start or 0) < self.n or key.stop is not None or key.step is not None:
            raise TypeError("only the places past the rows can be deleted: del answers[n:]")
        del self._extra[key.start - self.n:]

    def __setitem__(self, i: int, item: Any) -> None:
        if i >= self.n:
            self._extra[i - self.n] = item
            return
        self._rare.pop(i, None)
        self._objects.pop(i, None)
        if self._values is not None:
            self._values[i] = _TEXT
        if type(item) is not Completion:  # an error, a resumed value, nothing yet: kept as it is
            self._text[i] = None
            self._state[i] = _OBJECT if item is not None else _EMPTY
            if item is not None:
                self._objects[i] = item
            return
        self._state[i] = _ANSWER
        self._text[i] = item.text
        value = item.value
        if value is not item.text and not (type(value) is str and value == item.text):
            if self._values is None:
                self._values = [_TEXT] * self.n
            self._values[i] = value
        usage = item.usage
        for k, name in enumerate(_COUNTS):
            count = getattr(usage, name)
            self._counts[len(_COUNTS) * i + k] = _NONE if count is None else count
        self._latency[i] = item.latency
        self._first[i] = math.nan if item.time_to_first_token is None else item.time_to_first_token
        self._request_id[i] = item.request_id
        shape = tuple(getattr(item, name) for name in _SHAPE)
        key = shape[:-1] + (id(shape[-1]),)  # a schema is kept by identity (it need not be hashable)
        index = self._shape_index.get(key)
        if index is None:
            index = self._shape_index[key] = len(self._shapes)
            self._shapes.append(shape)
        self._shape[i] = index
        rare = {name: value for name in _RARE if (value := getattr(item, name))}
        if usage.cache_read is not None or usage.cache_creation is not None:
            rare["cache"] = (usage.cache_read, usage.cache_creation)
        if rare:
            self._rare[i] = rare

    def __getitem__(self, i: int) -> Any:
        if i >= self.n or i < 0:
            if i < 0:
                i += len(self)
            return self._extra[i - self.n] if i >= self.n else self[i]
        state = self._state[i]
        if state == _EMPTY:
            return None
        if state == _OBJECT:
            return self._objects[i]
        return self._completion(i)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self)))

    def _completion(self, i: int) -> Completion:
        text = self._text[i]
        value = text if self._values is None or self._values[i] is _TEXT else self._values[i]
        endpoint, kind, where, served_model, finish_reason, attempts, cached, schema = self._shapes[self._shape[i]]
        rare = self._rare.get(i, {})
        counts = [None if c == _NONE else c for c in self._counts[len(_COUNTS) * i: len(_COUNTS) * (i + 1)]]
        cache_read, cache_creation = rare.get("cache", (None, None))
        usage = Usage(*counts, cache_read=cache_read, cache_creation=cache_creation)
        return Completion(text=text or "", value=value, endpoint=endpoint, kind=kind, usage=usage,
                          latency=self._latency[i], request_id=self._request_id[i], served_model=served_model,
                          finish_reason=finish_reason, attempts=attempts, cached=cached, schema=schema, where=where,
                          time_to_first_token=None if math.isnan(first := self._first[i]) else first,
                          error=rare.get("error"),
                          tool_calls=list(rare.get("tool_calls", ())), steps=list(rare.get("steps", ())),
                          choices=list(rare.get("choices", ())))

    # -- what a result reads of every row, without building its Completion ------------------------

    def empty(self, i: int) -> bool:
        return self._state[i] == _EMPTY

    def kept(self, i: int) -> Any:
        """Row ``i``'s outcome when it is not an answer (an error, ...), else None."""
        return self._objects.get(i)

    def text(self, i: int) -> str | None:
        return self._text[i] if self._state[i] == _ANSWER else getattr(self[i], "text", None)

    def value(self, i: int) -> Any:
        if self._state[i] != _ANSWER:
            return getattr(self[i], "value", None)
        return self._text[i] if self._values is None or self._values[i] is _TEXT else self._values[i]

    def whole(self, i: int) -> bool:
        """A whole answer: neither an error nor a partial answer (see `dbmagic.batching.result.answered`)."""
        if self._state[i] == _ANSWER:
            return self._shapes[self._shape[i]][4] not in PARTIAL
        return answered(self[i])

    def error(self, i: int) -> BaseException | None:
        if self._state[i] == _ANSWER:
            return self._rare.get(i, {}).get("error")
        return error_of(self[i])

    def usage(self) -> Usage:
        """Every row's usage, summed: the whole answers' and that of answers that did not fit a schema
        (they were paid for)."""
        total = Usage()
        counts = self._counts
        for i in range(self.n):
            if self._state[i] == _ANSWER:
                if self.whole(i):
                    row = [None if c == _NONE else c for c in counts[len(_COUNTS) * i: len(_COUNTS) * (i + 1)]]
                    total += Usage(*row, *self._rare.get(i, {}).get("cache", (None, None)))
            elif self._state[i] == _OBJECT:
                item = self._objects[i]
                if answered(item):
                    total += item.usage
                elif isinstance(item, SchemaError) and item.completion is not None:
                    total += item.completion.usage
        return total


class _Ids:
    """Request ids: a UUID (as Databricks' ``x-request-id``) in 16 bytes, any other id as its string
    (in a list made when the first such id comes)."""

    def __init__(self, n: int):
        self._uuids = bytearray(16 * n)
        self._is_uuid = bytearray(n)
        self._other: list[str | None] | None = None

    def __setitem__(self, i: int, value: str | None) -> None:
        self._is_uuid[i] = False
        if self._other is not None:
            self._other[i] = None
        if value is None:
            return
        if len(value) == 36 and value == value.lower():
            try:
                self._uuids[16 * i: 16 * (i + 1)] = uuid.UUID(value).bytes
                self._is_uuid[i] = str(uuid.UUID(bytes=bytes(self._uuids[16 * i: 16 * (i + 1)]))) == value
            except ValueError:
                pass
        if not self._is_uuid[i]:
            if self._other is None:
                self._other = [None] * len(self._is_uuid)
            self._other[i] = value

    def __getitem__(self, i: int) -> str | None:
        if self._is_uuid[i]:
            return str(uuid.UUID(bytes=bytes(self._uuids[16 * i: 16 * (i + 1)])))
        return self._other[i] if self._other is not None else None


class Digests:
    """A sequence of request identities (64-character SHA-256 hex strings, or None), kept as 32 bytes a row."""

    def __init__(self, n: int):
        self._bytes = bytearray(32 * n)
        self._present = bytearray(n)

    def __len__(self) -> int:
        return len(self._present)

    def __setitem__(self, i: int, digest: str | None) -> None:
        self._present[i] = digest is not None
        if digest is not None:
            self._bytes[32 * i: 32 * (i + 1)] = bytes.fromhex(digest)

    def __getitem__(self, i: int) -> str | None:
        if i < 0:
            i += len(self)
        return self._bytes[32 * i: 32 * (i + 1)].hex() if self._present[i] else None

    def __iter__(self) -> Iterator[str | None]:
        return (self[i] for i in range(len(self)))


class RowValues(Sequence):
    """Per row, the values it fills a template with (a dict, made when read): a DataFrame's columns
    by name, a dict row's items, or ``{"row": value}`` for any other value. ``read_columns``: a
    DataFrame's columns are read once, as lists (`to_dict("records")`'s Python values, without a dict
    a row), for a batch that reads every row; otherwise each row is read from the DataFrame when asked."""

    def __init__(self, rows: Any, names: list[str] | None = None, read_columns: bool = True):
        self._rows = rows
        self._names = names
        self._columns = ([rows.iloc[:, k].tolist() for k in range(len(names))]
                         if names is not None and read_columns else None)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if self._columns is not None:
            return {name: column[i] for name, column in zip(self._names, self._columns, strict=True)}
        if self._names is not None:
            return dict(zip(self._names, self._rows.iloc[[i]].to_dict("records")[0].values(), strict=True))
        row = self._rows[i]
        return dict(row) if isinstance(row, Mapping) else {"row": row}

    def slim(self) -> RowValues:
        """The same rows, keeping nothing but the input (a DataFrame's rows are read when asked)."""
        return RowValues(self._rows, self._names, read_columns=False)
