"""The batch's limiter (`dbmagic.batching.pace`) on a fake clock: no sleeping, every decision checked."""

from __future__ import annotations

import math

from dbmagic.batching.pace import SHARE, Limiter
from dbmagic.transport.retry import RetryPolicy, backoff

from .conftest import FakeClock


def limiter(cap=16, **policy):
    clock = FakeClock()
    return Limiter(cap, RetryPolicy(**policy), clock, rand=lambda: 1.0), clock


def answer(lim, clock, n, every):
    """``n`` requests, one after another, each answered ``every`` seconds after it started."""
    for _ in range(n):
        permit = lim.acquire()
        clock.now += every
        lim.on_success(permit)


def test_the_cap_bounds_what_is_in_flight_and_nothing_else_limits_until_a_429():
    lim, clock = limiter(cap=2)
    a, b = lim.acquire(), lim.acquire()
    assert lim.delay() == math.inf  # two in flight: wait for one to end
    lim.on_success(a)
    assert lim.delay() == 0 and lim.rate is None
    lim.release(b)
    assert lim.in_flight == 0


def test_a_429_with_retry_after_pauses_every_start_until_then():
    lim, clock = limiter()
    permit = lim.acquire()
    lim.on_rate_limited(permit, 2.5)
    assert lim.delay() == 2.5 and lim.rate is None  # the server said when: no rate is guessed
    clock.now += 2.5
    assert lim.delay() == 0
    lim.on_rate_limited(lim.acquire(), 999.0)
    assert lim.delay() == 60.0  # bounded by the policy's max_retry_after


def test_a_task_obeys_retry_after_and_learns_its_rate_from_it_too():
    """The other tasks of a job did not hear that 429: every task that obeyed its Retry-After and
    started again at its whole concurrency made a storm (bench_cluster: 969 429s for 300 rows)."""
    lim, clock = task_limiter(tasks=4)
    clock.now += 0.1
    answer(lim, clock, 8, 0.25)  # 8 answers in the 2.1 s since it started
    lim.on_rate_limited(lim.acquire(), 0.5)
    assert math.isclose(lim.delay(), 0.5) and math.isclose(lim.rate, SHARE * 8 / 2.1)
    clock.now += 0.5
    lim.acquire()
    clock.now += lim.delay()
    lim.acquire()
    assert math.isclose(lim.delay(), 1 / lim.rate)  # after the pause, at its rate, not all at once


def test_a_429_without_retry_after_sets_the_rate_the_endpoint_accepted():
    lim, clock = limiter(cap=16)
    answer(lim, clock, 20, 0.05)  # 20 requests answered over the last second, then one refused
    refused = lim.acquire()
    lim.on_rate_limited(refused, None)
    assert lim.rate == SHARE * 20  # 19 requests per second
    assert math.isclose(lim.delay(), 1 / lim.rate)
    # starts are spaced at that rate, one at a time
    clock.now += lim.delay()
    lim.acquire()
    assert math.isclose(lim.delay(), 1 / lim.rate)


def test_the_429s_of_requests_sent_at_the_old_rate_count_once():
    lim, clock = limiter()
    answer(lim, clock, 10, 0.1)
    in_flight = [lim.acquire() for _ in range(8)]  # all sent before the endpoint said no
    lim.on_rate_limited(in_flight[0], None)
    rate = lim.rate
    for permit in in_flight[1:]:
        lim.on_rate_limited(permit, None)
    assert lim.rate == rate and lim.epoch == 1 and lim.limited == 8


def test_refused_again_before_any_answer_waits_for_the_window_to_free():
    lim, clock = limiter()
    answer(lim, clock, 20, 0.0025)  # the endpoint accepted 20 within 50 ms: its window is full for a second
    first_answered = clock.now - 20 * 0.0025
    lim.on_rate_limited(lim.acquire(), None)
    clock.now += lim.delay()
    lim.on_rate_limited(lim.acquire(), None)  # still refused, nothing answered since
    assert math.isclose(lim.pause_until, first_answered + 1.0)


def test_a_storm_with_nothing_answered_backs_off_as_the_transport_does():
    lim, clock = limiter(backoff=1.0, max_backoff=8.0)
    waits = []
    for _ in range(5):
        lim.on_rate_limited(lim.acquire(), None)
        waits.append(lim.delay())
        clock.now += lim.delay()
    policy = RetryPolicy(backoff=1.0, max_backoff=8.0)
    assert waits == [backoff(policy, n, lambda: 1.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert lim.quiet_for() == sum(waits)  # what ends a storm at the deadline


def test_the_rate_recovers_with_each_answer():
    lim, clock = limiter()
    answer(lim, clock, 10, 0.1)
    lim.on_rate_limited(lim.acquire(), None)
    low = lim.rate
    start = clock.now
    while clock.now - start < 3:  # three seconds of answers, as fast as the rate lets them start
        clock.now += lim.delay()
        lim.on_success(lim.acquire())
    assert lim.rate >= low + 3  # at least one more request per second each second
    assert lim.backoffs == 0


def test_a_per_minute_limit_is_learned_over_its_minute_and_a_full_minute_waits_for_its_oldest():
    lim, clock = limiter(cap=4)
    first = clock.now
    answer(lim, clock, 30, 1.0)  # 30 answered, one a second: what a per-second limit would call slow
    lim.on_rate_limited(lim.acquire(), None, 60.0)  # "Exceeded the input tokens per minute rate limit"
    assert lim.window == 60.0 and math.isclose(lim.rate, SHARE * 30 / 60)  # 28.5 a minute, not 28.5 a second
    assert math.isclose(lim.delay(), 1 / lim.rate)
    clock.now += lim.delay()
    lim.on_rate_limited(lim.acquire(), None, 60.0)  # refused again at the learned rate: the minute is full
    assert math.isclose(lim.delay(), first + 60.0 - clock.now)  # until its oldest request is a minute old
    clock.now += lim.delay()
    rate = lim.rate
    lim.on_success(lim.acquire())  # growth per answer: 5% a minute, or one request a minute each minute
    assert math.isclose(lim.rate, rate + max(0.05 / 60, 1 / (3600 * rate)))


def test_a_429_that_names_no_limit_is_paced_over_a_second_as_before():
    lim, clock = limiter(cap=16)
    answer(lim, clock, 20, 0.05)
    lim.on_rate_limited(lim.acquire(), None, None)
    assert lim.window == 1.0 and lim.rate == SHARE * 20


# -- one of several tasks on one limit (a Spark job's, issue 34) ---------------------------------------

def task_limiter(tasks, cap=4):
    clock = FakeClock()
    return Limiter(cap, RetryPolicy(), clock, rand=lambda: 1.0, share=1 / tasks), clock


def test_a_task_learns_its_share_over_the_time_it_has_run_not_one_window():
    """On main a task that had one answer in the last second took 0.95 request a second for its
    rate, whatever it had been accepted over the seconds before (a noisy sample of its share)."""
    lim, clock = task_limiter(tasks=4)
    clock.now += 0.1
    answer(lim, clock, 12, 0.25)  # 4 answers a second for three seconds
    clock.now += 0.9  # the last second held one answer: another task's burst took the slots
    lim.on_rate_limited(lim.acquire(), None)
    assert math.isclose(lim.rate, SHARE * 12 / 4.0)  # what it saw accepted in the 4 s since it started


def test_a_task_slows_by_a_step_of_its_own_rate():
    lim, clock = task_limiter(tasks=4)
    answer(lim, clock, 8, 0.25)
    lim.on_rate_limited(lim.acquire(), None)
    first = lim.rate
    clock.now += 0.5
    lim.on_success(lim.acquire())  # an answer at that rate, then a 429 in a new epoch
    rate = lim.rate
    lim.on_rate_limited(lim.acquire(), None)
    assert math.isclose(lim.rate, rate * SHARE) and lim.rate < first


def test_a_task_grows_by_its_share_and_faster_once_no_429_comes():
    alone, clock = limiter()
    task, task_clock = task_limiter(tasks=4)
    for lim, c in ((alone, clock), (task, task_clock)):
        answer(lim, c, 4, 0.25)
        lim.on_rate_limited(lim.acquire(), None)
        lim.rate = 2.0  # the same starting point
        c.now += 0.5
        lim.on_success(lim.acquire())
    assert math.isclose(alone.rate - 2.0, 1 / 2.0)  # one request a second each second, per answer
    assert math.isclose(task.rate - 2.0, 0.25 / 2.0 * 1.5 ** 2)  # its share of that, half a window after the 429
    task_clock.now += 2
    before = task.rate
    task.on_success(task.acquire())
    assert math.isclose(task.rate - before, 0.25 / before * 3.5 ** 2)  # 2.5 windows without a 429
    task_clock.now += 20  # no 429 for 22 windows: the other tasks may have ended
    before = task.rate
    task.on_success(task.acquire())
    assert math.isclose(task.rate - before, 0.25 / before * 11 ** 2)  # at most (QUIET + 1) squared times


def test_a_task_refused_again_slows_rather_than_stopping_for_a_window():
    """One of several tasks: a 429 again before its next answer may be another task's burst, not
    its own rate: stopping for the window (as a lone batch does) left its share unused (a 4-task job
    lost 1 to 4 requests a second of 20)."""
    lim, clock = task_limiter(tasks=4)
    clock.now += 10
    answer(lim, clock, 10, 0.02)  # ten answers within the last 0.2 s (its share: 10 in 4 s)
    lim.on_rate_limited(lim.acquire(), None)
    first = lim.rate
    lim.on_rate_limited(lim.acquire(), None)  # refused again, nothing answered since
    assert math.isclose(lim.rate, first * SHARE)
    assert math.isclose(lim.delay(), 1 / lim.rate)  # its next start at its rate, not when the window frees
    alone, clock = limiter()
    clock.now += 10
    answer(alone, clock, 10, 0.02)
    alone.on_rate_limited(alone.acquire(), None)
    alone.on_rate_limited(alone.acquire(), None)
    assert math.isclose(alone.delay(), 0.8)  # a lone batch: its window is full until the oldest ages out
    lim, clock = task_limiter(tasks=4)
    clock.now += 100
    answer(lim, clock, 10, 0.02)
    lim.on_rate_limited(lim.acquire(), None, 60.0)
    lim.on_rate_limited(lim.acquire(), None, 60.0)
    assert math.isclose(lim.delay(), 59.8)  # a minute's window full: every task must wait for it


def test_a_task_with_nothing_answered_lately_waits_at_most_a_window():
    """Other tasks' answers say the endpoint is up: a task never backs off for the transport's
    growing seconds (on main, 51 s of one job's 40 went to such pauses)."""
    lim, clock = task_limiter(tasks=16)
    for _ in range(6):
        lim.on_rate_limited(lim.acquire(), None)
        assert lim.delay() <= 1.0
        clock.now += lim.delay()
    alone, clock = limiter()
    for _ in range(6):
        alone.on_rate_limited(alone.acquire(), None)
        clock.now += alone.delay()
    assert alone.delay() == 0 and clock.now > 6  # the transport's backoff, growing


def test_the_next_batch_on_an_endpoint_starts_at_the_rate_the_last_one_learned():
    """A Spark worker runs one task after another: each started at its whole concurrency and met
    the 429s its predecessor had learned from."""
    from dbmagic.batching.pace import shared

    url = "https://example.invalid/serving-endpoints/e/invocations"
    with shared("first", lambda: Limiter(4, RetryPolicy(), FakeClock()), endpoint=url) as first:
        first.rate, first.window = 3.5, 1.0
    with shared("second", lambda: Limiter(4, RetryPolicy(), FakeClock()), endpoint=url) as second:
        assert second.rate == 3.5
    with shared("third", lambda: Limiter(4, RetryPolicy(), FakeClock()), endpoint=url + "-other") as other:
        assert other.rate is None


def test_a_bug_in_the_pace_stops_the_batch_rather_than_leaving_rows_without_a_word():
    """On main a worker that raised while waiting for its start died quietly: the batch returned
    with rows that had neither an answer nor an error (found with a clock that could not wait)."""
    import pytest

    from dbmagic.batching.rows import Rows

    class Broken(Limiter):
        def delay(self):
            raise RuntimeError("a bug in the pace")

    items = [None] * 3
    rows = Rows(2, [0, 1, 2], items, RetryPolicy(), FakeClock(), limiter=Broken(2, RetryPolicy(), FakeClock()))
    with pytest.raises(RuntimeError, match="a bug in the pace"):
        rows.run(lambda i: None, progress=False)


# -- token limits (issue 34) ----------------------------------------------------------------------------

def test_a_429_naming_a_token_limit_paces_tokens_learned_from_the_answers_usage():
    lim, clock = limiter()
    for _ in range(10):  # ten answers over a second, 30 input tokens each as their usage said
        permit = lim.acquire()
        clock.now += 0.1
        lim.on_success(permit, {"input": 30, "output": 5, "total": 35})
    lim.on_rate_limited(lim.acquire(), None, 60.0, "input")
    assert lim.tokens == "input"
    # the epoch that named tokens starts afresh: its own 429 says what was accepted, in tokens, over the window
    assert math.isclose(lim.rate, SHARE * 300 / 60.0)  # 4.75 input tokens a second
    first = lim.acquire(cost=60)  # a request estimated at 60 tokens: the next start 60 tokens' time later
    assert math.isclose(lim.delay(), (1 + 60) / lim.rate)  # (after the refused one's single token)
    clock.now += 5
    lim.on_success(first, {"input": 30})  # it used half its estimate
    clock.now += 100
    second = lim.acquire(cost=60)
    assert math.isclose(second.cost, 30.0)  # later estimates are corrected by what the usage said


def test_the_tokens_a_429_names():
    from dbmagic.errors import RateLimited

    def named(message):
        return RateLimited("429", server_message=message)

    assert named("REQUEST_LIMIT_EXCEEDED: Exceeded the input tokens per minute rate limit for this endpoint.").tokens \
        == "input"
    assert named("Exceeded the output tokens per minute rate limit").tokens == "output"
    assert named("AI Gateway TPM limit exceeded").tokens == "total"
    assert named("REQUEST_LIMIT_EXCEEDED: Exceeded workspace QPS rate limit for this endpoint.").tokens is None
    assert named("Exceeded the input tokens per second rate limit").window == 1.0  # the local workspace's stand-in
