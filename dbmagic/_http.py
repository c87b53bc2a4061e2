"""The one HTTP session: timeouts, the retry policy and the clock seam.

`retry_reason` and `retry_delay` are pure functions; `Transport.request` is the only loop that
sleeps, and it sleeps through an injectable `Clock`, so tests never wait for real. Ctrl-C
(KeyboardInterrupt) is never caught: it stops a wait or a request at once.
"""

from __future__ import annotations

import math
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
import requests.auth
import urllib3
from requests.adapters import HTTPAdapter

from ._credentials import Credentials
from .errors import (
    ConnectionFailed,
    RateLimited,
    RequestError,
    RequestTimeout,
    StreamInterrupted,
    error_from_response,
)

__all__ = ["Clock", "SystemClock", "Timeouts", "RetryPolicy", "Transport", "Body", "retry_reason", "retry_delay"]

# the statuses that say the request did not run: rate limited, or the endpoint unavailable (scaling
# from zero). A 500/502/504 may come after the model ran: an invocation costs money and may not be
# idempotent, so it is not sent again silently.
RETRY_STATUSES = frozenset({429, 503})
# plain http is allowed for loopback only, which no proxy should see: the token would cross it in clear
# (None wins over the *_PROXY variables requests would otherwise merge in, ALL_PROXY's "all" included)
_NO_PROXY = {"http": None, "https": None, "all": None}


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)


@dataclass(frozen=True)
class Timeouts:
    """Seconds to open a connection, and to wait for the answer (or for each streamed chunk).

    Invocations may legitimately run about 300 s on Databricks, hence the long read default.
    """

    connect: float = 10.0
    read: float = 300.0

    def __post_init__(self) -> None:
        from .settings import MAX_TIMEOUT

        for name in ("connect", "read"):
            value = getattr(self, name)
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and 0 < value <= MAX_TIMEOUT)
            if not ok:
                from .errors import SettingError

                raise SettingError(f"Timeouts({name}=...) must be a number of seconds above 0 and at most "
                                   f"{MAX_TIMEOUT:g}; got {value!r}.")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of 429, 500, 502, 503 and connection errors.

    ``attempts`` counts the first try. ``deadline`` bounds the whole call, waits included.
    A ``Retry-After`` header is honoured up to ``max_retry_after``; without one the wait grows
    exponentially from ``backoff`` to ``max_backoff`` with full jitter.
    """

    attempts: int = 5
    deadline: float = 600.0
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 60.0
    # False: a 429 is raised at once (RateLimited, with .retry_after), for a caller that paces
    # many requests together (dbmagic.batch slows the whole batch down instead)
    retry_rate_limited: bool = True


def retry_reason(status: int | None, error: Exception | None = None) -> str | None:
    """Why this outcome is worth another try, or None. Only what cannot have run is retried: a
    connection that was never made, a 429 or a 503. Not: a connection that dropped after the request
    was sent, a read timeout (the answer may still be running), 500/502/504 (the model may have run),
    TLS failures and other 4xx (they fail the same way again)."""
    if error is not None:
        return "could not connect" if _never_sent(error) else None
    if status in RETRY_STATUSES:
        return f"HTTP {status}"
    return None


def _never_sent(error: Exception) -> bool:
    """True for failures before the request left: the connection was not made (refused, DNS, timeout)."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    if isinstance(error, requests.exceptions.SSLError) or not isinstance(error, requests.ConnectionError):
        return False
    reason = error.args[0] if error.args else None
    reason = getattr(reason, "reason", reason)  # requests wraps urllib3's MaxRetryError(reason=...)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
    """Seconds to wait before try ``attempt + 1`` (attempt counts from 1)."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), policy.max_retry_after)
    ceiling = min(policy.backoff * 2 ** (attempt - 1), policy.max_backoff)
    return ceiling * rand()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; HTTP dates are rare here); None,
    so that backoff applies, for anything that is not a finite number of at least 0."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class Transport:
    """One ``requests.Session`` (a pool sized for batch concurrency) plus retries and timeouts."""

    def __init__(
        self,
        *,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        clock: Clock | None = None,
        session: requests.Session | None = None,
        pool_size: int = 16,
        rand: Callable[[], float] = random.random,
    ):
        self.timeouts = timeouts
        self.retry = retry
        self.clock = clock or SystemClock()
        self.rand = rand
        self.pool_size = 0
        if session is None:
            session = requests.Session()
            self._mount(session, pool_size)
        session.headers["User-Agent"] = f"dbmagic/{_version()} {session.headers.get('User-Agent', '')}".strip()
        self.session = session
        self.org_id: str | None = None  # the workspace's, from the x-databricks-org-id header of any answer

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
    ) -> requests.Response:
        """Send with retries (``retry``, else the transport's policy); return a 2xx response or
        raise the mapped `RequestError`.

        A 401 with credentials that can be asked afresh (the notebook context's short-lived token,
        an OAuth token) is tried once more within the same attempt, after re-authenticating: the
        token may have expired between the read and the request.
        """
        read_timeout = timeout if timeout is not None else self.timeouts.read
        policy = retry or self.retry
        start = self.clock.monotonic()
        attempt = 0
        while True:
            attempt += 1
            response, error, reason = self._try(credentials, method, path, target, json, stream, read_timeout)
            if response is not None and response.status_code == 401 and credentials.refreshes_token:
                credentials.reauthenticate()
                response, error, reason = self._try(credentials, method, path, target, json, stream, read_timeout)
            if error is None:
                response.dbmagic_attempts = attempt  # type: ignore[attr-defined]  # for the trace
                return response
            response = None  # the error's traceback keeps this frame: it must not keep the connection
            if isinstance(error, RateLimited) and not policy.retry_rate_limited:
                raise error
            if reason is None or attempt >= policy.attempts:
                raise error.gave_up_after(attempt) from None
            wait = retry_delay(policy, attempt, error.retry_after, self.rand)
            if self.clock.monotonic() - start + wait > policy.deadline:
                raise error.gave_up_after(attempt) from None
            self.clock.sleep(wait)

    def _try(self, credentials: Credentials, method: str, path: str, target: str, json: Any, stream: bool,
             read_timeout: float) -> tuple[requests.Response | None, RequestError | None, str | None]:
        """One request: ``(response, error, retry reason)``; ``error`` is None for a 2xx answer."""
        host = credentials.host
        interrupted = False
        try:
            response = self.session.request(
                method,
                host + path,
                json=json,
                auth=_Bearer(credentials),  # an auth object, so a ~/.netrc entry cannot replace it
                stream=stream,
                timeout=(self.timeouts.connect, read_timeout),
                allow_redirects=False,  # never carry the token to another host
                proxies=_NO_PROXY if host.startswith("http://") else None,
            )
        except requests.RequestException as exc:
            return None, _transport_error(exc, target, host, read_timeout), retry_reason(None, exc)
        except KeyboardInterrupt:
            interrupted = True
        if interrupted:
            raise clean_interrupt()
        org_id = response.headers.get("x-databricks-org-id")
        if org_id and org_id.isdigit():
            self.org_id = org_id
        if response.status_code < 300:
            return response, None, None
        body = response.content  # small error bodies
        response.close()  # the connection goes back to the pool now, not when the error is collected
        secrets = credentials.secrets()
        if response.status_code < 400:
            return response, RequestError(
                f"{host} redirected the request for {target} to "
                f"{response.headers.get('Location', 'another address')}, which dbmagic does not follow",
                target=target,
                status=response.status_code,
                next_step="Set the host to the workspace URL itself (the one in your browser).",
                secrets=secrets,
            ), None
        error = error_from_response(
            response.status_code,
            body,
            target=target,
            host=host,
            request_id=response.headers.get("x-request-id"),
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            secrets=secrets,
        )
        return response, error, retry_reason(response.status_code)

    def ensure_pool(self, size: int) -> None:
        """Keep at least ``size`` connections open per host (a batch's concurrency), so none is
        opened and dropped per request."""
        if self.pool_size and size > self.pool_size:
            self._mount(self.session, size)

    def _mount(self, session: requests.Session, size: int) -> None:
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=size, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self.pool_size = size

    def close(self) -> None:
        self.session.close()


class Body:
    """A response body read as it arrives: the one place that knows urllib3's streaming internals.

    `read` gives the bytes available now (so an event is seen as soon as it is written), ``b""`` at
    the end, and raises ``ConnectionError`` when the connection breaks; `abort` wakes a blocked
    `read` from another thread. Tests may stand in any object with these methods.
    """

    def __init__(self, response: requests.Response):
        self._response = response

    def read(self, size: int = 65536) -> bytes:
        try:
            # read1, not iter_content: the latter waits for a full buffer on close-delimited bodies
            return self._response.raw.read1(size)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ConnectionError(exc.__class__.__name__) from None
        except KeyboardInterrupt:
            pass  # raised afresh below, outside the handler (see clean_interrupt)
        raise clean_interrupt()

    def read_all(self) -> bytes:
        try:
            return self._response.content
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise ConnectionError(exc.__class__.__name__) from None
        except KeyboardInterrupt:
            pass  # raised afresh below, outside the handler (see clean_interrupt)
        raise clean_interrupt()

    def abort(self) -> None:
        sock = getattr(getattr(self._response.raw, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def close(self) -> None:
        self._response.close()


def clean_interrupt() -> KeyboardInterrupt:
    """A fresh Ctrl-C for one that came inside requests or urllib3, to be raised outside the handler:
    its traceback starts at dbmagic's frame, so ``%xmode Verbose`` prints none of their locals (which
    hold the request's headers, the Authorization header among them)."""
    return KeyboardInterrupt()


class _Bearer(requests.auth.AuthBase):
    """Asks the credentials for their headers as the request is built (tokens expire), so no
    frame of the retry loop holds the token as a local."""

    def __init__(self, credentials: Credentials):
        self._credentials = credentials

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers.update(self._credentials.headers())
        return request

    def __repr__(self) -> str:
        return "_Bearer('***')"


def _version() -> str:
    from . import __version__

    return __version__


def _transport_error(exc: requests.RequestException, target: str, host: str, read_timeout: float) -> RequestError:
    if isinstance(exc, requests.ReadTimeout):
        return RequestTimeout(f"{target} sent no answer within {read_timeout:g} s", target=target)
    if isinstance(exc, requests.exceptions.SSLError):
        return ConnectionFailed(
            f"The TLS handshake with {host} failed ({exc.__class__.__name__})", target=target,
            next_step="If a corporate proxy re-signs HTTPS, point REQUESTS_CA_BUNDLE at its CA certificate; "
                      "otherwise check the host (`%dbllm whoami`).",
        )
    if isinstance(exc, requests.ConnectTimeout):
        return ConnectionFailed(f"Could not connect to {host} in time", target=target)
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return StreamInterrupted(f"The answer from {target} was cut: the body ended before its length "
                                 f"({exc.__class__.__name__}); the request ran, so it was not sent again",
                                 partial="", target=target)
    if not _never_sent(exc):
        return ConnectionFailed(
            f"The connection to {host} dropped after the request for {target} was sent "
            f"({exc.__class__.__name__})", target=target,
            next_step="It may have run: it was not sent again. Run the cell again if a second call is fine.")
    return ConnectionFailed(f"Could not reach {host} ({exc.__class__.__name__})", target=target)
