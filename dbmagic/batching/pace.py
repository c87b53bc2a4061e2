"""A batch's pacing: how many requests may be in flight, and how fast they may start.

`Limiter` is a pure state machine on the clock seam (`dbmagic.transport.retry.Clock`): the batch's workers
ask it for a start (`delay`, then `acquire`), and tell it how each request went (`on_success`,
`on_rate_limited`, `release`). Its unit tests drive it with a fake clock, without sleeping.

- At most ``cap`` requests are in flight (the batch's ``concurrency``).
- A 429 **with** ``Retry-After`` pauses every start until then: the endpoint said when.
- A 429 **without** one (as Databricks often answers) sets a start rate learned from what the
  endpoint has been accepting: the requests answered, or still in flight, that started in the
  last second, times 0.95. Starts are then spaced at that rate (a token bucket of one), and the rate
  grows again with each answer (by at least one request per second each second, or 5% of
  itself), so it settles just under the endpoint's limit instead of halving and pausing the whole
  batch. A 429 again before any answer at the learned rate says the endpoint's window is full:
  starts wait until the oldest request it accepted in that window is a second old. When nothing
  has been answered lately there is nothing to learn from: every start waits a
  `dbmagic.transport.retry.backoff` (the transport's own) that grows with each such 429.
- A decrease counts once per *epoch*: the 429s of requests that started before the last decrease
  were sent at the old rate and say nothing new.
- The window is the limit's own, as the 429's message names it (`dbmagic.errors.RateLimited.window`):
  a second for a QPS limit (and when the message names none), a minute for tokens or queries per
  minute. Over a minute, what the endpoint accepted in the last minute sets the rate, a full
  window waits for its oldest request to be a minute old, and the rate grows by one request a
  minute each minute, or 5% a minute. (Limits of an hour or a day are not paced: the batch fails
  fast, `dbmagic.batching.rows`.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ..transport.retry import Clock, RetryPolicy, SystemClock, backoff

__all__ = ["Limiter", "Permit", "shared"]

WINDOW = 1.0  # seconds: a limit's window when its 429 names none (Databricks' QPS limits)
LONGEST = 60.0  # the longest window paced (tokens or queries per minute); what is answered is kept this long
SHARE = 0.95  # of the accepted rate, after a 429 without Retry-After
GROWTH = 0.05  # per window, of the rate itself (and at least one request per window per window)


@dataclass(frozen=True, eq=False)  # each start is its own, even two at the same instant
class Permit:
    """One started request: when it started, and in which epoch."""

    started: float
    epoch: int


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(self: Limiter, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class Limiter:
    """See the module docstring. Its methods hold its own lock: batches running at the same time
    on one endpoint share one (`shared`)."""

    def __init__(self, cap: int, policy: RetryPolicy = RetryPolicy(), clock: Clock | None = None,
                 rand: Callable[[], float] = random.random):
        self._lock = threading.RLock()
        self.cap = cap
        self.policy = policy
        self.clock = clock or SystemClock()
        self.rand = rand
        self.in_flight = 0
        self.rate: float | None = None  # starts per second; None: only the cap limits
        self.pause_until = 0.0
        self.epoch = 0
        self.backoffs = 0  # 429s with nothing to learn from since the last answer: how long a pause is
        self.limited = 0  # 429s seen
        self._next_start = 0.0
        self.window = WINDOW  # the limit's window, as the last 429 without Retry-After named it
        self._answered: deque[float] = deque()  # start times of answered requests, last LONGEST seconds
        self._answered_since = 0  # answers since the last decrease
        self._open: dict[Permit, None] = {}  # requests in flight, oldest first
        self.last_answer = self.clock.monotonic()

    @_locked
    def delay(self) -> float:
        """Seconds until a request may start (0: now; ``inf``: when one in flight ends)."""
        if self.in_flight >= self.cap:
            return math.inf
        now = self.clock.monotonic()
        wait = self.pause_until - now
        if self.rate is not None:
            wait = max(wait, self._next_start - now)
        return max(wait, 0.0)

    @_locked
    def acquire(self) -> Permit:
        """Start a request now (after `delay` said 0)."""
        now = self.clock.monotonic()
        permit = Permit(now, self.epoch)
        self.in_flight += 1
        self._open[permit] = None
        if self.rate is not None:
            self._next_start = max(self._next_start, now - 1.0 / self.rate) + 1.0 / self.rate
        return permit

    @_locked
    def release(self, permit: Permit) -> None:
        """The request ended with neither an answer nor a 429 (an error, a stop)."""
        if self._open.pop(permit, 0) is None:
            self.in_flight -= 1

    @_locked
    def on_success(self, permit: Permit) -> None:
        """The request was answered: the endpoint accepted it."""
        self.release(permit)
        now = self.clock.monotonic()
        self.last_answer = now
        self.backoffs = 0
        self._answered.append(permit.started)
        self._answered_since += 1
        self._forget(now)
        if self.rate is not None:  # per answer, so that per window the rate grows by the larger of GROWTH
            w = self.window  # of itself and one request per window
            self.rate += max(GROWTH / w, 1.0 / (w * w * self.rate))

    @_locked
    def on_rate_limited(self, permit: Permit, retry_after: float | None, window: float | None = None) -> None:
        """The request was answered 429 (with the server's ``Retry-After`` in seconds, or None; the
        ``window`` in seconds of the limit its message named, or None for a second)."""
        self.release(permit)
        self.limited += 1
        now = self.clock.monotonic()
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            self.pause_until = max(self.pause_until, now + min(retry_after, self.policy.max_retry_after))
            return
        if permit.epoch != self.epoch:  # sent at the old rate: nothing new
            return
        self.epoch += 1
        self.window = w = min(window or WINDOW, LONGEST)
        self._forget(now)
        answered_since, self._answered_since = self._answered_since, 0
        in_window = [t for t in self._answered if t > now - w]
        accepted = len(in_window) + sum(1 for p in self._open if p.started > now - w)
        if in_window:
            self.rate = max(SHARE * accepted / w, 1.0 / max(self.policy.max_backoff, w))
            self._next_start = now + 1.0 / self.rate
            if not answered_since:  # refused again at the learned rate: the window is full until its oldest ages out
                self.pause_until = max(self.pause_until, in_window[0] + w)
        else:  # nothing answered lately to learn a rate from: the transport's backoff, growing
            self.backoffs += 1
            self.pause_until = max(self.pause_until, now + backoff(self.policy, self.backoffs, self.rand))

    @_locked
    def quiet_for(self) -> float:
        """Seconds since the last answer (a 429 storm ends the batch once it passes the deadline)."""
        return self.clock.monotonic() - self.last_answer

    def _forget(self, now: float) -> None:
        while self._answered and self._answered[0] <= now - LONGEST:
            self._answered.popleft()


_SHARED: dict[Any, list[Any]] = {}  # endpoint key -> [its Limiter, the batches using it]
_SHARED_LOCK = threading.Lock()


@contextlib.contextmanager
def shared(key: Any, make: Callable[[], Limiter]) -> Iterator[Limiter]:
    """The one `Limiter` of an endpoint (``key``) for every batch that runs on it at the same time,
    in the background or not: two batches together keep to the pace the endpoint accepts, rather
    than each learning it alone and doubling the 429s. The first batch ``make``s it; its cap and
    policy hold until the last one ends."""
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is None:
            entry = _SHARED[key] = [make(), 0]
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _SHARED_LOCK:
            entry[1] -= 1
            if entry[1] == 0 and _SHARED.get(key) is entry:
                del _SHARED[key]
