"""The one HTTP session: timeouts, the retry policy and the clock seam.

`retry_reason` and `retry_delay` are pure functions; `Transport.request` is the only loop that
sleeps, and it sleeps through an injectable `Clock`, so tests never wait for real. Ctrl-C
(KeyboardInterrupt) is never caught: it stops a wait or a request at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests
import requests.auth
from requests.adapters import HTTPAdapter

from ._credentials import Credentials
from .errors import ConnectionFailed, RequestError, RequestTimeout, error_from_response

__all__ = ["Clock", "SystemClock", "Timeouts", "RetryPolicy", "Transport", "retry_reason", "retry_delay"]

RETRY_STATUSES = frozenset({429, 500, 502, 503})


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


def retry_reason(status: int | None, error: Exception | None = None) -> str | None:
    """Why this outcome is worth another try, or None. 504 and other 4xx are not retried:
    a 504 request may have run, and a 4xx will fail the same way again."""
    if error is not None:
        if isinstance(error, (requests.ReadTimeout, requests.exceptions.SSLError)):
            return None  # a slow answer may still be running; a certificate will not fix itself
        if isinstance(error, requests.ConnectionError):
            return "connection error"
        return None
    if status in RETRY_STATUSES:
        return f"HTTP {status}"
    return None


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
    """Seconds to wait before try ``attempt + 1`` (attempt counts from 1)."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), policy.max_retry_after)
    ceiling = min(policy.backoff * 2 ** (attempt - 1), policy.max_backoff)
    return ceiling * rand()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds form; HTTP dates are rare here)."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


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
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        session.headers["User-Agent"] = f"dbmagic/{_version()} {session.headers.get('User-Agent', '')}".strip()
        self.session = session

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
    ) -> requests.Response:
        """Send with retries; return a 2xx response or raise the mapped `RequestError`."""
        url = credentials.host + path
        read_timeout = timeout if timeout is not None else self.timeouts.read
        start = self.clock.monotonic()
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            token = credentials.token  # re-read per try: a notebook token is short-lived
            secrets = [token]
            try:
                response = self.session.request(
                    method,
                    url,
                    json=json,
                    auth=_Bearer(token),  # an auth object, so a ~/.netrc entry cannot replace it
                    stream=stream,
                    timeout=(self.timeouts.connect, read_timeout),
                    allow_redirects=False,  # never carry the token to another host
                )
            except requests.RequestException as exc:
                error: RequestError = _transport_error(exc, target, credentials.host, read_timeout)
                reason = retry_reason(None, exc)
                retry_after = None
            else:
                if response.status_code < 300:
                    return response
                body = response.content  # small error bodies; also releases the connection
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if response.status_code == 401 and credentials.refreshes_token and not refreshed:
                    refreshed = True  # the notebook token expired between reads: read it once more
                    attempt -= 1
                    continue
                if 300 <= response.status_code < 400:
                    error = RequestError(
                        f"{credentials.host} redirected the request for {target} to "
                        f"{response.headers.get('Location', 'another address')}, which dbmagic does not follow",
                        target=target,
                        status=response.status_code,
                        next_step="Set the host to the workspace URL itself (the one in your browser).",
                        secrets=secrets,
                    )
                    reason = None
                else:
                    error = error_from_response(
                        response.status_code,
                        body,
                        target=target,
                        host=credentials.host,
                        request_id=response.headers.get("x-request-id"),
                        retry_after=retry_after,
                        secrets=secrets,
                    )
                    reason = retry_reason(response.status_code)
            if reason is None or attempt >= self.retry.attempts:
                raise error.gave_up_after(attempt) from None
            wait = retry_delay(self.retry, attempt, retry_after, self.rand)
            if self.clock.monotonic() - start + wait > self.retry.deadline:
                raise error.gave_up_after(attempt) from None
            self.clock.sleep(wait)

    def close(self) -> None:
        self.session.close()


class _Bearer(requests.auth.AuthBase):
    def __init__(self, token: str):
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
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
    return ConnectionFailed(f"Could not reach {host} ({exc.__class__.__name__})", target=target)
