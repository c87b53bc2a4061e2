"""What many calls give back: a batch's `BatchResult` (one entry per row, in input order, each an
answer or the error that says why it has none), its answers as DataFrame columns (`answer_columns`:
typed columns with a schema), and a comparison's `Comparison` (label -> answer, every repeat kept)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from .. import _deps
from ..call.answers import Usage
from ..errors import Interrupted, MissingValue, NotSent, SchemaError, error_of
from .columns import Answers, answered

__all__ = ["BatchResult", "Comparison", "failure_kind", "answered", "with_answers", "answer_columns", "is_missing", "is_frame"]


class BatchResult(Sequence):
    """One entry per input row, in input order: the row's `Completion` (partial when its answer
    was cut, or interrupted by Ctrl-C: its ``error`` says so), or the `DbMagicError` it failed with
    (a row not sent is a `NotSent` that says why, a `MissingValue`, ...). Every row that has no
    whole answer has an error.

    ``texts``, ``values`` and ``errors`` are per row (a cut row's error is the cut); ``failed``
    (every row with an error) and ``missing`` (not sent, or interrupted: what ``resume=`` sends
    again besides the failures) are row indices; ``failures`` counts the failed rows by kind;
    ``usage`` sums the token counts (a `Usage`); ``wall_time`` is in seconds; ``rate`` the pace
    the endpoint's rate limit set (requests per second; None when it never limited). `to_pandas`
    gives a DataFrame; ``rows`` are the input rows (a DataFrame's as dicts).

    A batch keeps what users read of each answer, as columns (`dbmagic.batching.columns`): its text,
    value, usage, request id, latency, served model, finish reason and tool calls. ``result[i]``
    builds row ``i``'s `Completion` when read, without the server's raw response (``raw`` is None:
    take what else you need with ``transform_output``) or the request body (``request(i)`` gives it).
    """

    def __init__(self, items: Iterable[Any], *, rows: Sequence[Any], wall_time: float = 0.0,
                 interrupted: bool = False, concurrency: int = 0, rate: float | None = None, schema: Any = None,
                 identities: Sequence[str | None] | None = None, from_checkpoint: int = 0,
                 not_served: Mapping[str, int] | None = None, unreadable: int = 0, by_estimate: int = 0,
                 limiter: Any = None, request: Callable[[int], Any] | None = None, source: Any = None,
                 attachments: int = 0):
        self._answers = items if isinstance(items, Answers) else Answers.of(items)
        self.limiter = limiter  # the pace it kept (`dbmagic.batching.pace.Limiter`), shared by the batches on its endpoint
        self.by_estimate = by_estimate  # answers a budget counted by estimate (no usage, or less, reported)
        # rows whose record in the checkpoint was not served (``other``: another user's; ``unsigned``:
        # not written by this user's dbmagic: planted or edited), and lines of it that could not be read
        self.not_served = dict(not_served or {})
        self.unreadable = unreadable
        self.rows = rows
        self._source = source  # the DataFrame the rows came from (kept as it is, not copied), or None
        self._request = request
        # per row, the identity of the request it sent (`dbmagic.ledger.identity`): what resume= checks
        self.identities = identities if identities is not None else [None] * len(self)
        self.from_checkpoint = from_checkpoint  # rows a checkpoint answered, not sent
        self.attachments = attachments  # images and files in the rows' requests
        self.wall_time = wall_time
        self.interrupted = interrupted
        self.concurrency = concurrency
        self.rate = rate
        self.schema = schema

    def __len__(self) -> int:
        return self._answers.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._answers[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError("BatchResult index out of range")
        return self._answers[i % len(self)]

    def __iter__(self) -> Iterator[Any]:
        return (self._answers[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (BatchResult, list)) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def request(self, i: int) -> dict[str, Any] | None:
        """The request body row ``i`` sent (built again from its row, and given only when it is the very
        request that was sent: its identity matches), or None (not sent, or the notebook's values changed)."""
        return self._request(i) if self._request is not None else None

    @property
    def raw_texts(self) -> list[str | None]:
        """Per row, the raw text of an answer that did not fit the schema (else None)."""
        return [item.text if isinstance(item, SchemaError) else None for item in self._objects()]

    @property
    def texts(self) -> list[str | None]:
        a = self._answers
        return [a.text(i) if a.whole(i) else None for i in range(len(self))]

    @property
    def values(self) -> list[Any]:
        a = self._answers
        return [a.value(i) if a.whole(i) else None for i in range(len(self))]

    @property
    def errors(self) -> list[str | None]:
        a = self._answers
        return [None if (error := a.error(i)) is None else str(error) for i in range(len(self))]

    @property
    def failed(self) -> list[int]:
        a = self._answers
        return [i for i in range(len(self)) if a.error(i) is not None]

    @property
    def missing(self) -> list[int]:
        a = self._answers
        return [i for i in range(len(self))
                if a.empty(i) or isinstance(a.error(i), (NotSent, Interrupted))
                or (a.error(i) is None and not a.whole(i))]

    @property
    def failures(self) -> dict[str, int]:
        """How many rows failed of each kind (``not sent (interrupted)``, ``RateLimited``, ...),
        the commonest first."""
        counts: dict[str, int] = {}
        for i in self.failed:
            kind = failure_kind(self._answers.error(i))
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def usage(self) -> Usage:
        """Every round trip's tokens, the answers that did not fit the schema's included (they were paid for)."""
        return self._answers.usage()

    def _objects(self) -> list[Any]:
        """Per row, what is kept as an object (an error, ...), else None."""
        return [self._answers.kept(i) for i in range(len(self))]

    def summary(self) -> str:
        """One line: rows, time, rate, answered / failed / not sent, tokens."""
        whole = sum(map(self._answers.whole, range(len(self))))
        rate = whole / self.wall_time if self.wall_time > 0 else 0.0
        failures = self.failures
        parts = [f"{len(self)} rows in {self.wall_time:.1f} s ({rate:.1f} rows/s): {whole} answered"
                 + (f" ({self.from_checkpoint} from the checkpoint, not sent)" if self.from_checkpoint else ""),
                 f"{len(self.failed)} failed" + (" (" + ", ".join(f"{n} {kind}" for kind, n in failures.items())
                                                + ")" if failures else "")]
        if self.attachments:
            parts.append(f"{self.attachments} image{'' if self.attachments == 1 else 's'} or files in the rows' requests")
        if self.not_served:
            why = {"other": "another user's", "unsigned": "not written by your dbmagic (planted or edited)"}
            parts.append(f"{sum(self.not_served.values())} records in the checkpoint not used ("
                         + ", ".join(f"{n} {why.get(k, k)}" for k, n in sorted(self.not_served.items())) + ")")
        if self.unreadable:
            parts.append(f"{self.unreadable} unreadable lines or files of the checkpoint skipped")
        if self.usage:
            parts.append(self.usage.describe())
        if self.by_estimate:
            parts.append(f"{self.by_estimate} answers counted against the budget by estimate (they reported no "
                         "usage, or less than the estimate)")
        if self.rate is not None:
            tokens = getattr(self.limiter, "tokens", None)
            unit = f"{tokens} tokens/s by the endpoint's token limit" if tokens else "requests/s by the endpoint's rate limit"
            parts.append(f"paced at {self.rate:,.1f} {unit}")
        return ", ".join(parts) + "."

    def to_pandas(self, column: str = "answer", error_column: str = "error") -> Any:
        """The rows (their columns, or ``row``) with the answer and error columns (with a schema:
        a typed column per field, the error column, and ``{column}_raw``)."""
        pd = _deps.pandas("to_pandas()")

        if self._source is not None:
            return with_answers(self._source, self, column, error_column)
        frame = pd.DataFrame([row if isinstance(row, Mapping) else {"row": row} for row in self.rows])
        return with_answers(frame, self, column, error_column)

    def __repr__(self) -> str:
        return f"BatchResult({self.summary()})"


def failure_kind(error: BaseException | None) -> str:
    """What a failed row is, in a few words: ``not sent (budget)``, ``missing a value``, ``cut``,
    or the error's class (``RateLimited``, ``BadRequest``, ...)."""
    if isinstance(error, NotSent):
        return f"not sent ({error.reason})"
    if isinstance(error, MissingValue):
        return "missing a value"
    if isinstance(error, Interrupted):
        return "interrupted on its way"
    return type(error).__name__ if error is not None else "no answer"


def with_answers(frame: Any, result: BatchResult, column: str = "answer", error_column: str = "error") -> Any:
    """A copy of ``frame`` with the batch's answer and error columns; with a schema whose answer
    is an object, one typed column per field instead of the answer column (see `answer_columns`)."""
    out = frame.copy()
    for name, values in answer_columns(result, column, error_column).items():
        out[name] = values
    return out


def answer_columns(result: BatchResult, column: str = "answer", error_column: str = "error") -> dict[str, Any]:
    """The columns a batch adds, in order. Without a schema (or with one whose answer is not an
    object): ``column`` and ``error_column``. With an object schema: one column per top-level field
    with a fitting pandas dtype (``Int64``, ``Float64``, ``boolean``, ``string``; ``object`` for
    lists, nested objects and values of more than one type), null for rows without an answer, then
    ``error_column`` and ``{column}_raw``: the raw text of a row whose answer did not fit."""
    fields = result.schema.fields() if result.schema is not None else {}
    if not fields:
        return {column: result.values, error_column: result.errors}
    pd = _deps.pandas("a batch with a schema")
    records = [result.schema.record(v) if v is not None else {} for v in result.values]
    out: dict[str, Any] = {}
    for name, node in fields.items():
        out[name] = _typed(pd, [r.get(name) for r in records], node)
    out[error_column] = result.errors
    out[f"{column}_raw"] = result.raw_texts
    return out


_DTYPES = {"integer": "Int64", "number": "Float64", "boolean": "boolean", "string": "string"}


def _typed(pd: Any, values: list[Any], node: Mapping[str, Any]) -> Any:
    from ..call.schema import kind_of

    dtype = _DTYPES.get(kind_of(node)[0] or "")
    if dtype is not None:
        try:
            return pd.array(values, dtype=dtype)
        except (TypeError, ValueError):  # a value pydantic took in its own way: kept as it is
            pass
    return pd.Series(values, dtype=object).array


def is_missing(value: Any) -> bool:
    """None, NaN, and pandas' and NumPy's missing values (``pd.NA``, ``NaT``): what a row lacks."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    kind = type(value).__name__
    return kind in ("NAType", "NaTType") or (kind in ("datetime64", "timedelta64") and str(value) == "NaT")


def is_frame(rows: Any) -> bool:
    return hasattr(rows, "columns") and hasattr(rows, "to_dict") and hasattr(rows, "copy")


# -- a comparison: the same prompt sent to several endpoints or settings ---------------------------------

class Comparison(dict):
    """Label (``endpoint``, ``t=0.8``, ``endpoint · t=0.8``) -> that call's `Completion` (partial
    when it was cut, stopped or interrupted), or the error it failed with, in the order compared.
    ``runs`` holds every repeat, ``settings`` each label's call values; `to_pandas` a table."""

    def __init__(self, first: Mapping[str, Any], runs: Mapping[str, list[Any]], values: Mapping[str, dict[str, Any]]):
        super().__init__(first)
        self.runs = dict(runs)
        self.settings = dict(values)

    def to_pandas(self) -> Any:
        pd = _deps.pandas("to_pandas()")

        return pd.DataFrame({label: column_metrics(runs) for label, runs in self.runs.items()})

    def __repr__(self) -> str:
        parts = [f"{label}: {'error' if isinstance(v, Exception) else (v.text[:40] if v is not None else 'not run')!r}"
                 for label, v in self.items()]
        return "Comparison(" + ", ".join(parts) + ")"


def answer_shown(completion: Any) -> str:
    """An answer as a comparison's column shows it: the text, or a schema's value as JSON, then any tool calls."""
    value = completion.value
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    text = completion.text if isinstance(value, str) or value is None else json.dumps(value, ensure_ascii=False)
    calls = "\n".join(f"→ {c.describe()}" for c in completion.pending_tool_calls)
    return "\n".join(t for t in (text, calls) if t)


def column_metrics(runs: list[Any]) -> dict[str, Any]:
    """One compared column's row: its first answer, the median latency, tokens, its first error."""
    answers = [r for r in runs if r is not None and not isinstance(r, Exception)]
    errors = [str(e) for e in map(error_of, runs) if e is not None]
    first = answers[0] if answers else None
    row = {
        "answer": answer_shown(first) if first is not None else None,
        "latency_ms": round(statistics.median(a.latency for a in answers) * 1000, 1) if answers else None,
        "time_to_first_token_ms": (round(first.time_to_first_token * 1000, 1)
                                   if first is not None and first.time_to_first_token is not None else None),
        "input_tokens": first.usage.input if first is not None else None,
        "output_tokens": first.usage.output if first is not None else None,
        "served_model": first.served_model if first is not None else None,
        "error": errors[0] if errors else None,
    }
    if len(runs) > 1:
        row["runs"] = len(runs)
        row["distinct_answers"] = len({a.text for a in answers})
    return row
