"""The one HTTP path: timeouts, the handler seam, and the retries of `dbmagic.transport.retry`.

A `Transport` sends an `HttpRequest` through a *handler* (``handle_request(request) -> Response``,
as httpx's transports), which the `dbmagic.Client` chooses: `RequestsHandler` (one
``requests.Session``, `dbmagic.transport.requests_handler`) or an in-memory one for tests
(`dbmagic.testing.MemoryHandler`). Above the handler, and the same for both, it signs
the request, retries what cannot have run, re-authenticates once on a 401 and maps an error answer
to its `StatusError`. What comes back is dbmagic's own `Response` (status, headers, body, attempts,
elapsed), so nothing above this module knows of ``requests``.

`Transport.request` is the only loop that sleeps for a retry: its `RetryState` decides each wait,
and it sleeps through the injectable `Clock`, so tests never wait for real. Ctrl-C
(KeyboardInterrupt) is never caught: it stops a wait or a request at once. Each retry decision is
logged at DEBUG on the ``dbmagic`` logger (``logging.getLogger("dbmagic").setLevel("DEBUG")``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import (
    AnswerCut,
    ConnectionFailed,
    RateLimited,
    RequestError,
    RequestTimeout,
    StatusError,
    TransportError,
    error_from_response,
)
from . import MAX_TIMEOUT
from .credentials import Credentials
from .retry import Clock, RetryPolicy, RetryState, SystemClock, parse_retry_after, retry_reason

__all__ = ["Clock", "SystemClock", "Timeouts", "RetryPolicy", "Transport", "Body", "BodyTooLarge", "HttpRequest",
           "Response", "Handler", "TransportFailure", "ERROR_BODY_LIMIT", "read_all", "clean_interrupt",
           "parse_retry_after", "retry_reason"]

log = logging.getLogger("dbmagic")

@dataclass(frozen=True)
class Timeouts:
    """Seconds to open a connection, and to wait for the answer (or for each streamed chunk).

    Invocations may legitimately run about 300 s on Databricks, hence the long read default.
    """

    connect: float = 10.0
    read: float = 300.0

    def __post_init__(self) -> None:
        for name in ("connect", "read"):
            value = getattr(self, name)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and 0 < value <= MAX_TIMEOUT)
            if not ok:
                from ..errors import SettingError

                raise SettingError(f"Timeouts({name}=...) must be a number of seconds above 0 and at most "
                                   f"{MAX_TIMEOUT:g}; got {value!r}.")


# -- the handler seam ----------------------------------------------------------------------------

@dataclass(slots=True)
class HttpRequest:
    """One request as a handler sends it. ``sign()`` gives the headers that carry the credentials,
    asked for as the request is built (tokens expire), so that no frame above the handler holds the
    token. ``timeout`` is ``(connect, read)`` in seconds."""

    method: str
    url: str
    json: Any = None
    stream: bool = False
    timeout: tuple[float, float] = (10.0, 300.0)
    sign: Callable[[], Mapping[str, str]] = field(default=dict, repr=False)


ERROR_BODY_LIMIT = 1 << 20  # bytes of an error answer read (its message is shown cut anyway)


class BodyTooLarge(Exception):
    """A body longer than the limit it was read with (decompressed: a small gzip bomb is caught too)."""


class Body(Protocol):
    """A response body read as it arrives, decompressed. `read` gives the bytes available now (so
    an event is seen as soon as it is written), ``b""`` at the end, and raises ``ConnectionError``
    when the connection breaks; `read_all` the whole body (``ConnectionError`` when cut,
    `BodyTooLarge` past ``limit`` bytes). Both raise ``TimeoutError`` once ``deadline`` (a
    ``time.monotonic()`` instant) has passed, however the bytes trickle in. `abort` wakes a blocked
    `read` from another thread; `close` gives the connection back."""

    def read(self, size: int = 65536, deadline: float | None = None) -> bytes: ...
    def read_all(self, limit: int | None = None, deadline: float | None = None) -> bytes: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


def read_all(body: Body, limit: int | None = None, deadline: float | None = None) -> bytes:
    """Every byte of ``body`` (see `Body.read_all`), read piece by piece: the one loop both handlers use."""
    out: list[bytes] = []
    total = 0
    while True:
        chunk = body.read(65536, deadline)
        if not chunk:
            return b"".join(out)
        total += len(chunk)
        if limit is not None and total > limit:
            raise BodyTooLarge(total)
        out.append(chunk)


class Headers(dict):
    """Response headers, looked up without regard to case (``headers.get("content-type")``)."""

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()):
        pairs = items.items() if isinstance(items, Mapping) else items
        super().__init__((k.lower(), v) for k, v in pairs)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


@dataclass(slots=True)
class Response:
    """An answer: ``status``, ``headers`` (case-insensitive), ``body`` (a `Body`), how many
    ``attempts`` it took and the seconds ``elapsed`` until its headers came, waits included."""

    status: int
    headers: Mapping[str, str]
    body: Body
    attempts: int = 1
    elapsed: float = 0.0

    def content(self, limit: int | None = None, deadline: float | None = None) -> bytes:
        """The whole body, read and closed (`Body.read_all`: `BodyTooLarge` past ``limit`` bytes)."""
        try:
            return self.body.read_all(limit, deadline)
        finally:
            self.body.close()

    def error_text(self) -> bytes:
        """An error answer's body, at most `ERROR_BODY_LIMIT` bytes of it, read and closed."""
        out: list[bytes] = []
        total = 0
        try:
            while total < ERROR_BODY_LIMIT:
                chunk = self.body.read(65536)
                if not chunk:
                    break
                out.append(chunk)
                total += len(chunk)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.body.close()
        return b"".join(out)[:ERROR_BODY_LIMIT]


class TransportFailure(Exception):
    """What a handler raises when no answer came. ``kind``: ``connect`` (the connection was never
    made: safe to send again), ``tls``, ``dropped`` (after the request was sent), ``read_timeout``,
    or ``cut`` (the body ended before its length). ``detail`` names the cause, never a secret."""

    KINDS = ("connect", "connect_timeout", "tls", "dropped", "read_timeout", "cut")

    def __init__(self, kind: str, detail: str = ""):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}; got {kind!r}")
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail


class Handler(Protocol):
    """Sends one request, without retries: returns a `Response` (any status), or raises
    `TransportFailure` when no answer came. `RequestsHandler` is the real one."""

    def handle_request(self, request: HttpRequest) -> Response: ...
    def close(self) -> None: ...


class Transport:
    """Retries, timeouts, signing and error mapping over one `Handler` (the client's choice:
    `RequestsHandler`, one ``requests.Session``, its pool sized for batch concurrency)."""

    def __init__(
        self,
        handler: Handler,
        *,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        clock: Clock | None = None,
        rand: Callable[[], float] = random.random,
    ):
        self.handler = handler
        self.timeouts = timeouts
        self.retry = retry
        self.clock = clock or SystemClock()
        self.rand = rand

    def request(
        self,
        credentials: Credentials,
        method: str,
        path: str,
        *,
        target: str,
        json: Any = None,
        stream: bool = False,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        cancelled: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> Response:
        """Send with retries (``retry``, else the transport's policy); return a 2xx `Response` or
        raise the mapped `RequestError`. ``cancelled()`` is asked before each retry: True ends the
        call (`TransportError`, not sent again). ``deadline`` (a ``time.monotonic()`` instant, a
        call's ``timeout``) bounds connecting and waiting for the headers of each try, and the
        waits between tries: none goes past it.

        A 401 with credentials that can be asked afresh (the notebook context's short-lived token,
        an OAuth token) is tried once more within the same attempt, after re-authenticating: the
        token may have expired between the read and the request.
        """
        policy = retry or self.retry
        state = RetryState(policy, self.clock, self.rand)
        while True:
            waits = self._waits(timeout, deadline, target)
            response, error, reason = self._try(credentials, method, path, target, json, stream, waits, timeout)
            if response is not None and response.status == 401 and credentials.refreshes_token:
                log.debug("%s: HTTP 401 with a token that can be asked afresh; signing in again", target)
                credentials.reauthenticate()
                response, error, reason = self._try(credentials, method, path, target, json, stream,
                                                    self._waits(timeout, deadline, target), timeout)
            if error is None:
                response.attempts, response.elapsed = state.attempts + 1, state.elapsed()
                return response
            response = None  # the error's traceback keeps this frame: it must not keep the connection
            if isinstance(error, RateLimited) and not policy.retry_rate_limited:
                raise error  # a batch paces itself (and asks a RetryState of its own per row)
            wait = state.failed(error, reason, deadline)
            if wait is None:
                if reason is not None:
                    log.debug("%s: %s on try %d of %d; giving up (attempts, deadline, timeout or a limit that "
                              "outlasts them)", target, reason, state.attempts, policy.attempts)
                raise error.gave_up_after(state.attempts) from None
            log.debug("%s: %s on try %d of %d; trying again in %.2f s (%s)", target, reason, state.attempts,
                      policy.attempts, wait, "Retry-After" if getattr(error, "retry_after", None) is not None
                      else "backoff")
            self.clock.sleep(wait)
            if cancelled is not None and cancelled():
                raise error.gave_up_after(state.attempts) from None

    def _waits(self, timeout: float | None, deadline: float | None, target: str) -> tuple[float, float]:
        """``(connect, read)`` seconds for one try: the transport's, or what is left of ``deadline``."""
        connect, read = self.timeouts.connect, timeout if timeout is not None else self.timeouts.read
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"{target} sent no answer within the call's timeout", target=target)
            connect, read = min(connect, left), min(read, left)
        return connect, read

    def _try(self, credentials: Credentials, method: str, path: str, target: str, json: Any, stream: bool,
             waits: tuple[float, float], timeout: float | None = None,
             ) -> tuple[Response | None, RequestError | None, str | None]:
        """One request: ``(response, error, retry reason)``; ``error`` is None for a 2xx answer
        (``timeout``: the call's, which a read timeout's message names)."""
        host = credentials.host
        request = HttpRequest(method, host + path, json, stream, waits, credentials.headers)
        try:
            response = self.handler.handle_request(request)
        except TransportFailure as failure:
            shown = timeout if timeout is not None else waits[1]
            return None, _transport_error(failure, target, host, shown), retry_reason(None, failure)
        if response.status < 300:
            return response, None, None
        body = response.error_text()  # a bounded read; the connection goes back to the pool now
        secrets = credentials.secrets()
        if response.status < 400:
            return response, StatusError(
                f"{host} redirected the request for {target} to "
                f"{response.headers.get('Location', 'another address')}, which dbmagic does not follow",
                target=target,
                status=response.status,
                next_step="Set the host to the workspace URL itself (the one in your browser).",
                secrets=secrets,
            ), None
        error = error_from_response(
            response.status,
            body,
            target=target,
            host=host,
            request_id=response.headers.get("x-request-id"),
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            secrets=secrets,
        )
        return response, error, retry_reason(response.status)

    def ensure_pool(self, size: int) -> None:
        """Keep at least ``size`` connections open per host (a batch's concurrency), so none is
        opened and dropped per request."""
        ensure = getattr(self.handler, "ensure_pool", None)
        if ensure is not None:
            ensure(size)

    def close(self) -> None:
        self.handler.close()


def _transport_error(failure: TransportFailure, target: str, host: str, read_timeout: float) -> TransportError:
    kind, detail = failure.kind, failure.detail
    if kind == "read_timeout":
        return RequestTimeout(f"{target} sent no answer within {read_timeout:g} s", target=target)
    if kind == "tls":
        return ConnectionFailed(
            f"The TLS handshake with {host} failed ({detail})", target=target, sent=False,
            next_step="If a corporate proxy re-signs HTTPS, point REQUESTS_CA_BUNDLE at its CA certificate; "
                      "otherwise check the host (`%dbllm whoami`).",
        )
    if kind == "connect_timeout":
        return ConnectionFailed(f"Could not connect to {host} in time", target=target, sent=False)
    if kind == "cut":
        return AnswerCut(f"The answer from {target} was cut: the body ended before its length "
                         f"({detail}); the request ran, so it was not sent again", partial="", target=target)
    if kind == "dropped":
        return ConnectionFailed(
            f"The connection to {host} dropped after the request for {target} was sent ({detail})", target=target,
            next_step="It may have run: it was not sent again. Run the cell again if a second call is fine.")
    return ConnectionFailed(f"Could not reach {host}" + (f" ({detail})" if detail else ""), target=target, sent=False)


def clean_interrupt() -> KeyboardInterrupt:
    """A fresh Ctrl-C for one that came inside requests or urllib3, to be raised outside the handler:
    its traceback starts at dbmagic's frame, so ``%xmode Verbose`` prints none of their locals (which
    hold the request's headers, the Authorization header among them)."""
    return KeyboardInterrupt()
