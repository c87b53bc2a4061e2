"""A batch's worker loop (`Rows`): ``cap`` threads take rows when the pace (`dbmagic.batching.pace`)
and the budget allow a start, and store each row's outcome in its place. A 429 goes back first in
line, counted by the row's own `dbmagic.transport.retry.RetryState` (the transport's retry rules);
a 401 stops the batch; Ctrl-C (or a background batch's ``cancel()``) sends nothing more and keeps
the answers on their way that come within its ``grace``."""

from __future__ import annotations

import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import AuthenticationError, DbMagicError, Interrupted, NotSent, RateLimited, SchemaError, error_of
from ..transport.retry import RetryState
from .budget import Budget
from .pace import Limiter

if TYPE_CHECKING:
    from ..call.call import Call

__all__ = ["Rows", "Reused", "GRACE", "RESUME_HINT", "progress_bar"]


class Reused:
    """A row answered by another batch on the same checkpoint while this one waited (not sent)."""

    reused = True

    def __init__(self, outcome: Any):
        self._outcome = outcome

    def outcome(self) -> Any:
        return self._outcome

    def cancel(self, why: str = "stopped") -> None:
        pass


GRACE = 2.0  # seconds a stopped batch (Ctrl-C) waits for the answers already sent, which are paid for


class Rows:
    """The worker loop: ``cap`` threads take rows from ``todo`` when the `Limiter` allows a start,
    and store each row's outcome (`Call.outcome`) in ``items``. A 429 puts the row back first in
    line (until its attempts or the deadline are spent); Ctrl-C sends nothing more, waits up to
    its ``grace`` (seconds) for the calls in flight, then cancels those still on their way (each keeps what
    arrived, as an ``interrupted`` answer).

    What it sends may be several rows in one request (`dbmagic.batching.packs`): ``size(index)`` is
    how many rows ``index`` stands for (counted done and failed), ``label(index)`` how messages name
    it, and ``split(index, outcome)`` the indices to send instead of one that failed (its halves),
    or None."""

    def __init__(self, cap: int, todo: list[int], items: list[Any], policy: Any, clock: Any, signed_in: bool = False,
                 on_outcome: Callable[[int, Any], None] | None = None, budget: Budget | None = None,
                 limiter: Limiter | None = None, worst: Callable[[int], tuple[float, int]] | None = None,
                 grace: float = GRACE, size: Callable[[int], int] = lambda index: 1,
                 label: Callable[[int], str] = lambda index: f"Row {index}",
                 split: Callable[[int, Any], list[int] | None] | None = None,
                 cost: Callable[[int, str], float] = lambda index, tokens: 1.0):
        self.workers = min(cap, max(len(todo), 1))
        self.limiter = limiter if limiter is not None else Limiter(self.workers, policy, clock)
        self.clock = self.limiter.clock  # every wait for the pace goes through it
        self.grace = grace  # seconds a stopped batch waits for the answers already on their way
        self.todo = deque(todo)
        self.items = items
        self.policy = policy
        self.remaining = len(todo)  # what is still to send or on its way (rows, or packs of rows)
        self.size, self.label, self.split, self.cost = size, label, split, cost
        self.rows = sum(size(index) for index in todo)  # rows in all (what the progress bar counts)
        self.failed = 0  # rows
        self.done = 0  # rows
        self.answers = 0  # rows answered so far: a 429 after one of them starts the row's count afresh
        self.signed_in = signed_in  # the token worked before the batch: a 401 means it expired since
        self.on_outcome = on_outcome  # told each row's outcome as it is stored (the checkpoint writes it)
        self.budget = budget  # what the batch may spend, after which nothing more is sent
        self.worst = worst  # a row's worst cost and input estimate, which it reserves of the budget
        self.reservations: dict[int, tuple[float, int]] = {}  # rows in flight -> what they reserved
        # per row: its 429s (the transport's retry rules, counted afresh once the batch answered another row
        # since: the pace is working), and the answer count at its last 429
        self.retries: dict[int, tuple[RetryState, int]] = {}
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
        bar = bar if bar is not None else progress_bar(self.rows) if progress and self.remaining else None
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
        kept when they come within its ``grace`` (seconds) (a second Ctrl-C drops them); the calls still in
        flight then keep what arrived, as partial ``interrupted`` answers."""
        with self.cond:
            self.stopped = True
            self.stop.set()
            waiting = len(self.calls)
            self.cond.notify_all()
        if waiting and self.grace > 0:
            if announce:
                print(f"Stopping: nothing more is sent; keeping the {waiting} answer{'s' if waiting > 1 else ''} on "
                      f"the way for up to {self.grace:g} s (Ctrl-C again to drop {'them' if waiting > 1 else 'it'}).",
                      flush=True)
            try:
                until = self.clock.monotonic() + self.grace
                with self.cond:
                    while self.calls and self.clock.monotonic() < until:
                        self.clock.wait(self.cond, min(0.05, max(until - self.clock.monotonic(), 0)))
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
                        kept.error = Interrupted(f"{self.label(index)}: the batch stopped while its answer was on its way; "
                                                 f"{len(kept.text)} characters that arrived are kept. resume= sends "
                                                 "it again.")
                    self.items[index] = kept
            why = "cancelled" if self.cancelled else "interrupted"
            while self.todo:  # every row not sent says why
                index = self.todo.popleft()
                if self.items[index] is None:
                    self.items[index] = NotSent(
                        f"{self.label(index)} was not sent: the batch was {'cancelled' if self.cancelled else 'interrupted (Ctrl-C)'}"
                        " first. resume= (or the same checkpoint) sends it.", reason=why)

    def _work(self, call: Callable[[int], Call]) -> None:
        limiter = self.limiter
        while True:
            with self.cond:
                try:
                    index, permit = self._next()
                except BaseException as exc:  # a bug of ours: it stops the batch (raised), never a row left unsaid
                    self.fatal, self.stopped = exc, True
                    self.stop.set()
                    self.cond.notify_all()
                    return
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
                halves = self.split(index, outcome) if self.split is not None and not self.stopped else None
                if halves:  # a pack of rows failed for what one of them may hold: each half is sent again
                    limiter.release(permit)
                    self.todo.extendleft(reversed(halves))
                    self.remaining += len(halves) - 1
                    self._settle(index, None)
                    self.cond.notify_all()
                    continue
                answered = isinstance(outcome, SchemaError) and outcome.completion is not None  # an answer, unfit
                if getattr(c, "reused", False):  # not sent: nothing to learn the pace from
                    limiter.release(permit)
                    self.reused += self.size(index)
                elif (isinstance(outcome, Exception) and not answered) or getattr(outcome, "is_partial", False):
                    limiter.release(permit)
                else:
                    limiter.on_success(permit, _used(outcome))
                    self.answers += 1
                self.items[index] = outcome
                if self.on_outcome is not None:  # recorded before the row counts as done: a batch that has
                    try:                         # returned has every answer in its checkpoint
                        self.on_outcome(index, outcome)
                    except Exception as exc:  # a checkpoint that cannot be written stops the batch
                        self.fatal, self.stopped = exc, True
                        self.stop.set()
                self.remaining -= 1
                self.done += self.size(index)
                failed = getattr(outcome, "failed_rows", None)  # a pack's answers: its rows' own errors
                self.failed += (self.size(index) if error_of(outcome) is not None else 0) if failed is None else failed
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
            self._give_up_all(lambda: NotSent(f"Not sent: {self.budget.refusal()}", reason="budget"))

    def _next(self) -> tuple[int | None, Any]:
        """The next row to send and its permit, once the limiter allows (called holding the lock)."""
        limiter = self.limiter
        while not self.stopped and self.todo:
            wait = limiter.delay()
            if wait > 0:
                self.clock.wait(self.cond, min(wait, 0.5))
                continue
            if self.budget is not None and self.worst is not None:
                reserve = self.worst(self.todo[0])
                if not self.budget.take(reserve[0]):
                    if not self.reservations:  # nothing in flight will give room back: the budget is spent
                        self._give_up_all(lambda: NotSent(f"Not sent: {self.budget.refusal()}", reason="budget"))
                        return None, None
                    self.cond.wait(0.5)  # an answer on its way may settle for less than it reserved
                    continue
                self.reservations[self.todo[0]] = reserve
            permit = limiter.acquire(self.cost(self.todo[0], limiter.tokens) if limiter.tokens else 1.0)
            index = self.todo.popleft()
            return index, permit
        return None, None

    def _again(self, index: int, exc: RateLimited, permit: Any) -> bool:
        """A 429: tell the limiter, put the row back first in line; False when the row's attempts or
        time are up (it then fails with the 429, as any call past its retry policy). When nothing has
        answered for the policy's deadline, the rows not yet sent fail with it too (holding the lock)."""
        limiter, policy = self.limiter, self.policy
        limiter.on_rate_limited(permit, exc.retry_after, exc.window, exc.tokens)
        if (exc.outlasts or 0) > policy.deadline:  # a limit that resets in an hour: fail fast, every row saying so
            self._give_up_all(lambda: _not_sent(exc, f"and its {exc.limit} limit resets only after the retry deadline"))
            return False
        if limiter.quiet_for() > policy.deadline:
            quiet = limiter.quiet_for()
            self._give_up_all(lambda: _not_sent(
                exc, f"and nothing in the batch was answered for {quiet:.0f} s (the retry deadline)"))
        state, seen = self.retries.get(index, (None, self.answers))
        if state is None:
            state = RetryState(policy, limiter.clock, limiter.rand)
        elif seen != self.answers:  # the batch moved on since this row's last 429: the pace is working
            state.restart()
        self.retries[index] = (state, self.answers)
        if state.failed(exc, "HTTP 429", paced=True) is None:
            exc.gave_up_after(state.attempts)
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
            self.done += self.size(index)
            self.failed += self.size(index)
        self.cond.notify_all()


def _used(outcome: Any) -> dict[str, float]:
    """The tokens an answer's usage reported (what a token limit counted), by kind."""
    usage = getattr(getattr(outcome, "completion", None) or outcome, "usage", None)
    if usage is None:
        return {}
    return {kind: value for kind, value in (("input", usage.input), ("output", usage.output),
                                            ("total", usage.total)) if value}


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


def progress_bar(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a nicety: the batch runs without it
        return None
    return tqdm(total=total, unit="row", desc="dbmagic.batch", leave=True)


def _show(bar: Any, rows: Rows) -> None:
    bar.n = rows.done
    rate = rows.limiter.rate
    pace = f"{rate:.1f} {rows.limiter.tokens} tokens/s" if rate is not None and rows.limiter.tokens else \
        f"{rate:.1f}/s" if rate is not None else None
    bar.set_postfix(failed=rows.failed, **({"pace": pace} if pace else {}), refresh=False)
    bar.refresh()
