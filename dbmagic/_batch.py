"""Prompts over data: one template, many rows, the shared client, at the endpoint's own pace.

>>> import dbmagic
>>> answers = dbmagic.batch("Classify the ticket: {{ text }}", df, endpoint="databricks-meta-llama-3-3-70b-instruct")
>>> answers[["text", "answer", "error"]]

``rows`` is a list of strings (each is ``{{ row }}``), a list of dicts, or a pandas DataFrame (each
row's columns fill the template). Answers come back in input order: for a DataFrame, a copy with an
answer column and an error column; otherwise a `BatchResult`.

- Concurrency adapts to the endpoint: it starts at ``concurrency``, halves on a 429 (the whole
  batch then waits for ``Retry-After``, or a backoff), and grows back by one after a run of
  successes, never above ``concurrency``. A rate limit slows the batch down; it does not fail rows.
  Other failures are retried per row by the client's retry policy, with its timeouts.
- A 429 is retried per row up to the client's ``attempts`` and ``deadline``; when nothing in the
  batch has been answered for that deadline, the rows not yet sent fail with the rate-limit error.
- A row whose template value is missing (None, NaN, ``pd.NA``) gets no call, a null answer and an
  error naming the column, as ``ai_query`` does; ``send_missing=True`` sends it anyway.
- Nothing is lost: a row that fails keeps its place and its error (the batch does not raise);
  Ctrl-C stops sending and returns what finished; ``resume=`` the previous result sends only the
  rows that are missing or failed.
- A progress bar shows done and failed rows, rows per second and the current concurrency
  (``progress=False`` hides it).

In a notebook: ``%%dbllm -e ENDPOINT --over df [--column answer] [-o result]``.
"""

from __future__ import annotations

import contextvars
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import tracing
from .errors import ConfigurationError, DbMagicError, MissingValue, RateLimited, TemplateError
from .templating import Template

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .client import CallOptions, Client, Completion

__all__ = ["batch", "BatchResult"]

_JINJA_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop"})


class BatchResult(list):
    """One entry per input row, in input order: the row's `Completion`, the `DbMagicError` it
    failed with, or None for a row that was not sent (the batch was interrupted).

    ``texts``, ``values`` and ``errors`` are per row; ``failed`` and ``missing`` are row indices;
    ``usage`` sums the token counts; ``wall_time`` is in seconds. `to_pandas` gives a DataFrame.
    """

    def __init__(self, items: Iterable[Any], *, rows: Sequence[Any], wall_time: float = 0.0,
                 interrupted: bool = False, concurrency: int = 0):
        super().__init__(items)
        self.rows = list(rows)
        self.wall_time = wall_time
        self.interrupted = interrupted
        self.concurrency = concurrency

    @property
    def texts(self) -> list[str | None]:
        return [item.text if _answered(item) else None for item in self]

    @property
    def values(self) -> list[Any]:
        return [item.value if _answered(item) else None for item in self]

    @property
    def errors(self) -> list[str | None]:
        return [str(item) if isinstance(item, Exception) else None for item in self]

    @property
    def failed(self) -> list[int]:
        return [i for i, item in enumerate(self) if isinstance(item, Exception)]

    @property
    def missing(self) -> list[int]:
        return [i for i, item in enumerate(self) if item is None]

    @property
    def usage(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for item in self:
            if _answered(item):
                for key, value in (item.usage or {}).items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        total[key] = total.get(key, 0) + value
        return total

    def summary(self) -> str:
        """One line: rows, time, rate, answered / failed / not sent, tokens."""
        answered = len(self) - len(self.failed) - len(self.missing)
        rate = answered / self.wall_time if self.wall_time > 0 else 0.0
        parts = [f"{len(self)} rows in {self.wall_time:.1f} s ({rate:.1f} rows/s): {answered} answered",
                 f"{len(self.failed)} failed"]
        if self.missing:
            parts.append(f"{len(self.missing)} not sent{' (interrupted)' if self.interrupted else ''}")
        usage = self.usage
        if usage:
            parts.append(" / ".join(f"{v:,} {k.split('_')[0]}" for k, v in usage.items()) + " tokens")
        return ", ".join(parts) + "."

    def to_pandas(self, column: str = "answer", error_column: str = "error") -> Any:
        """The rows (their columns, or ``row``) with the answer and error columns."""
        pd = _pandas()

        frame = pd.DataFrame([row if isinstance(row, Mapping) else {"row": row} for row in self.rows])
        frame[column] = self.values
        frame[error_column] = self.errors
        return frame

    def __repr__(self) -> str:
        return f"BatchResult({self.summary()})"


def _answered(item: Any) -> bool:
    return item is not None and not isinstance(item, Exception)


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
    namespace: Mapping[str, Any] | None = None,
    client: Client | None = None,
    transform_output: Callable[[Any], Any] | None = None,
    timeout: float | None = None,
    **options: Unpack[CallOptions],
) -> Any:
    """Send ``template`` filled from each of ``rows``; see the module docstring.

    ``namespace`` adds variables every row can use (a row's own values win); ``client`` defaults
    to the kernel's shared one; the other options are those of `Client.complete`. ``column`` and
    ``error_column`` must not be columns of ``rows`` already. A row whose template value is missing
    (None, NaN, ``pd.NA``) is not sent: its answer is null and its error names the column, unless
    ``send_missing=True`` sends it as the template renders it.
    """
    result = run(template, rows, endpoint, concurrency=concurrency, resume=resume, progress=progress,
                 namespace=namespace, client=client, transform_output=transform_output, timeout=timeout,
                 column=column, error_column=error_column, send_missing=send_missing, **options)
    return with_answers(rows, result, column, error_column) if _is_frame(rows) else result


def with_answers(frame: Any, result: BatchResult, column: str = "answer", error_column: str = "error") -> Any:
    """A copy of ``frame`` with the batch's answer and error columns."""
    out = frame.copy()
    out[column] = result.values
    out[error_column] = result.errors
    return out


def run(template: str | Template, rows: Any, endpoint: str | None = None, *, concurrency: int = 8, resume: Any = None,
        progress: bool = True, namespace: Mapping[str, Any] | None = None, client: Client | None = None,
        transform_output: Callable[[Any], Any] | None = None, timeout: float | None = None,
        column: str = "answer", error_column: str = "error", send_missing: bool = False,
        **options: Any) -> BatchResult:
    """`batch`, always returning the `BatchResult` (what ``%%dbllm --over`` keeps in ``_dbllm``)."""
    from . import settings
    from .client import get_client, refuse_unknown_options

    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be a whole number of at least 1; got {concurrency!r}.")
    refuse_unknown_options(options, "dbmagic.batch")
    client = client or get_client()
    namespace = dict(namespace or {})
    contexts, columns, originals = _contexts(rows)
    tpl = template if isinstance(template, Template) else Template(template)
    if columns is not None:
        _refuse_collisions(columns, column, error_column)
        unknown = sorted(tpl.names - set(columns) - set(namespace) - _JINJA_GLOBALS)
        if unknown:
            raise TemplateError(
                f"The template uses {', '.join(unknown)}, which is not a column of the DataFrame "
                f"(its columns: {', '.join(map(str, columns)) or 'none'}) nor a variable given to the batch. "
                "Rename the {{ }} names, or add the columns."
            )
    items: list[Any] = [None] * len(contexts)
    if resume is not None:
        items = _resumed(resume, len(contexts), column, error_column)
    todo = [i for i, item in enumerate(items) if not _answered(item)]
    if not send_missing:  # as ai_query: a row with a missing value gets no call, a null answer and an error
        skipped = set()
        for i in todo:
            empty = sorted(name for name in tpl.names & contexts[i].keys() if is_missing(contexts[i][name]))
            if empty:
                items[i] = MissingValue(
                    f"Row {i} was not sent: its {', '.join(map(repr, empty))} {'is' if len(empty) == 1 else 'are'} "
                    "missing (None, NaN or NA). Fill the value, or pass send_missing=True (--send-missing) to "
                    "send the row as the template renders it.")
                skipped.add(i)
        todo = [i for i in todo if i not in skipped]
    if timeout is not None:
        timeout = settings.coerce("timeout", timeout)
    policy = replace(client.transport.retry, retry_rate_limited=False)
    client.transport.ensure_pool(concurrency)
    prepare_options = dict(options)

    def send(i: int) -> Completion:
        values = {**namespace, **contexts[i]}
        prompt = tpl.render(values, where=f"in row {i} (its values: {', '.join(map(str, contexts[i])) or 'none'})")
        prepared = client.prepare(prompt.strip(), endpoint, **prepare_options)
        return client.send(prepared, transform_output=transform_output, timeout=timeout, retry=policy)

    started = time.perf_counter()
    pace = _Pace(concurrency, todo, policy)
    with tracing.batch_span(tpl.source, len(todo), endpoint) as span:
        interrupted = pace.run(send, items, progress=progress)
        if span is not None:
            span.set_outputs({"answered": len(todo) - sum(1 for i in todo if not _answered(items[i])),
                              "failed": sum(1 for i in todo if isinstance(items[i], Exception)),
                              "interrupted": interrupted})
    return BatchResult(items, rows=originals, wall_time=time.perf_counter() - started, interrupted=interrupted,
                       concurrency=pace.limit)


def is_missing(value: Any) -> bool:
    """None, NaN, and pandas' and NumPy's missing values (``pd.NA``, ``NaT``): what a row lacks."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    kind = type(value).__name__
    return kind in ("NAType", "NaTType") or (kind in ("datetime64", "timedelta64") and str(value) == "NaT")


def _refuse_collisions(columns: list[Any], column: str, error_column: str,
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


def _is_frame(rows: Any) -> bool:
    return hasattr(rows, "columns") and hasattr(rows, "to_dict") and hasattr(rows, "copy")


def _contexts(rows: Any) -> tuple[list[dict[str, Any]], list[Any] | None, list[Any]]:
    """The values each row fills the template with, the DataFrame's columns (None otherwise), and
    the rows as given (what the result keeps)."""
    if _is_frame(rows):
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
    elif _is_frame(previous) and column in previous.columns:
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


class _Kept:
    """An answer kept from a resumed DataFrame (only its value is known)."""

    def __init__(self, value: Any):
        self.value = value
        self.text = value if isinstance(value, str) else str(value)
        self.usage: dict[str, Any] = {}


class _Pace:
    """Sends rows from ``todo`` with at most ``limit`` in flight: additive increase (one more after
    ``limit`` successes in a row), multiplicative decrease (halved on a 429, once per window), and
    a pause of the whole batch for the 429's ``Retry-After`` (else a growing backoff)."""

    def __init__(self, cap: int, todo: list[int], policy: Any):
        self.cap = self.limit = min(cap, max(len(todo), 1))
        self.todo = deque(todo)
        self.policy = policy
        self.in_flight = 0
        self.remaining = len(todo)
        self.successes = 0
        self.failed = 0
        self.done = 0
        self.epoch = 0  # a decrease only counts once per window of requests started at one limit
        self.backoffs = 0  # decreases since the last success: how long a pause without Retry-After is
        self.pause_until = 0.0
        self.first_try: dict[int, float] = {}
        self.tries: dict[int, int] = {}  # requests sent per row: the policy's attempts hold per row
        self.last_answer = time.monotonic()  # a 429 storm ends the batch once nothing answered for a deadline
        self.items: list[Any] = []
        self.stopped = False
        self.fatal: BaseException | None = None  # what stopped the batch from within (SystemExit ...)
        self.cond = threading.Condition()

    def run(self, send: Callable[[int], Any], items: list[Any], *, progress: bool) -> bool:
        """Send every row, storing outcomes in ``items``; True when interrupted (Ctrl-C)."""
        self.items = items
        bar = _bar(self.remaining) if progress and self.remaining else None
        # each worker runs in a copy of this thread's context, so a trace's batch span is its rows' parent
        workers = [threading.Thread(target=contextvars.copy_context().run, args=(self._work, send, items),
                                    name=f"dbmagic-batch-{i}", daemon=True) for i in range(self.cap)]
        for worker in workers:
            worker.start()
        try:
            with self.cond:
                while self.remaining and not self.stopped and any(w.is_alive() for w in workers):
                    self.cond.wait(0.1)
                    if bar is not None:
                        _show(bar, self)
        except KeyboardInterrupt:
            with self.cond:
                self.stopped = True  # in-flight answers are dropped; nothing more is sent
                self.cond.notify_all()
            return True
        finally:
            if bar is not None:
                _show(bar, self)
                bar.close()
        if self.fatal is not None:
            raise self.fatal
        return False

    def _work(self, send: Callable[[int], Any], items: list[Any]) -> None:
        while True:
            with self.cond:
                index = self._next()
                if index is None:
                    return
                epoch = self.epoch
            try:
                outcome: Any = send(index)
            except RateLimited as exc:
                if self._wait_again(index, exc, epoch):
                    continue
                outcome = exc
            except DbMagicError as exc:
                outcome = exc
            except Exception as exc:  # a bug of ours or a library's: the row keeps it, the batch goes on
                outcome = DbMagicError(f"Unexpected {exc.__class__.__name__}: {exc}")
            except BaseException as exc:  # SystemExit from a transform: it stops the whole batch
                with self.cond:
                    self.fatal, self.stopped = exc, True
                    self.cond.notify_all()
                return
            with self.cond:
                self.in_flight -= 1
                if self.stopped:
                    return
                items[index] = outcome
                self.remaining -= 1
                self.done += 1
                if isinstance(outcome, Exception):
                    self.failed += 1
                else:
                    self.backoffs = 0  # decreases since the last success: how long a pause without Retry-After is
                    self.last_answer = time.monotonic()
                    self.successes += 1
                    if self.successes >= self.limit and self.limit < self.cap:
                        self.limit += 1
                        self.successes = 0
                self.cond.notify_all()

    def _next(self) -> int | None:
        """The next row to send, once the limit and any pause allow (called holding the lock)."""
        while not self.stopped and self.todo:
            wait = self.pause_until - time.monotonic()
            if wait > 0:
                self.cond.wait(wait)
            elif self.in_flight >= self.limit:
                self.cond.wait(0.5)
            else:
                self.in_flight += 1
                index = self.todo.popleft()
                self.first_try.setdefault(index, time.monotonic())
                self.tries[index] = self.tries.get(index, 0) + 1
                return index
        return None

    def _wait_again(self, index: int, exc: RateLimited, epoch: int) -> bool:
        """A 429: slow the batch down and put the row back first in line; False when the row's
        attempts or time are up (it then fails with the 429, as any call past its retry policy). When
        nothing has answered for the policy's deadline, the rows not yet sent fail with it too."""
        with self.cond:
            if self.stopped:
                self.in_flight -= 1
                return True
            now = time.monotonic()
            if epoch == self.epoch:  # the first 429 of requests sent at this limit: one decrease
                self.limit = max(1, self.limit // 2)
                self.successes = 0
                self.epoch += 1
                self.backoffs += 1
            if exc.retry_after is not None and math.isfinite(exc.retry_after) and exc.retry_after >= 0:
                wait = min(exc.retry_after, self.policy.max_retry_after)
            else:  # grows with each decrease, not with each of the requests that were in flight together
                wait = min(self.policy.backoff * 2 ** (self.backoffs - 1), self.policy.max_backoff)
                wait *= 0.5 + random.random() / 2
            if now - self.last_answer > self.policy.deadline:
                self._give_up_all(exc, now - self.last_answer)
            if self.tries[index] >= self.policy.attempts or now + wait - self.first_try[index] > self.policy.deadline:
                exc.gave_up_after(self.tries[index])
                return False
            self.in_flight -= 1
            self.pause_until = max(self.pause_until, now + wait)
            self.todo.appendleft(index)
            self.cond.notify_all()
            return True

    def _give_up_all(self, exc: RateLimited, quiet: float) -> None:
        """A 429 storm: every row still waiting fails with the rate-limit error, unsent (holding the lock)."""
        while self.todo:
            index = self.todo.popleft()
            self.items[index] = RateLimited(
                f"Not sent: {exc.what}, and nothing in the batch was answered for {quiet:.0f} s (the retry deadline)",
                target=exc.target, status=exc.status, error_code=exc.error_code,
                server_message=exc.server_message, retry_after=exc.retry_after)
            self.remaining -= 1
            self.done += 1
            self.failed += 1
        self.cond.notify_all()


def _bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety: the batch runs without it
        return None
    return tqdm(total=total, unit="row", desc="dbmagic.batch", leave=True)


def _show(bar: Any, pace: _Pace) -> None:
    bar.n = pace.done
    bar.set_postfix(failed=pace.failed, concurrency=pace.limit, refresh=False)
    bar.refresh()


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ConfigurationError("to_pandas() needs pandas: pip install pandas.") from None
    return pandas
