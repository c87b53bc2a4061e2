"""A batch's pacing: how many requests may be in flight, and how fast they may start.

`Limiter` is a pure state machine on the clock seam (`dbmagic.transport.retry.Clock`): the batch's workers
ask it for a start (`delay`, then `acquire`), and tell it how each request went (`on_success`,
`on_rate_limited`, `release`). Its unit tests drive it with a fake clock, without sleeping.

- At most ``cap`` requests are in flight (the batch's ``concurrency``).
- A 429 **with** ``Retry-After`` pauses every start until then: the endpoint said when. (One of
  several tasks also learns its rate from it, as below: the other tasks did not hear it, and all
  of them starting again at their whole concurrency when it ends met 1 to 3 429s a row.)
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
- **A token limit**: once a 429 names one (`dbmagic.errors.RateLimited.tokens`: input, output, or
  total tokens), the pace counts tokens, not requests: a start costs its request's tokens, estimated
  by the batch (``acquire(cost)``) and corrected by the ratio of the answers' usage to their
  estimates; the rate is learned in tokens from the usage the answers reported (``on_success(used)``),
  and grows by a request's worth of tokens.
- **One of several tasks** on one limit (a Spark job's: ``share`` is 1 / the tasks that run at
  once, and they cannot talk to each other): what a task alone saw accepted in the last window is a
  noisy sample of its share, so it learns over the time it has run (up to ``window / share``), and
  once it has a rate it slows by the same step of its own rate each time, refused again or not (a
  429 before its next answer may be another task's burst: it does not stop for a second's window,
  only for a minute's); it grows by its share of one request per window each window, faster with
  the square of the windows since its last 429 (up to `QUIET` windows: the other tasks may have
  ended, and the last task of a job must reach the whole limit in seconds, not tens); with nothing
  answered lately it waits a window at most (the others' answers say the endpoint is up). `shared`
  remembers the rate an endpoint's batch learned, so a Python worker's next task starts there.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..transport.retry import Clock, RetryPolicy, SystemClock, backoff

__all__ = ["Limiter", "Permit", "shared"]

WINDOW = 1.0  # seconds: a limit's window when its 429 names none (Databricks' QPS limits)
LONGEST = 60.0  # the longest window paced (tokens or queries per minute); what is answered is kept this long
SHARE = 0.95  # of the accepted rate, after a 429 without Retry-After
GROWTH = 0.05  # per window, of the rate itself (and at least one request per window per window)
QUIET = 10  # a task's growth is (1 + this) squared times more at most, after as many windows without a 429


@dataclass(frozen=True, eq=False)  # each start is its own, even two at the same instant
class Permit:
    """One started request: when it started, in which epoch, and what it was counted to cost of a
    token limit (its tokens estimated; 1 while the pace counts requests)."""

    started: float
    epoch: int
    cost: float = 1.0
    estimate: float = 1.0  # the cost as the batch estimated it, before the answers' usage corrected it


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
                 rand: Callable[[], float] = random.random, share: float = 1.0):
        self._lock = threading.RLock()
        self.cap = cap
        self.share = share  # of the endpoint's limit this limiter's batch may expect (1 / the tasks sharing it)
        self.policy = policy
        self.clock = clock or SystemClock()
        self.rand = rand
        self.in_flight = 0
        self.rate: float | None = None  # starts per second (tokens per second when `tokens`); None: only the cap
        self.tokens: str | None = None  # the tokens a limit counts ("input", "output", "total"), once a 429 named one
        self.pause_until = 0.0
        self.epoch = 0
        self.backoffs = 0  # 429s with nothing to learn from since the last answer: how long a pause is
        self.limited = 0  # 429s seen
        self._next_start = 0.0
        self.window = WINDOW  # the limit's window, as the last 429 without Retry-After named it
        self._answered: deque[float] = deque()  # start times of answered requests, last LONGEST seconds
        # the tokens each of them used, as its usage said: (input, output, total), None when it said none
        self._used: deque[tuple[float | None, ...] | None] = deque()
        # since the pace counts tokens: the tokens its estimates said and the answers' usage counted
        self._tokens_since, self._estimated, self._counted = 0, 0.0, 0.0
        self._answered_since = 0  # answers since the last decrease
        self._open: dict[Permit, None] = {}  # requests in flight, oldest first
        self.last_answer = self.started = self.last_limited = self.clock.monotonic()

    @property
    def one_of_several(self) -> bool:
        """Whether its batch is one of several tasks on the endpoint's limit (a Spark job's)."""
        return self.share < 1

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
    def acquire(self, cost: float = 1.0) -> Permit:
        """Start a request now (after `delay` said 0); ``cost``: its tokens estimated, of the kind
        `tokens` names (what a token limit counts it for; unused while the pace counts requests)."""
        now = self.clock.monotonic()
        estimate = cost if self.tokens else 1.0
        if self.tokens and self._estimated:  # estimates corrected by what the answers' usage said of them
            cost = estimate * self._counted / self._estimated
        permit = Permit(now, self.epoch, cost if self.tokens else 1.0, estimate)
        self.in_flight += 1
        self._open[permit] = None
        if self.rate is not None:
            step = permit.cost / self.rate
            self._next_start = max(self._next_start, now - step) + step
        return permit

    @_locked
    def release(self, permit: Permit) -> None:
        """The request ended with neither an answer nor a 429 (an error, a stop)."""
        if self._open.pop(permit, 0) is None:
            self.in_flight -= 1

    @_locked
    def on_success(self, permit: Permit, used: Mapping[str, float] | None = None) -> None:
        """The request was answered: the endpoint accepted it (``used``: the tokens its usage reported,
        ``{"input", "output", "total"}``, what a token limit counts)."""
        self.release(permit)
        now = self.clock.monotonic()
        self.last_answer = now
        self.backoffs = 0
        self._answered.append(permit.started)
        self._used.append(tuple(used.get(kind) for kind in _KINDS) if used else None)
        if self.tokens and permit.epoch >= self._tokens_since and (used or {}).get(self.tokens):
            self._estimated += permit.estimate
            self._counted += float(used[self.tokens])
        self._answered_since += 1
        self._forget(now)
        if self.rate is not None:  # per answer, so that per window the rate grows by the larger of GROWTH
            w = self.window  # of itself and one request per window (its share of one, when tasks share the limit)
            weight = self._weight(permit, used) if self.tokens else 1.0  # a request's worth (in tokens, its own)
            step = max(GROWTH / w, self.share / (w * w * (self.rate / weight)))
            if self.one_of_several:  # the longer no 429 came, the faster it grows (the
                step *= (1 + min((now - self.last_limited) / w, QUIET)) ** 2  # others may have ended)
            self.rate += step * weight

    @_locked
    def on_rate_limited(self, permit: Permit, retry_after: float | None, window: float | None = None,
                        tokens: str | None = None) -> None:
        """The request was answered 429 (with the server's ``Retry-After`` in seconds, or None; the
        ``window`` in seconds of the limit its message named, or None for a second; ``tokens``: the
        tokens the limit counts, when it is a token limit: then the pace counts them)."""
        self.release(permit)
        if tokens and self.tokens != tokens:  # from now on the pace is in tokens: what it learned in requests
            self.tokens, self.rate = tokens, None  # does not hold, and its epoch starts afresh
            self.epoch += 1
            self._tokens_since, self._estimated, self._counted = self.epoch, 0.0, 0.0
            permit = Permit(permit.started, self.epoch, permit.cost, permit.estimate)
        self.limited += 1
        now = self.last_limited = self.clock.monotonic()
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            self.pause_until = max(self.pause_until, now + min(retry_after, self.policy.max_retry_after))
            if not self.one_of_several:  # a lone batch: every start waits, and the server said when
                return
            # one of several tasks: the others did not hear it, so it learns its rate from it too
        if permit.epoch != self.epoch:  # sent at the old rate: nothing new
            return
        self.epoch += 1
        self.window = w = min(window or WINDOW, LONGEST)
        self._forget(now)
        answered_since, self._answered_since = self._answered_since, 0
        # a task's share of the limit shows over more windows than one (as many as have passed)
        seen = max(w, min(w / self.share, LONGEST, now - self.started))
        in_window = [t for t in self._answered if t > now - seen]
        if self.tokens:  # a token limit: what was accepted is the tokens, as each answer's usage said
            used = [u for t, u in zip(self._answered, self._used, strict=True) if t > now - seen]
            accepted = sum(self._weight(None, _as_used(u)) for u in used) + sum(
                p.cost for p in self._open if p.started > now - seen)
        else:
            accepted = len(in_window) + sum(1 for p in self._open if p.started > now - seen)
        if in_window:
            if self.one_of_several and self.rate is not None:
                # one of several tasks on the limit: what it alone saw accepted is a noisy sample of its
                # share (another task's burst took its slots), so it slows by the same step each time
                learned = self.rate * SHARE
            else:
                learned = SHARE * accepted / seen
            floor = 1.0 / max(self.policy.max_backoff, w)  # a request per longest backoff, at the least
            self.rate = max(learned, floor * (permit.cost if self.tokens else 1.0))
            self._next_start = now + (permit.cost if self.tokens else 1.0) / self.rate
            recent = [t for t in in_window if t > now - w]
            # refused again at the learned rate: the window is full until its oldest ages out (for one of
            # several tasks only a minute's: in a second's, that 429 is as likely another task's burst)
            if not answered_since and recent and (not self.one_of_several or w > WINDOW):
                self.pause_until = max(self.pause_until, recent[0] + w)
        else:  # nothing answered lately to learn a rate from: the transport's backoff, growing (for one of
            self.backoffs += 1  # several tasks, never past a window: the others' answers say the endpoint is up)
            wait = backoff(self.policy, self.backoffs, self.rand)
            self.pause_until = max(self.pause_until, now + (min(wait, w) if self.one_of_several else wait))

    @_locked
    def done(self) -> None:
        """No batch uses it any more: what it remembered of each answer goes (a batch's result keeps
        the limiter for what it learned, not a window of timestamps a row)."""
        self._answered.clear()
        self._used.clear()

    @_locked
    def resume(self, rate: float, window: float, tokens: str | None = None) -> None:
        """Start at ``rate`` starts (or ``tokens``) a second over ``window``: what a batch before this
        one learned."""
        self.rate, self.window, self.tokens = rate, window, tokens
        self._next_start = self.clock.monotonic()

    def _weight(self, permit: Permit | None, used: Mapping[str, float] | None) -> float:
        """The tokens one answer counted for: its usage of the kind `tokens` names, else its estimate."""
        found = (used or {}).get(self.tokens or "")
        if found:
            return float(found)
        return permit.cost if permit is not None else (self._mean_cost() or 1.0)

    def _mean_cost(self) -> float | None:
        costs = [float(found) for u in self._used if self.tokens and (found := _as_used(u).get(self.tokens))]
        return sum(costs) / len(costs) if costs else None

    @_locked
    def quiet_for(self) -> float:
        """Seconds since the last answer (a 429 storm ends the batch once it passes the deadline)."""
        return self.clock.monotonic() - self.last_answer

    def _forget(self, now: float) -> None:
        while self._answered and self._answered[0] <= now - LONGEST:
            self._answered.popleft()
            self._used.popleft()


_KINDS = ("input", "output", "total")  # the tokens a limit counts


def _as_used(kept: tuple[float | None, ...] | None) -> dict[str, float]:
    """An answer's tokens as the limiter keeps them (a tuple of `_KINDS`), by kind."""
    return {kind: value for kind, value in zip(_KINDS, kept or (), strict=False) if value is not None}


_SHARED: dict[Any, list[Any]] = {}  # endpoint key -> [its Limiter, the batches using it]
_SHARED_LOCK = threading.Lock()
_LEARNED: dict[Any, tuple[float, float, float, str | None]] = {}  # endpoint -> (rate, window, when, tokens)


@contextlib.contextmanager
def shared(key: Any, make: Callable[[], Limiter], endpoint: Any = None) -> Iterator[Limiter]:
    """The one `Limiter` of an endpoint (``key``) for every batch that runs on it at the same time,
    in the background or not: two batches together keep to the pace the endpoint accepts, rather
    than each learning it alone and doubling the 429s. The first batch ``make``s it; its cap and
    policy hold until the last one ends.

    The rate it learned outlives it for a window (`LONGEST`), per ``endpoint`` (its URL): the next
    batch on that endpoint in this process starts at that rate rather than at its whole
    concurrency. On Spark, where each task is a batch and a Python worker runs one task after
    another, a task starts at the pace the one before it learned."""
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is None:
            entry = _SHARED[key] = [make(), 0]
            learned = _LEARNED.get(endpoint) if endpoint is not None else None
            if learned is not None and time.monotonic() - learned[2] < LONGEST:
                entry[0].resume(learned[0], learned[1], learned[3])
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _SHARED_LOCK:
            entry[1] -= 1
            if entry[1] == 0 and _SHARED.get(key) is entry:
                del _SHARED[key]
                limiter = entry[0]
                if endpoint is not None and limiter.rate is not None:
                    _LEARNED[endpoint] = (limiter.rate, limiter.window, time.monotonic(), limiter.tokens)
                limiter.done()
