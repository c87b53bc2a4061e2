"""Prompts over data: one template, many rows, the shared client, at the endpoint's own pace.

>>> import dbmagic
>>> answers = dbmagic.batch("Classify the ticket: {{ text }}", df, endpoint="databricks-meta-llama-3-3-70b-instruct")
>>> answers[["text", "answer", "error"]]

``rows`` is a list of strings (each is ``{{ row }}``), a list of dicts, or a pandas DataFrame (each
row's columns fill the template). Answers come back in input order: for a DataFrame, a copy with an
answer column and an error column; otherwise a `BatchResult`.

- At most ``concurrency`` requests are in flight, paced at the endpoint's own rate
  (`dbmagic.batching.pace`): a 429 with ``Retry-After`` pauses the whole batch until then; one without it
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
  answers already on their way that come within its ``grace`` (2 s by default) (they were paid for; a second
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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..call import wire as _wire
from ..call.answers import Usage
from ..call.call import completion_of
from ..call.ledger import CACHE_MODE, Ledger, identity
from ..call.ledger import cache as cache_store
from ..errors import ConfigurationError, DbMagicError, MissingValue, SchemaError, StatusError, TemplateError
from ..observe import tracing
from ..prompts.attachments import Parts
from ..prompts.namespace import Notebook
from ..prompts.templating import JINJA_GLOBALS, Template
from ..prompts.transforms import apply_output
from . import pace as _pace
from . import packs
from .budget import RESERVED_OUTPUT, budget_of, tokens_in
from .columns import Answers, Digests, RowValues
from .pace import Limiter
from .result import BatchResult, answer_columns, answered, is_frame, is_missing, with_answers
from .rows import GRACE, Reused, Rows, progress_bar

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..call.model import CallOptions
    from ..client import Client

__all__ = ["batch", "run", "BatchResult", "BackgroundBatch", "answer_columns", "with_answers", "is_frame",
           "row_contexts", "is_missing", "refuse_collisions", "refuse_field_collisions", "estimate", "missing_in",
           "tokens_in"]


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
    rows_per_request: int | None = None,
    grace: float = GRACE,
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
    foreground run returns). ``rows_per_request``: where the endpoint takes many inputs a request
    (embeddings, custom models), at most this many rows go in one request (default 100, and under
    4 MB; 1 sends each row on its own); see `dbmagic.batching.packs`.
    """
    def go(handle: BackgroundBatch | None = None, bar: Any = None) -> Any:
        result = run(template, rows, endpoint, concurrency=concurrency, resume=resume, progress=progress,
                     checkpoint=checkpoint, shared_checkpoint=shared_checkpoint, max_tokens_total=max_tokens_total,
                     max_cost=max_cost, namespace=namespace, client=client, transform_output=transform_output,
                     timeout=timeout, column=column, error_column=error_column, send_missing=send_missing,
                     handle=handle, bar=bar, grace=grace, rows_per_request=rows_per_request, **options)
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
    the same endpoint, in the background or not, share its pace (`dbmagic.batching.pace.shared`)."""

    def __init__(self, go: Callable[..., Any], *, total: int, progress: bool):
        self._rows: Rows | None = None
        self._outcome: Any = None
        self._error: BaseException | None = None
        self.batch_result: BatchResult | None = None
        self._done = threading.Event()
        self._cancel = False
        bar = progress_bar(total) if progress and total else None  # made here: it shows in the cell that started it
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

    def _attach(self, rows: Rows) -> None:
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
        """Send nothing more; the answers already on their way are kept if they come within its ``grace``."""
        self._cancel = True
        if self._rows is not None:
            self._rows.cancel()

    def progress(self) -> str:
        rows = self._rows
        if self.done and self.batch_result is not None:
            return self.batch_result.summary()
        if rows is None:
            return "starting"
        return f"running: {rows.done} done, {rows.failed} failed, {rows.rows - rows.done} to go"

    def __repr__(self) -> str:
        return f"BackgroundBatch({self.progress()})"


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
        shared_checkpoint: bool = False, grace: float = GRACE, rows_per_request: int | None = None,
        tasks: int = 1, **options: Any) -> BatchResult:
    """`batch`, always returning the `BatchResult` (what ``%%dbllm --over`` keeps in ``_dbllm``).
    ``signed_in``: the token was accepted before this batch (a Spark task's, by the driver), so a
    401 means that it expired or was revoked since. ``tasks``: how many batches like this one run
    at once on the endpoint elsewhere too (a Spark job's tasks): the pace grows by its share, and a
    row waits ``tasks`` times as many 429s for an answer before it fails."""
    from .. import settings
    from ..call.schema import schema_of
    from ..client import Completion, get_client, refuse_unknown_options

    if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
        raise ConfigurationError(f"concurrency must be a whole number of at least 1; got {concurrency!r}.")
    if max_tokens_total is not None:
        max_tokens_total = settings.coerce("max_tokens_total", max_tokens_total)
    if max_cost is not None:
        max_cost = settings.coerce("max_cost", max_cost)
    if rows_per_request is not None:
        rows_per_request = settings.coerce("rows_per_request", rows_per_request)
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
    items: Any = Answers(len(contexts))  # each row's outcome, kept as columns
    if timeout is not None:
        timeout = settings.coerce("timeout", timeout)
    ledger = Ledger(checkpoint, shared=shared_checkpoint) if checkpoint is not None else None
    signer = client.signer() if ledger is not None else None
    prepare = client.preparer(endpoint, **options)  # options checked, the endpoint looked up: once
    built: dict[int, Any] = {}  # row -> its PreparedRequest (or the error that kept it from being built)
    identities = Digests(len(contexts))

    def build(i: int, values: dict[str, Any]) -> Any:
        prompt = tpl.render(namespace.with_row(values), where=f"in row {i} (its values: "
                                                          f"{', '.join(map(str, values)) or 'none'})")
        return prepare(prompt.strip() if isinstance(prompt, (str, Parts)) else prompt)

    attached = [0]  # images and files in the rows' requests (each row counted once)

    def request_of(i: int) -> Any:
        if i not in built:
            try:
                built[i] = build(i, contexts[i])
                if identities[i] is None:
                    attached[0] += _wire.attachments_in(built[i].body)
                identities[i] = identity(built[i].url, built[i].body)
            except DbMagicError as exc:  # the row keeps the error, as a row whose call failed
                built[i] = exc
        return built[i]

    if resume is not None:
        items = Answers.of(_resumed(resume, len(contexts), column, error_column))
        old = getattr(resume, "identities", None)
        if old is not None and len(old) == len(items):  # an answer to another request is not this row's
            for i, item in enumerate(items):
                if answered(item) and old[i] is not None:
                    request_of(i)  # builds the row's request, and so its identity
                    if identities[i] != old[i]:
                        items[i] = None
    todo = [i for i in range(len(items)) if not items.whole(i)]
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
            if _wire.attachments_in(request.body):  # made again when sent: a batch never holds every row's images
                built.pop(i, None)
        todo = sending
    # rows packed per request where the endpoint takes many: a pack's place follows the rows' in items
    rows_count = len(items)
    members: dict[int, list[int]] = {}  # a pack's index -> its rows
    first = next((request_of(i) for i in todo if not isinstance(request_of(i), DbMagicError)), None)
    size = packs.size_for(rows_per_request, first)

    def place(unit: list[int]) -> int:
        """Where the workers find ``unit``: a row's own place, or a new one after the rows for a pack."""
        if len(unit) == 1:
            return unit[0]
        members[len(items)] = unit
        items.append(None)
        return len(items) - 1

    # what the workers take: rows, and packs of rows
    sends = [place(unit) for unit in packs.plan(todo, request_of, size)] if size > 1 else list(todo)
    # a budget (checked before anything is sent), priced by the first row's model
    budget = (budget_of(max_tokens_total, max_cost, getattr(request_of(todo[0]), "llm", None))
              if todo and (max_tokens_total or max_cost) else None)
    worst: dict[int, tuple[float, int]] = {}  # row -> (its worst cost, its input tokens estimated)

    def worst_of(i: int) -> tuple[float, int]:
        if i in members:  # a pack: its rows' together
            parts = [worst_of(r) for r in members[i]]
            return sum(p[0] for p in parts), sum(p[1] for p in parts)
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
    if tasks > 1:  # the 429s between two answers of this batch are its share of every task's
        policy = replace(policy, attempts=policy.attempts * tasks)
    client.ensure_pool(concurrency)

    batch: dict[str, Any] = {}  # with tracing on: the batch's id, which tags each row's trace

    store = cache_store()  # the kernel's cache: a pack asks it for each row, and keeps each row's answer
    from_ledger = [0]  # rows of packs a checkpoint answered (another batch's, while this one waited)
    kept: dict[int, Any] = {}  # rows of packs the checkpoint or the cache answered: never sent, whatever the pack meets
    seen_output: deque[int] = deque(maxlen=256)  # output tokens the last answers reported, for a request's estimate

    def call_pack(k: int) -> Any:
        rows = members[k]
        sending: list[tuple[int, Any]] = []
        checkpointed = 0  # rows the checkpoint answered
        for r in rows:
            request = request_of(r)
            if r in kept:  # answered by the checkpoint or the cache at an earlier try of this pack
                continue
            record = ledger.turn(identities[r], request.url, signer, rows_run.stop) if ledger is not None else None
            checkpointed += record is not None
            if record is None and store is not None:
                record = store.lookup(request, client.signer(), CACHE_MODE.get())
            if record is None:
                sending.append((r, request))
            else:  # kept in the row's place, whatever the request for the others meets
                items[r] = kept[r] = completion_of(record, request, transform_output)
        tags = {**batch, "row": rows[0]} if batch else None
        if not sending:  # nothing to send: counted as reused when the checkpoint answered every row
            pack = packs.Pack(None, lambda completion: {})
            pack.reused = checkpointed == len(rows)
            if not pack.reused:
                from_ledger[0] += checkpointed
            return pack
        from_ledger[0] += checkpointed
        if len(sending) == 1:  # the one row left: its own request, as an unpacked row
            (r, request), = sending
            c = client.call(request, transform_output=transform_output, timeout=timeout, retry=policy, tags=tags)
            return packs.Pack(c, lambda completion: {r: completion})
        sent_rows, requests = [r for r, _ in sending], [q for _, q in sending]

        def read(completion: Any) -> dict[int, Any]:
            answers = packs.split_answer(completion, sent_rows, requests, transform_output, apply_output)
            if store is not None:
                for r, request in sending:
                    if isinstance(answers[r], Completion) and answers[r].error is None:
                        store.record(request, answers[r], client.signer(), CACHE_MODE.get())
            return answers

        c = client.call(packs.packed_request(requests), timeout=timeout, retry=policy, tags=tags, use_cache=False)
        return packs.Pack(c, read)

    def call(i: int) -> Any:
        if i in members:
            return call_pack(i)
        request = request_of(i)
        if isinstance(request, DbMagicError):
            raise request
        if ledger is not None:  # another batch on this checkpoint may be sending it: its answer is waited for
            record = ledger.turn(identities[i], request.url, signer, rows_run.stop)
            if record is not None:
                return Reused(completion_of(record, request, transform_output))
        return client.call(request, transform_output=transform_output, timeout=timeout, retry=policy,
                           tags={**batch, "row": i} if batch else None)

    def recorded(i: int, outcome: Any) -> None:  # each finished call, in the checkpoint as it finishes
        if i in members:  # a pack: each row's answer (or the request's error) under the row's own identity
            for r in members[i]:
                recorded(r, outcome.outcomes.get(r) if isinstance(outcome, packs.PackOutcome) else outcome)
            return
        answer = outcome.completion if isinstance(outcome, SchemaError) else outcome
        if isinstance(answer, Completion) and answer.usage.output:
            seen_output.append(answer.usage.output)
        if ledger is not None and identities[i] is not None and not getattr(answer, "cached", False) and (
                (isinstance(answer, Completion) and not answer.is_partial) or isinstance(answer, StatusError)):
            ledger.append(identities[i], built[i].url, answer, signer)
        built.pop(i, None)  # the row is done: its request is built again only if asked for (`BatchResult.request`)

    def cost(k: int, tokens: str) -> float:
        """The tokens send ``k`` is estimated to cost of a token limit: its input (4 characters a token),
        its output (its max_tokens, else the answers' mean so far, else RESERVED_OUTPUT), or both."""
        if k in members:
            return sum(cost(r, tokens) for r in members[k])
        request = request_of(k)
        body = request.body if not isinstance(request, DbMagicError) else {}
        given = body.get("max_tokens") if isinstance(body.get("max_tokens"), int) else None
        output = given or (sum(seen_output) / len(seen_output) if seen_output else RESERVED_OUTPUT)
        tokens_in_body = tokens_in(json.dumps(body, default=str))
        return {"input": tokens_in_body, "output": output}.get(tokens, tokens_in_body + output)

    def pack_size(k: int) -> int:
        return len(members[k]) if k in members else 1

    def label(k: int) -> str:
        rows = members.get(k)
        return f"Row {k}" if rows is None else f"Rows {', '.join(map(str, rows[:3]))}{', ...' if len(rows) > 3 else ''} " \
            f"(one request of {len(rows)} rows)"

    def split(k: int, outcome: Any) -> list[int] | None:  # a pack refused: each half sent again (holding the lock)
        halves = packs.splits(outcome, members[k]) if k in members else None
        return None if halves is None else [place(half) for half in halves]

    started = time.perf_counter()
    pace = _pace.shared((id(client), endpoint, options.get("cluster_id"), options.get("port")),
                        lambda: Limiter(min(concurrency, max(len(sends), 1)), policy, client.clock, rand=client.jitter,
                                        share=1.0 / max(tasks, 1)),
                        endpoint=first.url if first is not None else None)
    with pace as limiter, tracing.batch_span(tpl.source, len(todo), endpoint) as span:
        rows_run = Rows(concurrency, sends, items, policy, client.clock, signed_in=signed_in, on_outcome=recorded,
                        budget=budget, limiter=limiter, worst=worst_of, grace=grace, size=pack_size, label=label,
                        split=split, cost=cost)
        if handle is not None:
            handle._attach(rows_run)
        if span is not None:
            batch["batch"] = span.batch_id
        try:
            interrupted = rows_run.run(call, progress=progress, bar=bar)
        finally:
            if ledger is not None:
                ledger.close()
        for k, rows in members.items():  # each pack's answers in its rows' places (a split pack's are its halves')
            outcome = items[k]
            for r in rows:
                if isinstance(outcome, packs.PackOutcome):
                    items[r] = outcome.outcomes.get(r, items[r])
                elif outcome is not None and r not in kept:  # the request's error: the rows it carried
                    items[r] = outcome
        del items[rows_count:]
        for follower, leader in followers.items():  # the same request: the same answer, sent once
            items[follower] = items[leader]
        if span is not None:
            span.set_outputs({"answered": sum(1 for i in todo if items.whole(i)),
                              "failed": sum(1 for i in todo if items.error(i) is not None),
                              "interrupted": interrupted})
    reused += rows_run.reused + from_ledger[0]
    not_served = ledger.not_served({identities[i] for i in todo}) if ledger is not None else {}
    tracing.flush()  # the rows' traces are readable when the batch returns
    # what the result reads a row's values from once the batch is over (a DataFrame's rows when asked)
    given = originals if isinstance(originals, RowValues) else RowValues(originals)

    def sent(i: int) -> dict[str, Any] | None:
        """The body row ``i`` sent, built again from its row: given only when it is that very request."""
        if identities[i] is None:
            return None
        try:
            request = build(i, given[i])
        except DbMagicError:
            return None
        return request.body if identity(request.url, request.body) == identities[i] else None

    result = BatchResult(items, rows=originals, wall_time=time.perf_counter() - started, interrupted=interrupted,
                         concurrency=rows_run.limiter.cap, rate=rows_run.limiter.rate, schema=schema,
                         identities=identities, from_checkpoint=reused, not_served=not_served,
                         unreadable=ledger.skipped if ledger is not None else 0,
                         by_estimate=budget.by_estimate if budget is not None else 0, limiter=rows_run.limiter,
                         request=sent, source=rows if is_frame(rows) else None, attachments=attached[0])
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
    rendered prompts (the usual rule of thumb for English; the endpoint's own count decides), and an
    image about width x height / 750."""
    contexts, _, _ = row_contexts(rows)
    tpl = template if isinstance(template, Template) else Template(template)
    sent = held = tokens = 0
    for context in contexts:
        if not send_missing and missing_in(tpl, context):
            held += 1
            continue
        prompt = tpl.render(Notebook(namespace or {}).with_row(context))
        tokens += (prompt.tokens(tokens_in) if isinstance(prompt, Parts) else
                   tokens_in(prompt if isinstance(prompt, str) else json.dumps(prompt)))
        sent += 1
    return sent, held, tokens


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


def row_contexts(rows: Any) -> tuple[Sequence[dict[str, Any]], list[Any] | None, Sequence[Any]]:
    """The values each row fills the template with (`RowValues`: a dict a row, made when read), the
    DataFrame's columns (None otherwise), and the rows as the result keeps them (a list's values as
    given; a DataFrame's rows as dicts, read from it when asked)."""
    if is_frame(rows):
        names = [str(c) for c in rows.columns]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigurationError(
                f"The DataFrame has more than one column named {', '.join(map(repr, twice))}, and a row can fill "
                "a template with only one of them: rename them first (df.columns = [...])."
            )
        contexts = RowValues(rows, names)
        return contexts, list(rows.columns), contexts.slim()
    if hasattr(rows, "to_list"):  # a pandas Series: its values are rows
        rows = rows.to_list()
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise ConfigurationError(
            f"rows must be a list of strings or dicts, or a pandas DataFrame; got {type(rows).__name__}."
        )
    rows = list(rows)
    return RowValues(rows), None, rows


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


class _Kept:
    """An answer kept from a resumed DataFrame (only its value is known)."""

    def __init__(self, value: Any):
        self.value = value
        self.text = value if isinstance(value, str) else str(value)
        self.usage = Usage()
