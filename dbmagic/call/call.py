"""One call: its request sent, its answer read (whole or streamed), the round trips it goes on for
(a schema retry, tool results), and how it ended (a `Completion`, whole or partial).

Every front end's call is one `Call` (`Client.call` makes it). It is handed what it uses: the
transport, the credentials its request carries, the subscribers (`dbmagic.hooks`) and the kernel's
cache; it knows nothing of the `Client` that made it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

from ..errors import (
    AnswerCut,
    BadResponse,
    DbMagicError,
    RequestError,
    RequestTimeout,
    SchemaError,
    StreamInterrupted,
    StreamScrubber,
    parse_error_body,
    scrub,
    scrub_value,
)
from ..prompts.transforms import apply_output
from ..transport.apps import hint_for_app
from ..transport.credentials import Credentials
from ..transport.http import BodyTooLarge, Response, Transport
from ..transport.retry import RetryPolicy
from ..transport.secret import Secret
from . import answers, kinds, wire
from .answers import Usage
from .hooks import Hooks
from .ledger import CACHE_MODE, Cache, Signer
from .model import Completion, PreparedRequest, Step, Transform

__all__ = ["Call", "completion_of", "read_json", "read_answer", "server_text", "megabytes"]


class Call:
    """One call: iterate it for the answer's text as it arrives, or `wait` for the whole answer.

    It always ends in a `Completion` (``call.completion``), also when it does not end normally: a
    partial one has ``finish_reason`` ``cut`` (the connection or stream broke: the iteration raises
    `AnswerCut`/`StreamInterrupted`, whose ``.completion`` it is), ``stopped`` (`cancel` from any
    thread: the iteration ends quietly) or ``interrupted`` (Ctrl-C, or ``cancel("interrupted")``).
    A call that got no answer at all (an error status, no connection) raises, ``call.error`` is the
    error, and ``completion`` stays None. ``text`` is everything that arrived so far.

    A call may take more than one round trip: an answer that does not fit the ``schema`` is asked
    for again (``schema_retries``), and with ``run_tools`` the tools it asks for run and their
    results go back (at most ``max_steps`` requests). ``steps`` lists the round trips done,
    ``step`` counts them, ``sending`` is the request of the current one, and ``text`` is the
    current one's answer. An answer that never fits raises `SchemaError` (its Completion kept).

    Made by `Client.call` (and `Client.stream`, which is one already started), which hands it what
    it uses: the transport, the credentials its request carries, the subscribers and the cache.
    """

    def __init__(self, prepared: PreparedRequest, *, transport: Transport, credentials: Credentials,
                 hooks: Hooks, cache: Cache | None = None, signer: Callable[[], Signer] | None = None,
                 transform_output: Transform | None = None, timeout: float | None = None,
                 retry: RetryPolicy | None = None, tags: dict[str, Any] | None = None):
        self.prepared = prepared
        self.sending = prepared
        self.tags = tags or {}
        self._transport = transport
        self._credentials = credentials  # the workspace's, or the OAuth ones of an app's URL
        self._hooks = hooks
        self._cache = cache  # the kernel's cache (dbmagic.ledger.use_cache), or None
        self._signer = signer  # who keeps what in the cache: asked only when the cache is used
        self._secrets_of: tuple[Any, Sequence[Secret]] | None = None  # (the response, its secrets)
        self._cache_mode = CACHE_MODE.get()  # the cell's --cache, read in the thread that made the call
        self._parts: list[str] = []  # the answer's text so far, in pieces (joined when read: linear time)
        self._scrubber: StreamScrubber | None = None  # a streamed answer's pieces, secrets taken out
        self.secret_split = False  # a secret came split across streamed events (and was taken out)
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.response: Response | None = None
        self.cancelled = False
        self.steps: list[Step] = []
        self.step = 0
        self.round_usage = Usage()  # the usage of the last round trip alone
        self.tool_runs = 0  # tool calls run so far (at most the request's max_tool_runs)
        self.stopped_by: str | None = None  # the limit that left tool calls shown, not run (--max-steps N)
        self._transform_output = transform_output
        self._timeout = timeout
        self._deadline: float | None = None  # time.monotonic() by which the whole call ends (its timeout)
        self._retry = retry
        self._why = "stopped"
        self._started = 0.0
        self._ended = False
        self._first: float | None = None
        self._pieces: Iterator[str] | None = None
        self._answer: tuple[answers.Parsed, Any] | None = None
        self._retries_left = prepared.schema_retries

    @property
    def text(self) -> str:
        """Everything that arrived of the current round trip's answer so far (secrets taken out)."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self._parts = [value] if value else []

    def __repr__(self) -> str:
        state = ("cancelled" if self.cancelled else "answered" if self.completion is not None
                 else "failed" if self.error is not None else "open" if self.response is not None else "not sent")
        return f"Call({self.prepared.target}, {state}, {len(self.text)} characters)"

    # -- what a caller uses ------------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        if self._pieces is None:
            self._pieces = self._read()
        return self._pieces

    def __next__(self) -> str:
        return next(iter(self))

    def start(self) -> Call:
        """Send the request now and wait for the answer's headers (an error answer raises here)."""
        if self.response is None and not self._ended:
            try:
                if not self._from_cache():
                    self._open()
            except BaseException as exc:
                raise self._ended_by(exc)  # noqa: B904 (the same error, recorded: its own cause stays)
        return self

    def wait(self) -> Completion:
        """Read the answer to its end and return its `Completion` (partial when stopped or
        interrupted); raises what ended it otherwise (a cut answer's error carries ``.completion``)."""
        for _ in self:
            pass
        if self.completion is None or self.error is not None:  # it had failed already: the same error
            raise self.error if self.error is not None else RuntimeError("the call ended without an outcome")
        return self.completion

    def outcome(self) -> Completion | DbMagicError:
        """The call's end without raising a dbmagic error: its `Completion` (whole, or partial: a cut
        one with its ``error``), or the error that left it without an answer (a `SchemaError` keeps
        the answer in ``.completion``). What a front end keeps per call (compare's columns, a
        batch's rows). Ctrl-C still raises."""
        try:
            return self.wait()
        except AnswerCut as exc:
            return exc.completion if exc.completion is not None else exc
        except DbMagicError as exc:
            return exc

    def cancel(self, why: str = "stopped") -> None:
        """Stop from another thread (a Stop button; ``why="interrupted"`` for a Ctrl-C): the
        iteration ends quietly, ``completion`` is the partial answer (``finish_reason == why``). A
        read blocked on a silent stream wakes at once; a request still waiting for its answer's
        headers ends when they come (the answer is then dropped), and no retry is sent after it."""
        self._why = why
        self.cancelled = True
        if self.response is not None:
            self.response.body.abort()

    def close(self) -> None:
        """Stop reading (from the thread that iterates); ``text`` keeps what arrived."""
        if self._pieces is not None:
            self._pieces.close()
        if self.response is not None:
            self.response.body.close()
        if not self._ended:
            self._end(self.partial("stopped"))

    def partial(self, why: str, error: BaseException | None = None) -> Completion:
        """A `Completion` of what arrived, for an answer that did not end normally (``why``:
        ``cut``, ``stopped`` or ``interrupted``)."""
        rest = self._flush_scrubber()
        if rest:
            self._parts.append(rest)
        prepared = self.sending
        return Completion(text=self.text, value=self.text, endpoint=prepared.name or prepared.target,
                          kind=prepared.kind, latency=time.perf_counter() - self._started if self._started else 0.0,
                          request=prepared.body, finish_reason=why,
                          attempts=self.response.attempts if self.response is not None else 1,
                          time_to_first_token=self._first, error=error, steps=list(self.steps),
                          usage=self._usage_so_far(), where=prepared.where)

    # -- the one path ------------------------------------------------------------------------

    def _open(self) -> None:
        prepared = self.sending
        if not self._started:
            self._started = time.perf_counter()
            if self._timeout is not None:  # a deadline for the whole call: every try, wait and byte
                self._deadline = time.monotonic() + self._timeout
        try:
            response = self._transport.request(
                self._credentials, "POST", prepared.path, target=prepared.target, json=prepared.body,
                stream=prepared.stream, timeout=self._timeout, retry=self._retry, cancelled=lambda: self.cancelled,
                deadline=self._deadline)
        except RequestError as exc:
            if prepared.where != kinds.APP:
                raise
            hinted = hint_for_app(exc, prepared.name.removeprefix(kinds.APPS_PREFIX))
        else:
            self.response = response
            if self._hooks:
                self._hooks.fire("on_response", self, response)
            return
        raise hinted  # outside the handler: what an app's failure usually means, with the transport's error

    def _read(self) -> Iterator[str]:
        try:
            while True:
                if self.response is None and not self._ended:
                    if self.cancelled:  # stopped before it was sent
                        self._end(self.partial(self._why))
                        return
                    if self._from_cache():
                        break
                    self._open()
                if self._ended:
                    break
                self._answer = None
                streamed = self.sending.stream and "text/event-stream" in self.response.headers.get("Content-Type", "")
                yield from (self._events() if streamed else self._whole())
                if self._answer is None:  # cancelled
                    if not self._ended:
                        self._end(self.partial(self._why))
                    return
                completion, refused = self._completion(*self._answer)
                continuation = self._continuation(completion, refused)
                if continuation is None:
                    self._end(completion)
                    if refused is not None:
                        raise refused
                    return
                self._next_round_trip(*continuation)
            if self.completion is not None and self.completion.cached and not self.text and self.completion.text:
                yield self._piece(self.completion.text)  # an answer from the cache comes whole, once
        except GeneratorExit:  # the reader stopped early (close())
            if not self._ended:
                self._end(self.completion or self.partial("stopped"))
            raise
        except BaseException as exc:
            raise self._ended_by(exc)  # noqa: B904 (the same error, recorded: its own cause stays)
        finally:
            if self.response is not None:
                self.response.body.close()

    def _continuation(self, completion: Completion, refused: SchemaError | None) -> tuple[Any, ...] | None:
        """How the call goes on after this answer, ``(why, next body, completion, error)``, or None
        when this answer ends it."""
        sending, parsed = self.sending, self._answer[0] if self._answer else None
        reply = parsed.reply if parsed is not None and parsed.reply is not None else (
            {"role": "assistant", "content": completion.text} if sending.kind in (kinds.CHAT, kinds.CHAT_AGENT)
            else completion.text)
        if refused is not None:
            if self._retries_left <= 0:
                return None
            from .schema import retry_note

            note = retry_note(refused)
            body = wire.follow_up_request(sending.kind, sending.body, reply, [{"role": "user", "content": note}],
                                          sending.model)
            if body is None:  # a transform_input reshaped the body: there is no prompt to extend
                return None
            self._retries_left -= 1
            return "retry", body, completion, refused
        pending = completion.pending_tool_calls
        if not pending or not sending.run_tools or sending.tools is None:
            return None
        if self.step + 1 >= sending.max_steps:  # the last request allowed: the calls are shown, not run
            self.stopped_by = f"--max-steps {sending.max_steps}"
            return None
        if self.tool_runs + len(pending) > sending.max_tool_runs:  # however many an answer asks for
            self.stopped_by = f"--max-tool-runs {sending.max_tool_runs}"
            return None
        self.tool_runs += len(pending)
        for tool_call in pending:
            if self.cancelled:
                return None
            sending.tools.run(tool_call)
        body = wire.follow_up_request(sending.kind, sending.body, reply, wire.tool_results(sending.kind, pending),
                                      sending.model)
        return ("tools", body, completion, None) if body is not None else None

    def _next_round_trip(self, why: str, body: dict[str, Any], completion: Completion, error: SchemaError | None) -> None:
        """Record this round trip and make the next request the one to send."""
        step = Step(why, self.sending.body, completion, error, list(completion.pending_tool_calls
                                                                   if why != "tools" else completion.tool_calls),
                    self.round_usage)
        self.steps.append(step)
        if self.response is not None:
            self.response.body.close()
        if self.cancelled:  # stopped between two round trips: this answer is what arrived
            self._end(self.partial(self._why))
            return
        self.sending = replace(self.sending, body=body)
        self.response, self.text, self.step, self.round_usage = None, "", self.step + 1, Usage()
        if self._hooks:
            self._hooks.fire("on_step", self, step)

    def _ended_by(self, exc: BaseException) -> BaseException:
        """Record how an exception ended the call, and return what to raise."""
        if self._ended:
            if isinstance(exc, SchemaError):
                self.error = exc
            return exc
        if isinstance(exc, KeyboardInterrupt):
            self._end(self.partial("interrupted"))
            return exc
        if isinstance(exc, AnswerCut):
            exc.partial = self.text
            exc.completion = self.partial("cut", exc)
            self._end(exc.completion)
            return exc
        self.error = exc
        self._ended = True
        if self._hooks:
            self._hooks.fire("on_failed", self, exc)
        return exc

    def _end(self, completion: Completion) -> None:
        self.completion, self._ended = completion, True
        store = self._cache
        if store is not None and not completion.is_partial and completion.error is None and not self.steps:
            store.record(self.prepared, completion, self._signer(), self._cache_mode)
        if self._hooks:
            self._hooks.fire("on_done", self, completion)

    def _from_cache(self) -> bool:
        """With the kernel's cache on (`dbmagic.ledger.use_cache`), end the call with the answer it
        holds for this very request, sending nothing; False when it holds none."""
        store = self._cache
        if store is None or self.step:
            return False
        record = store.lookup(self.prepared, self._signer(), self._cache_mode)
        if record is None:
            return False
        found = completion_of(record, self.prepared, self._transform_output)
        if isinstance(found, SchemaError):  # an answer that did not fit when it came: it still does not
            self.completion = found.completion
            raise found
        self._end(found)
        return True

    def _piece(self, piece: str) -> str:
        if self._first is None:
            self._first = time.perf_counter() - self._started
        self._parts.append(piece)
        if self._hooks:
            self._hooks.fire("on_piece", self, piece)
        return piece

    def _secrets(self) -> Sequence[Secret]:
        """What this answer's text is scrubbed of: the credentials' secrets as this response was
        asked for (asked once a response: a retried 401 may have asked for a fresh token)."""
        response = self.response
        if self._secrets_of is None or self._secrets_of[0] is not response:
            self._secrets_of = (response, self._credentials.secrets())
        return self._secrets_of[1]

    def _usage_so_far(self, last: Usage | None = None) -> Usage:
        total = Usage()
        for step in self.steps:
            total += step.usage
        return total + last if last is not None else total

    def _whole(self) -> Iterator[str]:
        response, prepared = self.response, self.prepared
        try:
            content = response.body.read_all(prepared.max_answer_bytes, self._deadline)
        except TimeoutError:
            raise RequestTimeout(f"{prepared.target} sent no whole answer within the call's timeout of "
                                 f"{self._timeout:g} s", target=prepared.target) from None
        except BodyTooLarge:
            response.body.close()
            raise BadResponse(f"{prepared.target} sent an answer larger than {megabytes(prepared.max_answer_bytes)}, "
                              "so it was not read to its end", target=prepared.target,
                              next_step="Ask for a shorter answer (--max-tokens), or raise --max-answer-mb "
                                        "(max_answer_mb=).") from None
        except ConnectionError as exc:
            if self.cancelled:
                return
            raise AnswerCut(f"The answer from {prepared.target} was cut: {exc}; the request ran, so it was "
                            "not sent again", target=prepared.target) from None
        if self.cancelled:
            return
        secrets = self._secrets()
        # the answer is server text: a proxy or app that echoes headers must not put the token in the
        # cell, the ledger, a trace or a judge's input
        data = scrub_value(read_json(content, self.prepared.target, response.status, secrets), secrets)
        parsed = read_answer(self.sending, data, secrets)
        if parsed.text:
            yield self._piece(parsed.text)
        self._answer = parsed, data

    def _events(self) -> Iterator[str]:
        body = self.response.body
        secrets = self._secrets()
        scrubber = self._scrubber = StreamScrubber(secrets)
        decoder = answers.SSEDecoder()
        reader = answers.ChunkReader()
        usage = Usage()
        finish: str | None = None
        model: str | None = None
        last: Any = None  # the last event, kept as the completion's raw (its usage, finish reason, ids)
        done = False
        size, cap = 0, self.sending.max_answer_bytes
        while True:
            if self.cancelled:
                return
            try:
                chunk = body.read(65536, self._deadline)
            except TimeoutError:
                if done:
                    break
                raise self._cut(f"the call's timeout of {self._timeout:g} s passed") from None
            except ConnectionError as exc:
                if self.cancelled:
                    return
                if done:
                    break
                raise self._cut(f"the connection broke ({exc})") from None
            if done:  # read the body to its end so the connection goes back to the pool
                if not chunk:
                    break
                continue
            size += len(chunk)
            if size > cap:
                body.abort()
                raise self._cut(f"the answer passed --max-answer-mb ({megabytes(cap)})")
            events = list(decoder.feed(chunk)) if chunk else decoder.close()
            for event in events:
                if event.strip() == "[DONE]":
                    done = True
                    break
                try:
                    data = json.loads(event)
                except ValueError:
                    raise self._cut("an event that is not JSON") from None
                except RecursionError:
                    raise self._cut("an event nested too deeply") from None
                if not isinstance(data, dict):
                    raise self._cut("an event that is not a JSON object")
                if "error_code" in data or "error" in data or data.get("type") == "error":
                    code, message = parse_error_body(event, secrets)
                    raise self._cut(f"an error mid-stream: {message or code}")
                data = scrub_value(data, secrets)
                if self._hooks:
                    self._hooks.fire("on_event", self, data)
                piece, chunk_usage, chunk_finish = reader.read(data)
                last = data
                usage = chunk_usage or usage
                finish = chunk_finish or finish
                model = data.get("model") or model
                shown = scrubber.feed(piece) if piece else ""
                if shown:
                    yield self._piece(shown)
                    if self.cancelled:  # a Stop between two events of one read
                        return
            if not chunk:
                if self.cancelled:
                    return
                if not done and (decoder.truncated or finish is None):
                    raise self._cut("the connection closed before the end of the answer")
                break
        rest = self._flush_scrubber()
        if rest:
            yield self._piece(rest)
        kind = self.sending.kind
        calls = [answers.ToolCall.read(c.id, scrub(c.name, secrets), scrub(c.raw_arguments, secrets))
                 for c in reader.tool_calls()]  # their arguments came in pieces too
        reply = scrub_value(reader.reply(kind, self.text), secrets) if kind in kinds.CONVERSATIONAL else None
        choices = [scrub(c, secrets) for c in reader.choices(self.text)]
        self._answer = (answers.Parsed(self.text, self.text, usage, model, finish, calls, reply, choices), last)

    def _flush_scrubber(self) -> str:
        """What the stream scrubber held back (the stream ended, was cut or stopped), secrets masked."""
        scrubber, self._scrubber = self._scrubber, None
        if scrubber is None:
            return ""
        rest = scrubber.close()
        self.secret_split = self.secret_split or scrubber.hits > 0
        return rest

    def _completion(self, parsed: answers.Parsed, data: Any) -> tuple[Completion, SchemaError | None]:
        """This round trip's `Completion`, its value read by the schema (and ``transform_output``),
        and the `SchemaError` of an answer that does not fit."""
        secrets = self._secrets()
        prepared, response = self.sending, self.response
        self.round_usage = parsed.usage
        value, refused = parsed.value, None
        calls = parsed.tool_calls
        if prepared.schema is not None and not any(not c.ran for c in calls):
            try:
                value = prepared.schema.parse(parsed.text, target=prepared.target)
            except SchemaError as exc:  # its message quotes the answer: scrubbed as any server text
                exc.args, exc.problem = (scrub(str(exc), secrets),), scrub(exc.problem, secrets)
                value, refused = None, exc
                exc.attempts = len([s for s in self.steps if s.why == "retry"]) + 1
        if self._transform_output is not None and refused is None:
            value = apply_output(self._transform_output, value)
        latency = time.perf_counter() - self._started
        completion = Completion(
            text=value if isinstance(value, str) else parsed.text,
            value=value,
            endpoint=prepared.name or prepared.target,
            kind=prepared.kind,
            raw=data,
            usage=self._usage_so_far(parsed.usage),
            latency=latency,
            request=prepared.body,
            request_id=server_text(response.headers.get("x-request-id"), secrets),
            served_model=server_text(parsed.served_model or response.headers.get("served-model-name"), secrets),
            finish_reason=parsed.finish_reason,
            time_to_first_token=self._first if self._first is not None else latency,
            attempts=response.attempts,
            error=refused,
            tool_calls=list(calls),
            steps=list(self.steps),
            schema=prepared.schema,
            where=prepared.where,
            natural=parsed.value,
            choices=list(parsed.choices),
        )
        if refused is not None:
            refused.completion = completion
        return completion, refused

    def _cut(self, why: str) -> StreamInterrupted:
        rest = self._flush_scrubber()
        if rest:
            self._parts.append(rest)
        return StreamInterrupted(
            f"The stream from {self.prepared.target} was cut: {why}; {len(self.text)} characters arrived",
            partial=self.text,
            target=self.prepared.target,
        )


def read_answer(prepared: PreparedRequest, data: Any, secrets: Sequence[Secret] = ()) -> answers.Parsed:
    try:
        return answers.parse_response(prepared.kind, data)
    except answers.WireError as exc:  # it may quote the answer: scrubbed as any server text
        raise BadResponse(f"{prepared.target} sent {exc}", target=prepared.target, secrets=secrets) from None


def read_json(content: bytes, target: str, status: int | None = None, secrets: Sequence[Secret] = ()) -> Any:
    try:
        return json.loads(content)
    except RecursionError:
        raise BadResponse(f"{target} sent an answer nested too deeply to read", target=target, status=status,
                          secrets=secrets) from None
    except ValueError:  # scrubbed whole, then cut: no part of a secret survives the cut
        snippet = scrub(content.decode("utf-8", "replace"), secrets)[:200]
        raise BadResponse(f"{target} sent an answer that is not JSON: {snippet!r}", target=target,
                          status=status, secrets=secrets) from None


def server_text(value: Any, secrets: Sequence[Secret]) -> str | None:
    """A short field from the server (a request id, a model name), scrubbed and bounded."""
    return scrub(str(value), secrets)[:200] if value else None


def megabytes(size: int) -> str:
    return f"{size / (1 << 20):g} MB"


def completion_of(record: dict[str, Any], request: PreparedRequest, transform_output: Transform | None = None) -> Any:
    """A recorded answer (a ledger's record: a checkpoint's, the cache's) as the `Completion` of
    ``request`` (``cached``), read as a fresh one would be: by the request's schema, then
    ``transform_output``; a `SchemaError` for an answer that did not fit then either (it is not sent
    again)."""
    text = record.get("text") or ""
    value: Any = record["value"] if "value" in record else text
    calls = [answers.ToolCall.read(c.get("id"), c.get("name"), c.get("arguments"))
             for c in record.get("tool_calls") or () if isinstance(c, dict)]
    completion = Completion(text=text, value=value, endpoint=request.name or request.target, kind=request.kind,
                            usage=Usage(**{k: v for k, v in (record.get("usage") or {}).items()
                                           if k in Usage.__dataclass_fields__}),
                            latency=(record.get("latency_ms") or 0) / 1000, request=request.body,
                            request_id=record.get("request_id"), served_model=record.get("served_model"),
                            finish_reason=record.get("finish_reason"), schema=request.schema, where=request.where,
                            cached=True, tool_calls=calls, natural=value)
    if request.schema is not None and not calls:
        try:
            value = request.schema.parse(text, target=request.target)
        except SchemaError as exc:
            exc.completion = completion
            return exc
    if transform_output is not None:
        value = apply_output(transform_output, value)
    return replace(completion, value=value, text=value if isinstance(value, str) else text)
