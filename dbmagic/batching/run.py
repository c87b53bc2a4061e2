"""Prompts over data: one template, many rows, the shared client, at the endpoint's own pace.

>>> import dbmagic
>>> answers = dbmagic.batch("Classify the ticket: {{ text }}", df, endpoint="databricks-meta-llama-3-3-70b-instruct")
>>> answers[["text", "answer", "error"]]

``rows`` is a list of strings (each is ``{{ row }}``), a list of dicts, or a pandas DataFrame (each
row's columns fill the template). Answers come back in input order: for a DataFrame, a copy with an
answer column and an error column; otherwise a `BatchResult`.

- At most ``concurrency`` requests are in flight, paced at the endpoint's own rate
  (`dbmagic._pace`): a 429 with ``Retry-After`` pauses the whole batch until then; one without it
  (as Databricks often answers) makes the batch learn the rate the endpoint accepts and keep just
  under it. A rate limit slows the batch down; it does not fail rows. Other failures are retried
  per row by the client's retry policy, with its timeouts.
- A 429 is retried per row up to the client's ``attempts`` and ``deadline``; when nothing in the
  batch has been answered for that deadline, the rows not yet sent fail with the rate-limit error.
- A row whose template value is missing (None, NaN, ``pd.NA``) gets no call, a null answer and an
  error naming the column, as ``ai_query`` does; ``send_missing=True`` sends it anyway.
- With ``schema=`` (`dbmagic.schema`), a DataFrame comes back with one typed column per field of
  the answer (``Int64``, ``Float64``, ``boolean``, ``string``; ``object`` for lists and nested
  objects), then the error column and ``{column}_raw``, the raw text of an answer that did not fit
  (asked again ``schema_retries`` times first).
- Nothing is lost: a row that fails keeps its place and its error (the batch does not raise; a
  cut answer is a partial `Completion` with its ``error``); Ctrl-C stops sending, keeps the
  answers already on their way that come within `GRACE` seconds (they were paid for; a second
  Ctrl-C drops them), and returns what finished, the rows still in flight as partial
  (``interrupted``) answers; ``resume=`` the previous result sends only the rows that are missing,
  partial or failed.
- A progress bar shows done and failed rows, rows per second and, once the endpoint rate limits,
  the pace (``progress=False`` hides it).

In a notebook: ``%%dbllm -e ENDPOINT --over df [--column answer] [-o result]``.
"""

from __future__ import annotations

import contextvars
import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .. import _deps
from ..call.wire import Usage
from ..errors import (
    AuthenticationError,
    ConfigurationError,
    DbMagicError,
    Interrupted,
    MissingValue,
    NotSent,
    RateLimited,
    SchemaError,
    StatusError,
    TemplateError,
    error_of,
)
from ..observe import tracing
from ..prompts.namespace import Notebook
from ..prompts.templating import JINJA_GLOBALS, Template
from . import pace as _pace
from .ledger import Ledger, completion_of, identity
from .pace import Limiter

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..client import Call, CallOptions, Client

__all__ = ["batch", "BatchResult", "BackgroundBatch", "answer_columns", "is_frame", "row_contexts", "is_missing", "refuse_collisions",
           "refuse_field_collisions"]


class BatchResult(list):
    """One entry per input row, in input order: the row's `Completion` (partial when its answer
    was cut, or interrupted by Ctrl-C: its ``error`` says so), or the `DbMagicError` it failed with
    (a row not sent is a `NotSent` that says why, a `MissingValue`, ...). Every row that has no
    whole answer has an error.

    ``texts``, ``values`` and ``errors`` are per row (a cut row's error is the cut); ``failed``
    (every row with an error) and ``missing`` (not sent, or interrupted: what ``resume=`` sends
    again besides the failures) are row indices; ``failures`` counts the failed rows by kind;
    ``usage`` sums the token counts (a `Usage`); ``wall_time`` is in seconds; ``rate`` the pace
    the endpoint's rate limit set (requests per second; None when it never limited). `to_pandas`
    gives a DataFrame.
    """

    def __init__(self, items: Iterable[Any], *, rows: Sequence[Any], wall_time: float = 0.0,
                 interrupted: bool = False, concurrency: int = 0, rate: float | None = None, schema: Any = None,
                 identities: Sequence[str | None] | None = None, from_checkpoint: int = 0,
                 not_served: Mapping[str, int] | None = None, unreadable: int = 0, by_estimate: int = 0):
        super().__init__(items)
        self.by_estimate = by_estimate  # answers a budget counted by estimate (no usage, or less, reported)
        # rows whose record in the checkpoint was not served (``other``: another user's; ``unsigned``:
        # not written by this user's dbmagic: planted or edited), and lines of it that could not be read
        self.not_served = dict(not_served or {})
        self.unreadable = unreadable
        self.rows = list(rows)
        # per row, the identity of the request it sent (`dbmagic.ledger.identity`): what resume= checks
        self.identities = list(identities) if identities is not None else [None] * len(self)
        self.from_checkpoint = from_checkpoint  # rows a checkpoint answered, not sent
        self.wall_time = wall_time
        self.interrupted = interrupted
        self.concurrency = concurrency
        self.rate = rate
        self.schema = schema

    @property
    def raw_texts(self) -> list[str | None]:
        """Per row, the raw text of an answer that did not fit the schema (else None)."""
        return [item.text if isinstance(item, SchemaError) else None for item in self]

    @property
    def texts(self) -> list[str | None]:
        return [item.text if _answered(item) else None for item in self]

    @property
    def values(self) -> list[Any]:
        return [item.value if _answered(item) else None for item in self]

    @property
    def errors(self) -> list[str | None]:
        return [None if (error := error_of(item)) is None else str(error) for item in self]

    @property
    def failed(self) -> list[int]:
        return [i for i, item in enumerate(self) if error_of(item) is not None]

    @property
    def missing(self) -> list[int]:
        return [i for i, item in enumerate(self)
                if item is None or isinstance(error_of(item), (NotSent, Interrupted))
                or (error_of(item) is None and not _answered(item))]

    @property
    def failures(self) -> dict[str, int]:
        """How many rows failed of each kind (``not sent (interrupted)``, ``RateLimited``, ...),
        the commonest first."""
        counts: dict[str, int] = {}
        for i in self.failed:
            kind = failure_kind(error_of(self[i]))
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def usage(self) -> Usage:
        """Every round trip's tokens, the answers that did not fit the schema's included (they were paid for)."""
        total = Usage()
        for item in self:
            if _answered(item):
                total += item.usage
            elif isinstance(item, SchemaError) and item.completion is not None:
                total += item.completion.usage
        return total

    def summary(self) -> str:
        """One line: rows, time, rate, answered / failed / not sent, tokens."""
        answered = sum(1 for item in self if _answered(item))
        rate = answered / self.wall_time if self.wall_time > 0 else 0.0
        failures = self.failures
        parts = [f"{len(self)} rows in {self.wall_time:.1f} s ({rate:.1f} rows/s): {answered} answered"
                 + (f" ({self.from_checkpoint} from the checkpoint, not sent)" if self.from_checkpoint else ""),
                 f"{len(self.failed)} failed" + (" (" + ", ".join(f"{n} {kind}" for kind, n in failures.items())
                                                + ")" if failures else "")]
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
            parts.append(f"paced at {self.rate:.1f} requests/s by the endpoint's rate limit")
        return ", ".join(parts) + "."

    def to_pandas(self, column: str = "answer", error_column: str = "error") -> Any:
        """The rows (their columns, or ``row``) with the answer and error columns (with a schema:
        a typed column per field, the error column, and ``{column}_raw``)."""
        pd = _deps.pandas("to_pandas()")

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


def _answered(item: Any) -> bool:
    """A whole answer (a resumed one included), not an error nor a partial answer."""
    return item is not None and not isinstance(item, Exception) and not getattr(item, "is_partial", False)


def batch(
    template: str,
    rows: Any,
    endpoint: str | None = None,
    *,
    concurrency: int = 8,
    resume: Any = None,
    progress: bool = True,
    column: str = "answer",
    error_column: str = "error",
    send_missing: bool = False,
    checkpoint: Any = None,
    shared_checkpoint: bool = False,
    max_tokens_total: int | None = None,
    max_cost: float | None = None,
    namespace: Mapping[str, Any] | None = None,
    client: Client | None = None,
    transform_output: Callable[[Any], Any] | None = None,
    timeout: float | None = None,
    background: bool = False,
    **options: Unpack[CallOptions],
) -> Any:
    """Send ``template`` filled from each of ``rows``; see the module docstring.

    ``namespace`` adds variables every row can use (a row's own values win); ``client`` defaults
    to the kernel's shared one; the other options are those of `Client.complete`. ``column`` and
    ``error_column`` must not be columns of ``rows`` already. A row whose template value is missing
    (None, NaN, ``pd.NA``) is not sent: its answer is null and its error names the column, unless
    ``send_missing=True`` sends it as the template renders it. ``checkpoint`` (a folder: local, or a
    volume ``/Volumes/...``) keeps every finished call (`dbmagic.ledger`): a row whose request it
    already holds is not sent again, even after a kernel restart or from another notebook, and
    rows with the same request are sent once. ``max_tokens_total``: once the answers report that
    many tokens (input and output), nothing more is sent; the rows finished keep their answers, the
    others say the budget was reached. ``max_cost`` (USD) does the same with the answers priced as
    MLflow prices a trace (it needs MLflow, and a price for the model). ``background=True`` returns at once a `BackgroundBatch`
    (its progress shows in this cell's output while other cells run; ``.result()`` is what a
    foreground run returns).
    """
    def go(handle: BackgroundBatch | None = None, bar: Any = None) -> Any:
        result = run(template, rows, endpoint, concurrency=concurrency, resume=resume, progress=progress,
                     checkpoint=checkpoint, shared_checkpoint=shared_checkpoint, max_tokens_total=max_tokens_total,
                     max_cost=max_cost,
                     namespace=namespace, client=client, transform_output=transform_output, timeout=timeout,
                     column=column, error_column=error_column, send_missing=send_missing, handle=handle, bar=bar,
                     **options)
        return with_answers(rows, result, column, error_column) if is_frame(rows) else result

    if background:
        return BackgroundBatch(go, total=len(row_contexts(rows)[0]), progress=progress)
    return go()


class BackgroundBatch:
    """A batch running in the background (``dbmagic.batch(..., background=True)``, ``%%dbllm --over
    df --background``): the kernel runs other cells meanwhile, and its progress bar shows in the
    cell that started it. ``done`` says whether it has ended; ``result()`` waits for it and returns
    what a foreground run returns (the DataFrame with its answers, or the `BatchResult`), or raises
    what stopped it; ``batch_result`` is its `BatchResult` once done. ``cancel()`` sends nothing
    more and keeps the answers already on their way, as Ctrl-C does a foreground batch. Batches on
    the same endpoint, in the background or not, share its pace (`dbmagic._pace.shared`)."""

    def __init__(self, go: Callable[..., Any], *, total: int, progress: bool):
        self._rows: _Rows | None = None
        self._outcome: Any = None
        self._error: BaseException | None = None
        self.batch_result: BatchResult | None = None
        self._done = threading.Event()
        self._cancel = False
        bar = _bar(total) if progress and total else None  # made here: it shows in the cell that started it
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run, go, bar),
                                        name="dbmagic-background-batch", daemon=True)
        self._thread.start()

    def _run(self, go: Callable[..., Any], bar: Any) -> None:
        try:
            self._outcome = go(self, bar)
        except BaseException as exc:  # kept for result(), which raises it in the caller's thread
            self._error = exc
        finally:
            self._done.set()

    def _attach(self, rows: _Rows) -> None:
        self._rows = rows
        if self._cancel:
            rows.cancel()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """Wait (at most ``timeout`` seconds) for the batch, and return its result."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"The background batch is still running after {timeout:g} s: {self.progress()}.")
        if self._error is not None:
            raise self._error
        return self._outcome

    def cancel(self) -> None:
        """Send nothing more; the answers already on their way are kept if they come within `GRACE` s."""
        self._cancel = True
        if self._rows is not None:
            self._rows.cancel()

    def progress(self) -> str:
        rows = self._rows
        if self.done and self.batch_result is not None:
            return self.batch_result.summary()
        if rows is None:
            return "starting"
        return f"running: {rows.done} done, {rows.failed} failed, {rows.remaining} to go"

    def __repr__(self) -> str:
        return f"BackgroundBatch({self.progress()})"


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


def refuse_field_collisions(columns: Sequence[Any], schema: Any, column: str, error_column: str) -> None:
    """A schema's fields become columns: none may overwrite an input column or the error column."""
    fields = list(schema.fields()) if schema is not None else []
    taken = {str(c) for c in columns} | {error_column, f"{column}_raw"}
    clash = [f for f in fields if f in taken]
    if clash:
        raise ConfigurationError(
            f"The schema's field {clash[0]!r} would be a column, and the DataFrame already has it (or it is the "
            f"error or raw-text column): rename the field, or the input column.")


def run(template: str | Template, rows: Any, endpoint: str | None = None, *, concurrency: int = 8, resume: Any = None,
        progress: bool = True, namespace: Mapping[str, Any] | None = None, client: Client | None = None,
        transform_output: Callable[[Any], Any] | None = None, timeout: float | None = None,
        column: str = "answer", error_column: str = "error", send_missing: bool = False,
        signed_in: bool = False, checkpoint: Any = None, max_tokens_total: int | None = None,
        max_cost: float | None = None, handle: BackgroundBatch | None = None, bar: Any = None,
        shared_checkpoint: bool = False, **options: Any) -> BatchResult:
    """`batch`, always returning the `BatchResult` (what ``%%dbllm --over`` keeps in ``_dbllm``).
    ``signed_in``: the token was accepted before this batch (a Spark task's, by the driver), so a
    401 means that it expired or was revoked since."""
    from .. import settings
    from ..call.schema import schema_of
    from ..client import Completion, get_client, refuse_unknown_options

    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be a whole number of at least 1; got {concurrency!r}.")
    if max_tokens_total is not None:
        max_tokens_total = settings.coerce("max_tokens_total", max_tokens_total)
    if max_cost is not None:
        max_cost = settings.coerce("max_cost", max_cost)
    refuse_unknown_options(options, "dbmagic.batch")
    client = client or get_client()
    namespace = Notebook(namespace if namespace is not None else {})  # its repr names no value (Verbose)
    contexts, columns, originals = row_contexts(rows)
    tpl = template if isinstance(template, Template) else Template(template)
    schema = options["schema"] = schema_of(options.get("schema"))
    if columns is not None:
        refuse_collisions(columns, column, error_column)
        refuse_field_collisions(columns, schema, column, error_column)
        unknown = sorted(tpl.required - set(columns) - set(namespace) - JINJA_GLOBALS)
        if unknown:
            raise TemplateError(
                f"The template uses {', '.join(unknown)}, which is not a column of the DataFrame "
                f"(its columns: {', '.join(map(str, columns)) or 'none'}) nor a variable given to the batch. "
                "Rename the {{ }} names, or add the columns."
            )
    else:  # a list (or Series) of values or dicts: its names are checked before anything is sent too
        names = set().union(*(c.keys() for c in contexts)) if contexts else set()
        unknown = sorted(tpl.required - names - set(namespace) - JINJA_GLOBALS)
        if unknown:
            shown = ("{{ row }} (each row is a value)" if names == {"row"} else
                     f"the rows' keys ({', '.join(sorted(names)[:10]) or 'none'})")
            raise TemplateError(
                f"The template uses {', '.join(unknown)}, which the rows do not have (they give {shown}) nor the "
                "notebook. Rename the {{ }} names, or give rows that have them.")
    items: list[Any] = [None] * len(contexts)
    if timeout is not None:
        timeout = settings.coerce("timeout", timeout)
    ledger = Ledger(checkpoint, shared=shared_checkpoint) if checkpoint is not None else None
    signer = client.signer() if ledger is not None else None
    prepare = client.preparer(endpoint, **options)  # options checked, the endpoint looked up: once
    built: dict[int, Any] = {}  # row -> its PreparedRequest (or the error that kept it from being built)
    identities: list[str | None] = [None] * len(contexts)

    def request_of(i: int) -> Any:
        if i not in built:
            try:
                prompt = tpl.render(namespace.with_row(contexts[i]), where=f"in row {i} (its values: "
                                                  f"{', '.join(map(str, contexts[i])) or 'none'})")
                built[i] = prepare(prompt.strip() if isinstance(prompt, str) else prompt)
                identities[i] = identity(built[i].url, built[i].body)
            except DbMagicError as exc:  # the row keeps the error, as a row whose call failed
                built[i] = exc
        return built[i]

    if resume is not None:
        items = _resumed(resume, len(contexts), column, error_column)
        old = getattr(resume, "identities", None)
        if old is not None and len(old) == len(items):  # an answer to another request is not this row's
            for i, item in enumerate(items):
                if _answered(item) and old[i] is not None:
                    request_of(i)  # builds the row's request, and so its identity
                    if identities[i] != old[i]:
                        items[i] = None
    todo = [i for i, item in enumerate(items) if not _answered(item)]
    if not send_missing:  # as ai_query: a row with a missing value gets no call, a null answer and an error
        skipped = set()
        for i in todo:
            empty = missing_in(tpl, contexts[i])
            if empty:
                items[i] = MissingValue(
                    f"Row {i} was not sent: its {', '.join(map(repr, empty))} {'is' if len(empty) == 1 else 'are'} "
                    "missing (None, NaN or NA). Fill the value, or pass send_missing=True (--send-missing) to "
                    "send the row as the template renders it.")
                skipped.add(i)
        todo = [i for i in todo if i not in skipped]
    followers: dict[int, int] = {}  # a row whose request another row sends -> that row
    reused = 0
    if ledger is not None:  # rows the checkpoint answers are not sent; a request is sent once per batch
        leaders: dict[str, int] = {}
        sending = []
        for i in todo:
            request = request_of(i)
            if isinstance(request, DbMagicError):
                items[i] = request
                continue
            record = ledger.answer(identities[i], signer)
            if record is not None:
                items[i] = completion_of(record, request, transform_output)
                reused += 1
            elif identities[i] in leaders:
                followers[i] = leaders[identities[i]]
            else:
                leaders[identities[i]] = i
                sending.append(i)
        todo = sending
    # a budget (checked before anything is sent), priced by the first row's model
    budget = (budget_of(max_tokens_total, max_cost, getattr(request_of(todo[0]), "llm", None))
              if todo and (max_tokens_total or max_cost) else None)
    worst: dict[int, tuple[float, int]] = {}  # row -> (its worst cost, its input tokens estimated)

    def worst_of(i: int) -> tuple[float, int]:
        if i not in worst:
            request = request_of(i)
            worst[i] = budget.worst(request.body) if budget is not None and not isinstance(request, DbMagicError) \
                else (0.0, 0)
        return worst[i]

    if budget is not None and worst_of(todo[0])[0] > budget.limit:
        raise ConfigurationError(
            f"One row alone may cost more than the budget ({worst_of(todo[0])[0]:,.4g} {budget.unit} at worst: its "
            f"input's estimate plus its max_tokens, {RESERVED_OUTPUT} when unset), so nothing would be sent. Raise "
            f"{budget.option}, or set a lower max_tokens (--max-tokens).")
    policy = replace(client.retry, retry_rate_limited=False)  # a 429 slows the whole batch instead
    client.ensure_pool(concurrency)

    batch: dict[str, Any] = {}  # with tracing on: the batch's id, which tags each row's trace

    def call(i: int) -> Any:
        request = request_of(i)
        if isinstance(request, DbMagicError):
            raise request
        if ledger is not None:  # another batch on this checkpoint may be sending it: its answer is waited for
            record = ledger.turn(identities[i], request.url, signer, rows_run.stop)
            if record is not None:
                return _Reused(completion_of(record, request, transform_output))
        return client.call(request, transform_output=transform_output, timeout=timeout, retry=policy,
                           tags={**batch, "row": i} if batch else None)

    def recorded(i: int, outcome: Any) -> None:  # each finished call, in the checkpoint as it finishes
        answer = outcome.completion if isinstance(outcome, SchemaError) else outcome
        if ledger is not None and identities[i] is not None and not getattr(answer, "cached", False) and (
                (isinstance(answer, Completion) and not answer.is_partial) or isinstance(answer, StatusError)):
            ledger.append(identities[i], built[i].url, answer, signer)

    started = time.perf_counter()
    pace = _pace.shared((id(client), endpoint, options.get("cluster_id"), options.get("port")),
                        lambda: Limiter(min(concurrency, max(len(todo), 1)), policy, client.clock))
    with pace as limiter, tracing.batch_span(tpl.source, len(todo), endpoint) as span:
        rows_run = _Rows(concurrency, todo, items, policy, client.clock, signed_in=signed_in, on_outcome=recorded,
                         budget=budget, limiter=limiter, worst=worst_of)
        if handle is not None:
            handle._attach(rows_run)
        if span is not None:
            batch["batch"] = span.batch_id
        try:
            interrupted = rows_run.run(call, progress=progress, bar=bar)
        finally:
            if ledger is not None:
                ledger.close()
        for follower, leader in followers.items():  # the same request: the same answer, sent once
            items[follower] = items[leader]
        if span is not None:
            span.set_outputs({"answered": sum(1 for i in todo if _answered(items[i])),
                              "failed": sum(1 for i in todo if error_of(items[i]) is not None),
                              "interrupted": interrupted})
    reused += rows_run.reused
    not_served = ledger.not_served({identities[i] for i in todo}) if ledger is not None else {}
    tracing.flush()  # the rows' traces are readable when the batch returns
    result = BatchResult(items, rows=originals, wall_time=time.perf_counter() - started, interrupted=interrupted,
                         concurrency=rows_run.limiter.cap, rate=rows_run.limiter.rate, schema=schema,
                         identities=identities, from_checkpoint=reused, not_served=not_served,
                         unreadable=ledger.skipped if ledger is not None else 0,
                         by_estimate=budget.by_estimate if budget is not None else 0)
    if handle is not None:
        handle.batch_result = result
    return result


def missing_in(template: Template, row: Mapping[str, Any]) -> list[str]:
    """The names ``template`` reads that ``row`` has with a missing value (a row not sent, as ai_query)."""
    return sorted(name for name in template.names & row.keys() if is_missing(row[name]))


def estimate(template: str | Template, rows: Any, namespace: Mapping[str, Any] | None = None,
             send_missing: bool = False) -> tuple[int, int, int]:
    """What a batch would send, sending nothing: ``(rows it would send, rows a missing value keeps
    back, an estimate of the input tokens)``; the estimate counts a token per 4 characters of the
    rendered prompts (the usual rule of thumb for English; the endpoint's own count decides)."""
    contexts, _, _ = row_contexts(rows)
    tpl = template if isinstance(template, Template) else Template(template)
    sent = held = tokens = 0
    for context in contexts:
        if not send_missing and missing_in(tpl, context):
            held += 1
            continue
        prompt = tpl.render(Notebook(namespace or {}).with_row(context))
        tokens += tokens_in(prompt if isinstance(prompt, str) else json.dumps(prompt))
        sent += 1
    return sent, held, tokens


def is_missing(value: Any) -> bool:
    """None, NaN, and pandas' and NumPy's missing values (``pd.NA``, ``NaT``): what a row lacks."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    kind = type(value).__name__
    return kind in ("NAType", "NaTType") or (kind in ("datetime64", "timedelta64") and str(value) == "NaT")


def refuse_collisions(columns: list[Any], column: str, error_column: str,
                       options: tuple[str, str] = ("column= (--column)", "error_column=")) -> None:
    """Output columns never overwrite input columns, nor each other (``options``: how to rename them)."""
    if column == error_column:
        raise ConfigurationError(f"The answer and error columns are both {column!r}: give them different names.")
    for name, what, option in ((column, "answers", options[0]), (error_column, "errors", options[1])):
        if name in map(str, columns):
            raise ConfigurationError(
                f"The DataFrame already has a column {name!r}, where the batch would write its {what}: choose "
                f"another name with {option}, or rename the input column."
            )


def is_frame(rows: Any) -> bool:
    return hasattr(rows, "columns") and hasattr(rows, "to_dict") and hasattr(rows, "copy")


def row_contexts(rows: Any) -> tuple[list[dict[str, Any]], list[Any] | None, list[Any]]:
    """The values each row fills the template with, the DataFrame's columns (None otherwise), and
    the rows as given (what the result keeps)."""
    if is_frame(rows):
        names = [str(c) for c in rows.columns]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigurationError(
                f"The DataFrame has more than one column named {', '.join(map(repr, twice))}, and a row can fill "
                "a template with only one of them: rename them first (df.columns = [...])."
            )
        contexts = [{str(k): v for k, v in record.items()} for record in rows.to_dict("records")]
        return contexts, list(rows.columns), contexts
    if hasattr(rows, "to_list"):  # a pandas Series: its values are rows
        rows = rows.to_list()
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise ConfigurationError(
            f"rows must be a list of strings or dicts, or a pandas DataFrame; got {type(rows).__name__}."
        )
    rows = list(rows)
    return [dict(r) if isinstance(r, Mapping) else {"row": r} for r in rows], None, rows


def _resumed(previous: Any, n: int, column: str, error_column: str) -> list[Any]:
    """What a previous result already has: answers kept, failed and missing rows to send again."""
    if isinstance(previous, BatchResult):
        items = list(previous)
    elif is_frame(previous) and column in previous.columns:
        errors = previous[error_column].tolist() if error_column in previous.columns else [None] * len(previous)
        items = [_Kept(v) if not is_missing(v) and is_missing(e) else None
                 for v, e in zip(previous[column].tolist(), errors, strict=True)]
    else:
        raise ConfigurationError(
            f"resume= takes the result of an earlier batch over the same rows (a BatchResult, or the DataFrame "
            f"it returned, with its {column!r} column); got {type(previous).__name__}."
        )
    if len(items) != n:
        raise ConfigurationError(f"resume= has {len(items)} rows and this batch {n}: resume the same rows.")
    return items


class _Reused:
    """A row answered by another batch on the same checkpoint while this one waited (not sent)."""

    reused = True

    def __init__(self, outcome: Any):
        self._outcome = outcome

    def outcome(self) -> Any:
        return self._outcome

    def cancel(self, why: str = "stopped") -> None:
        pass


class _Kept:
    """An answer kept from a resumed DataFrame (only its value is known)."""

    def __init__(self, value: Any):
        self.value = value
        self.text = value if isinstance(value, str) else str(value)
        self.usage = Usage()


GRACE = 2.0  # seconds a stopped batch (Ctrl-C) waits for the answers already sent, which are paid for


# output tokens a request is taken to cost at worst when it sets no max_tokens (a budget reserves them)
RESERVED_OUTPUT = 512


def tokens_in(text: str) -> int:
    """An estimate of the tokens in ``text``: a token per 4 characters (the usual rule of thumb for
    English; the endpoint's own count decides), the one estimate a dry run and a budget use."""
    return -(-len(text) // 4)


@dataclass
class Budget:
    """What a batch may spend: ``limit`` in ``unit`` (tokens, or USD), each answer costing
    ``cost(usage)``; ``option`` is how to raise it.

    A bound, not a hope: each request reserves its worst case before it is sent (`worst`: its
    input's estimate plus its ``max_tokens``, or `RESERVED_OUTPUT` when unset), and a request
    starts only while what was spent, what is reserved and its own worst case fit in the limit,
    so no concurrency overshoots it. When it ends it settles on what it cost: the usage it
    reported, or the estimate (its input's, and its answer's text) where that is more (no usage
    reported, or less than the estimate); ``by_estimate`` counts those answers."""

    limit: float
    unit: str
    cost: Callable[[Usage], float]
    option: str
    spent: float = 0.0
    reserved: float = 0.0
    by_estimate: int = 0

    def worst(self, body: Any) -> tuple[float, int]:
        """``(worst cost, input tokens estimated)`` of a request body."""
        inputs = tokens_in(json.dumps(body, ensure_ascii=False, default=str))
        most = body.get("max_tokens") if isinstance(body, dict) else None
        output = most if isinstance(most, int) and not isinstance(most, bool) else RESERVED_OUTPUT
        return self.cost(Usage(inputs, output, inputs + output)), inputs

    def take(self, amount: float) -> bool:
        """Reserve ``amount`` when it fits beside what is spent and reserved."""
        if self.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, usage: Usage | None, inputs: int, text: str | None) -> None:
        """A request ended: its reservation goes, what it cost (usage, or the estimate) is spent."""
        self.reserved -= reserved
        if usage is None and text is None:  # it got no answer: nothing was generated
            return
        usage = usage or Usage()
        estimate = Usage(inputs, tokens_in(text or ""))
        counted = Usage(max(usage.input or 0, estimate.input or 0), max(usage.output or 0, estimate.output or 0))
        if usage.input is None or usage.output is None or counted != Usage(usage.input, usage.output):
            self.by_estimate += 1
        self.spent += self.cost(Usage(counted.input, counted.output, (counted.input or 0) + (counted.output or 0)))

    def said(self) -> str:
        amount = (lambda v: f"{v:,.0f} tokens") if self.unit == "tokens" else (lambda v: f"${v:,.4f}")
        return (f"the batch reached its budget of {amount(self.limit)} ({amount(self.spent)} by the answers so "
                f"far). Raise {self.option}, or send the rest later with resume= (or the same checkpoint).")


def budget_of(max_tokens_total: int | None, max_cost: float | None, llm: tuple[str, str] | None) -> Budget | None:
    """The `Budget` of a batch's limits, checked before anything is sent. A cost is priced as MLflow
    prices a trace (its model catalog, by ``llm``: the model and provider, `Completion`'s
    ``mlflow.llm.model``), so it needs MLflow, and a price for the model."""
    if max_tokens_total is not None and max_cost is not None:
        raise ConfigurationError("Give the batch one budget: max_tokens_total or max_cost.")
    if max_tokens_total is not None:
        return Budget(max_tokens_total, "tokens", lambda usage: usage.total or 0,
                      "max_tokens_total (--max-tokens-total)")
    if max_cost is None:
        return None
    try:
        from mlflow.tracing.utils import calculate_cost_by_model_and_token_usage
    except ImportError:
        raise ConfigurationError("max_cost prices answers with MLflow's model prices: pip install 'dbmagic[mlflow]', "
                                 "or give max_tokens_total.") from None
    if llm is None:
        raise ConfigurationError("max_cost needs a model to price, and a driver-proxy app names none: give "
                                 "max_tokens_total.")
    model, provider = llm

    def cost(usage: Usage) -> float:
        tokens = {"input_tokens": usage.input or 0, "output_tokens": usage.output or 0}
        if usage.cache_read:
            tokens["cache_read_input_tokens"] = usage.cache_read
        found = calculate_cost_by_model_and_token_usage(model, tokens, provider)
        return float(found["total_cost"]) if found else 0.0

    if not cost(Usage(1000, 1000, 2000)):
        raise ConfigurationError(f"MLflow has no price for {model} ({provider}), so max_cost cannot be kept: give "
                                 "max_tokens_total.")
    return Budget(max_cost, "USD", cost, "max_cost (--max-cost)")


class _Rows:
    """The worker loop: ``cap`` threads take rows from ``todo`` when the `Limiter` allows a start,
    and store each row's outcome (`Call.outcome`) in ``items``. A 429 puts the row back first in
    line (until its attempts or the deadline are spent); Ctrl-C sends nothing more, waits up to
    `GRACE` seconds for the calls in flight, then cancels those still on their way (each keeps what
    arrived, as an ``interrupted`` answer)."""

    def __init__(self, cap: int, todo: list[int], items: list[Any], policy: Any, clock: Any, signed_in: bool = False,
                 on_outcome: Callable[[int, Any], None] | None = None, budget: Budget | None = None,
                 limiter: Limiter | None = None, worst: Callable[[int], tuple[float, int]] | None = None):
        self.workers = min(cap, max(len(todo), 1))
        self.limiter = limiter if limiter is not None else Limiter(self.workers, policy, clock)
        self.todo = deque(todo)
        self.items = items
        self.policy = policy
        self.remaining = len(todo)
        self.failed = 0
        self.done = 0
        self.answers = 0  # rows answered so far: a 429 after one of them starts the row's count afresh
        self.signed_in = signed_in  # the token worked before the batch: a 401 means it expired since
        self.on_outcome = on_outcome  # told each row's outcome as it is stored (the checkpoint writes it)
        self.budget = budget  # what the batch may spend, after which nothing more is sent
        self.worst = worst  # a row's worst cost and input estimate, which it reserves of the budget
        self.reservations: dict[int, tuple[float, int]] = {}  # rows in flight -> what they reserved
        # per row: 429s in a row with no answer in the batch between them, since when, at which answer count:
        # the policy's attempts and deadline hold per row while the endpoint accepts nothing
        self.limited: dict[int, tuple[int, float, int]] = {}
        self.calls: dict[int, Call] = {}  # in flight, for Ctrl-C
        self.stopped = False
        self.stop = threading.Event()  # set with `stopped`: what waits on another batch's answer wakes
        self.reused = 0  # rows another batch on the same checkpoint answered while this one waited
        self.cancelled = False  # stopped by `cancel` (a background batch's handle), not by Ctrl-C
        self.fatal: BaseException | None = None  # what stopped the batch from within (SystemExit ...)
        self.cond = threading.Condition()

    def run(self, call: Callable[[int], Call], *, progress: bool, bar: Any = None) -> bool:
        """Send every row; True when interrupted (Ctrl-C, or `cancel` from another thread). ``bar``:
        a progress bar made by the caller (a background batch makes it in the cell that started it)."""
        bar = bar if bar is not None else _bar(self.remaining) if progress and self.remaining else None
        # each worker runs in a copy of this thread's context, so a trace's batch span is its rows' parent
        workers = [threading.Thread(target=contextvars.copy_context().run, args=(self._work, call),
                                    name=f"dbmagic-batch-{i}", daemon=True) for i in range(self.workers)]
        for worker in workers:
            worker.start()
        try:
            with self.cond:
                while self.remaining and not self.stopped and any(w.is_alive() for w in workers):
                    self.cond.wait(0.1)
                    if bar is not None:
                        _show(bar, self)
            if self.cancelled:
                self._keep_what_comes(workers, announce=False)
                return True
        except KeyboardInterrupt:
            self._keep_what_comes(workers, announce=True)
            return True
        finally:
            if bar is not None:
                _show(bar, self)
                bar.close()
        if self.fatal is not None:
            raise self.fatal
        return False

    def cancel(self) -> None:
        """Stop sending (from any thread); the answers on their way are kept as after a Ctrl-C."""
        with self.cond:
            self.cancelled = self.stopped = True
            self.stop.set()
            self.cond.notify_all()

    def _keep_what_comes(self, workers: list[threading.Thread], *, announce: bool) -> None:
        """Stopped: nothing more is sent; the answers already on their way (sent, so paid for) are
        kept when they come within `GRACE` seconds (a second Ctrl-C drops them); the calls still in
        flight then keep what arrived, as partial ``interrupted`` answers."""
        with self.cond:
            self.stopped = True
            self.stop.set()
            waiting = len(self.calls)
            self.cond.notify_all()
        if waiting and GRACE > 0:
            if announce:
                print(f"Stopping: nothing more is sent; keeping the {waiting} answer{'s' if waiting > 1 else ''} on "
                      f"the way for up to {GRACE:g} s (Ctrl-C again to drop {'them' if waiting > 1 else 'it'}).",
                      flush=True)
            try:
                until = time.monotonic() + GRACE
                with self.cond:
                    while self.calls and time.monotonic() < until:
                        self.cond.wait(min(0.05, max(until - time.monotonic(), 0)))
            except KeyboardInterrupt:
                pass
        with self.cond:  # what did not come in time keeps what arrived
            in_flight = list(self.calls.values())
        for c in in_flight:
            c.cancel("interrupted")
        until = time.monotonic() + 0.1  # a streamed call ends at once; a blocked one is not waited for
        for worker in workers:
            worker.join(max(until - time.monotonic(), 0))
        with self.cond:  # a call still on its way keeps what arrived, as every other
            for index, c in self.calls.items():
                if self.items[index] is None:
                    kept = c.completion or c.partial("interrupted")
                    if kept.is_partial and kept.error is None:
                        kept.error = Interrupted(f"Row {index}: the batch stopped while its answer was on its way; "
                                                 f"{len(kept.text)} characters that arrived are kept. resume= sends "
                                                 "it again.")
                    self.items[index] = kept
            why = "cancelled" if self.cancelled else "interrupted"
            while self.todo:  # every row not sent says why
                index = self.todo.popleft()
                if self.items[index] is None:
                    self.items[index] = NotSent(
                        f"Row {index} was not sent: the batch was {'cancelled' if self.cancelled else 'interrupted (Ctrl-C)'}"
                        " first. resume= (or the same checkpoint) sends it.", reason=why)

    def _work(self, call: Callable[[int], Call]) -> None:
        limiter = self.limiter
        while True:
            with self.cond:
                index, permit = self._next()
                if index is None:
                    return
            c: Any = None
            try:
                c = call(index)
                with self.cond:
                    self.calls[index] = c
                    if self.stopped:
                        c.cancel("interrupted")
                outcome: Any = c.outcome()
            except DbMagicError as exc:  # the row's request could not be built
                outcome = exc
            except Exception as exc:  # a bug of ours or a library's: the row keeps it, the batch goes on
                outcome = DbMagicError(f"Unexpected {exc.__class__.__name__}: {exc}")
            except BaseException as exc:  # SystemExit from a transform: it stops the whole batch
                with self.cond:
                    self.fatal, self.stopped = exc, True
                    self.stop.set()
                    limiter.release(permit)
                    self.cond.notify_all()
                return
            with self.cond:
                self.calls.pop(index, None)
                if isinstance(outcome, RateLimited) and (self.stopped or self._again(index, outcome, permit)):
                    limiter.release(permit)  # stopped: the row stays not sent (resume sends it)
                    self._settle(index, None)
                    continue
                if isinstance(outcome, AuthenticationError):  # every request after a 401 would be refused too
                    first, midway = outcome, self.signed_in or self.answers > 0  # the token expired (or was revoked)
                    outcome = _token_refused(first, midway)
                    self._give_up_all(lambda first=first, midway=midway: _token_refused(first, midway, sent=False))
                answered = isinstance(outcome, SchemaError) and outcome.completion is not None  # an answer, unfit
                if getattr(c, "reused", False):  # not sent: nothing to learn the pace from
                    limiter.release(permit)
                    self.reused += 1
                elif (isinstance(outcome, Exception) and not answered) or getattr(outcome, "is_partial", False):
                    limiter.release(permit)
                else:
                    limiter.on_success(permit)
                    self.answers += 1
                self.items[index] = outcome
                if self.on_outcome is not None:  # recorded before the row counts as done: a batch that has
                    try:                         # returned has every answer in its checkpoint
                        self.on_outcome(index, outcome)
                    except Exception as exc:  # a checkpoint that cannot be written stops the batch
                        self.fatal, self.stopped = exc, True
                        self.stop.set()
                self.remaining -= 1
                self.done += 1
                if error_of(outcome) is not None:
                    self.failed += 1
                self._settle(index, outcome)
                self.cond.notify_all()

    def _settle(self, index: int, outcome: Any) -> None:
        """A row's request ended: its reservation of the budget settles on what it cost (holding the lock)."""
        reserved = self.reservations.pop(index, None)
        if self.budget is None or reserved is None:
            return
        paid = outcome.completion if isinstance(outcome, SchemaError) else outcome
        answered = paid is not None and not isinstance(paid, BaseException) and not getattr(paid, "cached", False)
        self.budget.settle(reserved[0], getattr(paid, "usage", None) if answered else None, reserved[1],
                           getattr(paid, "text", None) if answered else None)
        if self.budget.spent >= self.budget.limit:
            self._give_up_all(lambda: NotSent(f"Not sent: {self.budget.said()}", reason="budget"))

    def _next(self) -> tuple[int | None, Any]:
        """The next row to send and its permit, once the limiter allows (called holding the lock)."""
        limiter = self.limiter
        while not self.stopped and self.todo:
            wait = limiter.delay()
            if wait > 0:
                self.cond.wait(min(wait, 0.5))
                continue
            if self.budget is not None and self.worst is not None:
                reserve = self.worst(self.todo[0])
                if not self.budget.take(reserve[0]):
                    if not self.reservations:  # nothing in flight will give room back: the budget is spent
                        self._give_up_all(lambda: NotSent(f"Not sent: {self.budget.said()}", reason="budget"))
                        return None, None
                    self.cond.wait(0.5)  # an answer on its way may settle for less than it reserved
                    continue
                self.reservations[self.todo[0]] = reserve
            permit = limiter.acquire()
            index = self.todo.popleft()
            return index, permit
        return None, None

    def _again(self, index: int, exc: RateLimited, permit: Any) -> bool:
        """A 429: tell the limiter, put the row back first in line; False when the row's attempts or
        time are up (it then fails with the 429, as any call past its retry policy). When nothing has
        answered for the policy's deadline, the rows not yet sent fail with it too (holding the lock)."""
        limiter, policy = self.limiter, self.policy
        limiter.on_rate_limited(permit, exc.retry_after, exc.window)
        now = limiter.clock.monotonic()
        if (exc.outlasts or 0) > policy.deadline:  # a limit that resets in an hour: fail fast, every row saying so
            self._give_up_all(lambda: _not_sent(exc, f"and its {exc.limit} limit resets only after the retry deadline"))
            return False
        if limiter.quiet_for() > policy.deadline:
            quiet = limiter.quiet_for()
            self._give_up_all(lambda: _not_sent(
                exc, f"and nothing in the batch was answered for {quiet:.0f} s (the retry deadline)"))
        count, since, answers = self.limited.get(index, (0, now, self.answers))
        if answers != self.answers:  # the batch moved on since this row's last 429: the pace is working
            count, since = 0, now
        count += 1
        self.limited[index] = (count, since, self.answers)
        if count >= policy.attempts or now - since > policy.deadline:
            exc.gave_up_after(count)
            return False
        self.todo.appendleft(index)
        self.cond.notify_all()
        return True

    def _give_up_all(self, error: Callable[[], DbMagicError]) -> None:
        """Every row still waiting fails unsent, each with its own ``error()`` (holding the lock): a
        429 storm, a rate limit that outlasts the deadline, a token refused mid-batch."""
        while self.todo:
            index = self.todo.popleft()
            self.items[index] = error()
            self.remaining -= 1
            self.done += 1
            self.failed += 1
        self.cond.notify_all()


def _not_sent(exc: RateLimited, why: str) -> RateLimited:
    return RateLimited(f"Not sent: {exc.what}, {why}", target=exc.target, status=exc.status,
                       error_code=exc.error_code, server_message=exc.server_message, retry_after=exc.retry_after)


RESUME_HINT = ("OAuth and notebook tokens last about an hour. Sign in again (or take a fresh token), then resume: "
               "dbmagic.batch(..., resume=result) (after %%dbllm --over, the result is _dbllm), or for Spark "
               "dbmagic.spark.complete(result_df, ..., resume=True): only the rows without an answer are sent.")


def _token_refused(exc: AuthenticationError, midway: bool, sent: bool = True) -> AuthenticationError:
    """A 401 in a batch: no request after it is sent. ``midway`` (rows were answered before it):
    the token expired or was revoked while the batch ran, and the error says how to resume. The
    row that met it keeps the server's answer; the rows after it (``sent=False``) say they were
    not sent."""
    what = exc.what if sent else f"Not sent: the token was refused ({exc.target})"
    if midway:
        what += "; the token expired or was revoked during the batch"
    return AuthenticationError(what, target=exc.target, status=exc.status if sent else None,
                               error_code=exc.error_code if sent else None,
                               server_message=exc.server_message if sent else None,
                               request_id=exc.request_id if sent else None,
                               next_step=RESUME_HINT if midway else exc.next_step)


def _bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety: the batch runs without it
        return None
    return tqdm(total=total, unit="row", desc="dbmagic.batch", leave=True)


def _show(bar: Any, rows: _Rows) -> None:
    bar.n = rows.done
    rate = rows.limiter.rate
    bar.set_postfix(failed=rows.failed, **({"pace": f"{rate:.1f}/s"} if rate is not None else {}), refresh=False)
    bar.refresh()
