"""The one retry state: when a failed request is worth another try, and after what wait, on the
clock seam (`Clock`). The transport asks it after each failed try of a request; a batch asks it
after each 429 of a row (and paces the whole batch with `dbmagic.batching.pace`). `retry_reason`,
`backoff` and `retry_delay` are pure functions; `RetryState` holds one request's (or row's) count
and clock, as tenacity's ``RetryCallState`` does, so that every wait goes through the clock and a
test that needs another clock or jitter passes one in.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Clock", "SystemClock", "RetryPolicy", "RetryState", "RETRY_STATUSES", "retry_reason", "backoff",
           "retry_delay", "parse_retry_after"]

# the statuses that say the request did not run: rate limited, or the endpoint unavailable (scaling
# from zero). A 500/502/504 may come after the model ran: an invocation costs money and may not be
# idempotent, so it is not sent again silently.
RETRY_STATUSES = frozenset({429, 503})


class Clock(Protocol):
    """Time as dbmagic reads and waits for it: `monotonic`, `sleep`, and `wait` (wait on a
    ``threading.Condition`` for at most so long: a batch's workers waiting for their pace)."""

    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...
    def wait(self, condition: threading.Condition, seconds: float) -> None: ...


class SystemClock:
    """The real clock."""

    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)

    @staticmethod
    def wait(condition: threading.Condition, seconds: float) -> None:
        condition.wait(seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of what cannot have run: a 429, a 503, and a connection that was never made.

    A 500, 502 or 504, a dropped connection and a read timeout are not retried: the model may have
    run, and an invocation costs money. ``attempts`` counts the first try; ``deadline`` bounds the
    whole call, waits included. A ``Retry-After`` header is honoured up to ``max_retry_after``;
    without one the wait is `backoff`: exponential from ``backoff`` to ``max_backoff``, full jitter.
    """

    attempts: int = 5
    deadline: float = 600.0
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 60.0
    # False: a 429 is raised at once (RateLimited, with .retry_after), for a caller that paces
    # many requests together (dbmagic.batch slows the whole batch down instead)
    retry_rate_limited: bool = True


def retry_reason(status: int | None, failure: Any = None) -> str | None:
    """Why this outcome is worth another try, or None. Only what cannot have run is retried: a
    connection that was never made, a 429 or a 503. Not: a connection that dropped after the request
    was sent, a read timeout (the answer may still be running), 500/502/504 (the model may have run),
    TLS failures and other 4xx (they fail the same way again)."""
    if failure is not None:
        return "could not connect" if failure.kind in ("connect", "connect_timeout") else None
    if status in RETRY_STATUSES:
        return f"HTTP {status}"
    return None


def backoff(policy: RetryPolicy, n: int, rand: Callable[[], float]) -> float:
    """The wait before the ``n``-th retry (from 1) when the server gave no ``Retry-After``:
    exponential from ``policy.backoff`` to ``policy.max_backoff``, with full jitter. The one backoff
    of dbmagic: the transport's retries and a batch's pacing (`dbmagic.batching.pace`) both use it."""
    return min(policy.backoff * 2 ** (max(n, 1) - 1), policy.max_backoff) * rand()


def retry_delay(policy: RetryPolicy, attempt: int, retry_after: float | None, rand: Callable[[], float]) -> float:
    """Seconds to wait before try ``attempt + 1`` (attempt counts from 1): ``Retry-After`` when the
    server gave one (bounded by ``max_retry_after``), else `backoff`."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), policy.max_retry_after)
    return backoff(policy, attempt, rand)


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


class RetryState:
    """The tries of one request, or a batch row's 429s: how many so far and since when, on the
    clock seam. `failed` records a failed try and says whether another is worth it, and after
    what wait: never past the policy's ``attempts`` and ``deadline`` (the whole call's, waits
    included), nor past a call's own ``deadline`` (a ``time.monotonic()`` instant: its
    ``timeout``), nor for a rate limit that resets only after the deadline (an hour's, a day's)."""

    def __init__(self, policy: RetryPolicy, clock: Clock, rand: Callable[[], float]):
        self.policy, self.clock, self.rand = policy, clock, rand
        self.attempts = 0
        self.started = clock.monotonic()

    def restart(self) -> None:
        """Count afresh (a batch moved on since this row's last 429: its pace is working)."""
        self.attempts, self.started = 0, self.clock.monotonic()

    def elapsed(self) -> float:
        return self.clock.monotonic() - self.started

    def failed(self, error: Any, reason: str | None, deadline: float | None = None, *,
               paced: bool = False) -> float | None:
        """Record a failed try (``reason``: why it is worth another, `retry_reason`; None: it is
        not); the seconds to wait before the next try, or None to give up. ``paced``: a batch's
        pace (`dbmagic.batching.pace`) decides when the row goes again, so no wait is counted."""
        self.attempts += 1
        if reason is None or self.attempts >= self.policy.attempts:
            return None
        if (getattr(error, "outlasts", None) or 0) > self.policy.deadline:  # a limit that resets in an hour
            return None
        wait = 0.0 if paced else retry_delay(self.policy, self.attempts, getattr(error, "retry_after", None),
                                              self.rand)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        if self.elapsed() + wait > self.policy.deadline:
            return None
        return wait
