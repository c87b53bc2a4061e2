"""dbmagic.batch and %%dbllm --over against the local workspace: order, errors in place, pacing
under a rate limit (the server's log proves the backoff), Ctrl-C and resume, DataFrames."""

from __future__ import annotations

import _thread
import re
import threading
import time

import pandas as pd
import pytest
from IPython.core.error import UsageError

import dbmagic
from dbmagic import BatchResult, Client, RateLimited, RetryPolicy, TemplateError
from dbmagic.testing import Endpoint

from .conftest import CHAT, CUSTOM


def invocations(ws, name):
    return [r for r in ws.requests if r.path == f"/serving-endpoints/{name}/invocations"]


def prompt_of(request):
    return request.json["messages"][-1]["content"]


@pytest.fixture
def fast(workspace):
    """A client whose backoff without Retry-After is short, so the tests do not wait for seconds."""
    c = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(backoff=0.05, max_backoff=0.2))
    yield c
    c.close()


def test_answers_keep_the_input_order(workspace, fast):
    workspace.add_endpoint(Endpoint("slowish", "llm/v1/chat", latency=0.02))
    workspace.fail("slowish", delay=0.3)  # the first request to arrive answers last
    rows = [f"row {i}" for i in range(12)]
    result = dbmagic.batch("Say {{ row }}", rows, endpoint="slowish", concurrency=4, client=fast, progress=False)
    assert isinstance(result, BatchResult)
    assert result.texts == [f"Echo: Say row {i}" for i in range(12)]
    assert result.failed == [] and result.missing == []
    assert result.usage == dbmagic.Usage(input=36, output=48, total=84)
    assert re.match(r"12 rows in \d+\.\d s \(\d+\.\d rows/s\): 12 answered, 0 failed, 36 tokens in, 48 out\.$", result.summary())


def test_rows_run_concurrently_up_to_the_cap(workspace, fast):
    workspace.fail(CHAT, gather=4, times=4, gather_timeout=5)  # held until four are in flight together
    result = dbmagic.batch("{{ row }}", list("abcd"), endpoint=CHAT, concurrency=4, client=fast, progress=False)
    assert result.failed == []


def test_a_failed_row_keeps_its_place_and_its_error(workspace, fast):
    workspace.add_endpoint(Endpoint("picky", None, "CUSTOM_MODEL", predict=lambda records: [
        r["prompt"].upper() if "bad" not in r["prompt"] else 1 / 0 for r in records]))
    rows = [{"text": "good one"}, {"text": "bad one"}, {"text": "good two"}, {"oops": "no text"}]
    result = dbmagic.batch("{{ text }}", rows, endpoint="picky", client=fast, progress=False)
    assert result.values[0] == "GOOD ONE" and result.values[2] == "GOOD TWO"
    assert result.failed == [1, 3]
    assert "Model prediction failed: ZeroDivisionError" in result.errors[1]
    assert "uses 'text', which is not defined in row 3 (its values: oops)" in result.errors[3]
    sent = {r["prompt"] for call in invocations(workspace, "picky") for r in call.json["dataframe_records"]}
    assert sent == {"good one", "bad one", "good two"}  # the row that could not render sent nothing


def test_a_rate_limited_endpoint_slows_the_batch_and_loses_no_row(workspace, fast):
    workspace.add_endpoint(Endpoint("limited", "llm/v1/chat", latency=0.02, rate_limit=10))
    rows = [f"r{i}" for i in range(30)]
    result = dbmagic.batch("{{ row }}", rows, endpoint="limited", concurrency=8, client=fast, progress=False)
    assert result.failed == [] and result.texts == [f"Echo: r{i}" for i in range(30)]
    log = invocations(workspace, "limited")
    limited = [r for r in log if r.status == 429]
    assert limited, "the endpoint never said 429: the test proves nothing"
    # the whole batch honoured each Retry-After: nothing arrived while the endpoint had said to wait
    for answer in limited:
        until = answer.at + float(answer.retry_after)
        early = [r for r in log if answer.at + 0.05 < r.at < until - 0.02]
        assert not early, f"{len(early)} requests arrived within a Retry-After of {answer.retry_after} s"


def test_a_429_spell_without_retry_after_backs_off(workspace):
    # the backoff's jitter drawn at its top (full jitter may draw a pause of ~0 s: on main this test
    # failed about once in eight runs): a client's jitter is a seam, passed in
    steady = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(backoff=0.05, max_backoff=0.2),
                    jitter=lambda: 1.0)
    workspace.fail(CHAT, 429, times=3)  # no Retry-After: the batch's own backoff
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(6)], endpoint=CHAT, concurrency=3, client=steady,
                           progress=False)
    assert result.failed == []
    log = invocations(workspace, CHAT)
    assert [r.status for r in log].count(429) == 3 and len(log) == 9
    first_ok = next(r.at for r in log if r.status == 200)
    assert first_ok - log[0].at >= 0.02  # a pause came between the 429s and the first answer


def test_a_row_past_the_retry_deadline_fails_with_the_429(workspace):
    client = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(deadline=0.3, backoff=0.1))
    workspace.fail(CHAT, 429, times=100, retry_after=0.2)
    result = dbmagic.batch("{{ row }}", ["only"], endpoint=CHAT, client=client, progress=False)
    assert result.failed == [0] and isinstance(result[0], RateLimited)


def test_ctrl_c_keeps_the_answers_on_their_way_and_resume_sends_only_the_rest(workspace, fast, capsys):
    """On main the pair in flight at a Ctrl-C was cancelled: sent, paid for, and dropped."""
    workspace.add_endpoint(Endpoint("steady", "llm/v1/chat", latency=0.5))
    rows = [f"r{i}" for i in range(12)]
    started = time.monotonic()
    timer = threading.Timer(0.75, _thread.interrupt_main)  # the second pair is half way
    timer.start()
    try:
        first = dbmagic.batch("{{ row }}", rows, endpoint="steady", concurrency=2, client=fast, progress=False)
        returned = time.monotonic()
    finally:
        timer.cancel()
    assert first.interrupted
    assert returned - started < 1.4  # it waited for the pair in flight (due at 1.0 s), and sent no third
    done = [i for i, text in enumerate(first.texts) if text]
    assert done == [0, 1, 2, 3] and first.missing == list(range(4, 12)) == first.failed  # each says why
    assert "8 failed (8 not sent (interrupted))" in first.summary()
    assert all(e.startswith(f"Row {i} was not sent: the batch was interrupted (Ctrl-C) first")
               for i, e in enumerate(first.errors) if i >= 4)
    assert "keeping the 2 answers on the way for up to 2 s" in capsys.readouterr().out
    time.sleep(0.4)  # the requests that were on their way when Ctrl-C came land before the log is cleared
    workspace.requests.clear()
    second = dbmagic.batch("{{ row }}", rows, endpoint="steady", concurrency=10, client=fast, progress=False,
                           resume=first)
    assert second.texts == [f"Echo: r{i}" for i in range(12)]
    assert sorted(prompt_of(r) for r in invocations(workspace, "steady")) == sorted(rows[4:])  # only the missing


def test_an_answer_later_than_the_grace_is_dropped_and_a_second_ctrl_c_does_not_wait(workspace, fast):
    workspace.add_endpoint(Endpoint("slow", "llm/v1/chat", latency=1.0))
    timers = [threading.Timer(0.2, _thread.interrupt_main)]
    timers[0].start()
    started = time.monotonic()
    try:
        result = dbmagic.batch("{{ row }}", ["a", "b"], endpoint="slow", concurrency=2, client=fast, progress=False,
                               grace=0.2)
    finally:
        timers[0].cancel()
    assert time.monotonic() - started < 0.8 and result.interrupted
    assert [c.finish_reason for c in result] == ["interrupted", "interrupted"]  # what arrived: nothing
    timers = [threading.Timer(t, _thread.interrupt_main) for t in (0.2, 0.4)]  # Ctrl-C, then Ctrl-C again
    for t in timers:
        t.start()
    started = time.monotonic()
    try:
        result = dbmagic.batch("{{ row }}", ["c"], endpoint="slow", client=fast, progress=False, grace=30.0)
    finally:
        for t in timers:
            t.cancel()
    assert time.monotonic() - started < 0.9 and result[0].finish_reason == "interrupted"


def test_resume_sends_failed_rows_again(workspace, fast):
    workspace.fail(CHAT, 400, times=2)
    first = dbmagic.batch("{{ row }}", list("abcde"), endpoint=CHAT, concurrency=1, client=fast, progress=False)
    assert first.failed == [0, 1]
    workspace.requests.clear()
    second = dbmagic.batch("{{ row }}", list("abcde"), endpoint=CHAT, client=fast, progress=False, resume=first)
    assert second.failed == [] and sorted(prompt_of(r) for r in invocations(workspace, CHAT)) == ["a", "b"]


def test_transforms_apply_per_row(workspace, fast):
    def tag(**request):
        request["prompt"] = f"[{len(request['prompt'])}] {request['prompt']}"
        return request

    result = dbmagic.batch("{{ row }}", ["ab", "abcd"], endpoint=CHAT, client=fast, progress=False,
                           transform_input=tag, transform_output=str.upper, system="S", temperature=0.1)
    assert result.values == ["[S] ECHO: [2] AB", "[S] ECHO: [4] ABCD"]
    assert invocations(workspace, CHAT)[0].json["temperature"] == 0.1


def test_a_dataframe_in_a_dataframe_out(workspace, fast):
    df = pd.DataFrame({"text": ["one", "two", "three"], "lang": ["en", "en", "fr"]})
    out = dbmagic.batch("Translate {{ text }} from {{ lang }}", df, endpoint=CHAT, client=fast, progress=False,
                        column="translated")
    assert list(out.columns) == ["text", "lang", "translated", "error"]
    assert out["translated"].tolist() == ["Echo: Translate one from en", "Echo: Translate two from en",
                                          "Echo: Translate three from fr"]
    assert out["error"].isna().all() and "translated" not in df.columns  # a copy
    with pytest.raises(TemplateError, match=r"The template uses langue, which is not a column of the DataFrame "
                                            r"\(its columns: text, lang\)"):
        dbmagic.batch("{{ text }} {{ langue }}", df, endpoint=CHAT, client=fast, progress=False)
    workspace.fail(CHAT, 400, times=1)
    partial = dbmagic.batch("{{ text }}", df, endpoint=CHAT, concurrency=1, client=fast, progress=False)
    assert partial["error"].notna().tolist() == [True, False, False]
    workspace.requests.clear()
    resumed = dbmagic.batch("{{ text }}", df, endpoint=CHAT, client=fast, progress=False, resume=partial)
    assert resumed["answer"].tolist() == ["Echo: one", "Echo: two", "Echo: three"]
    assert [prompt_of(r) for r in invocations(workspace, CHAT)] == ["one"]


def test_bad_batch_input_is_refused_before_sending(workspace, fast):
    with pytest.raises(dbmagic.ConfigurationError, match="rows must be a list of strings or dicts"):
        dbmagic.batch("{{ row }}", "just one string", endpoint=CHAT, client=fast)
    with pytest.raises(dbmagic.ConfigurationError, match="concurrency must be a whole number of at least 1"):
        dbmagic.batch("{{ row }}", ["a"], endpoint=CHAT, client=fast, concurrency=0)
    assert workspace.requests == []


def test_progress_bar_shows_rows_and_failed(workspace, fast, capsys):
    dbmagic.batch("{{ row }}", ["a", "b"], endpoint=CHAT, client=fast, concurrency=2)
    err = capsys.readouterr().err
    assert "2/2" in err and "failed=0" in err and "row/s" in err


def test_over_in_the_magic(shell, workspace):
    shell.user_ns["tickets"] = pd.DataFrame({"text": ["printer on fire", "password reset"]})
    shell.user_ns["labels"] = "hardware, account"
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over tickets --column label -o labelled --concurrency 2",
                         "Classify {{ text }} as one of {{ labels }}")
    out = shell.user_ns["labelled"]
    assert out["label"].tolist() == ["Echo: Classify printer on fire as one of hardware, account",
                                     "Echo: Classify password reset as one of hardware, account"]
    assert isinstance(shell.user_ns["_dbllm"], BatchResult)
    shell.user_ns["texts"] = ["x", "y"]
    shell.run_line_magic("dbllm", f"-e {CUSTOM} --over texts -o scores Score {{{{ row }}}}")
    assert shell.user_ns["scores"].values == ["Echo: Score x", "Echo: Score y"]
    with pytest.raises(UsageError, match="--over nope: the notebook has no variable 'nope'"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over nope", "x")
    with pytest.raises(UsageError, match="drop --chat"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over texts --chat", "x")


def test_over_prints_one_summary_line_and_dry_run_shows_the_first_row(shell, workspace, capsys):
    shell.user_ns["texts"] = ["first", "second"]
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over texts --dry-run", "About {{ row }}")
    assert "About first" in shell.display_pub.outputs[-1]["data"]["text/plain"]
    assert invocations(workspace, CHAT) == []
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over texts", "About {{ row }}")
    out = capsys.readouterr().out
    assert re.search(r"^2 rows in \d+\.\d s \(\d+\.\d rows/s\): 2 answered, 0 failed, \d+ tokens in, \d+ out\.$", out, re.M)


def test_a_column_or_variable_named_self_fills_the_template_like_any_other(shell, workspace, fast):
    """On main every template failed with "got multiple values for argument 'self'"."""
    frame = pd.DataFrame({"self": ["me"], "text": ["hi"]})
    out = dbmagic.batch("{{ self }}: {{ text }}", frame, endpoint=CHAT, client=fast, progress=False)
    assert out["answer"].tolist() == ["Echo: me: hi"]
    shell.user_ns["self"] = "a notebook variable"
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream -o said", "{{ self }}")
    assert shell.user_ns["said"] == "Echo: a notebook variable"


def test_output_columns_never_overwrite_input_columns(shell, workspace, fast):
    df = pd.DataFrame({"text": ["a"], "error": ["kept"], "answer": ["mine"]})
    cases = [({}, "already has a column 'answer'"), ({"column": "text"}, "already has a column 'text'"),
             ({"column": "out", "error_column": "answer"}, "already has a column 'answer'"),
             ({"column": "out"}, "already has a column 'error'"),
             ({"column": "same", "error_column": "same"}, "both 'same'")]
    for kwargs, message in cases:
        with pytest.raises(dbmagic.ConfigurationError, match=message):
            dbmagic.batch("{{ text }}", df, endpoint=CHAT, client=fast, progress=False, **kwargs)
    shell.user_ns["df"] = pd.DataFrame({"text": ["a"]})
    with pytest.raises(UsageError, match="already has a column 'text'.*--column"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over df --column text", "{{ text }}")
    assert invocations(workspace, CHAT) == []


def test_duplicate_column_names_are_refused_with_their_names(workspace, fast):
    df = pd.DataFrame([["a", "b", 1]], columns=["text", "text", "n"])
    with pytest.raises(dbmagic.ConfigurationError, match="more than one column named 'text'"):
        dbmagic.batch("{{ text }}", df, endpoint=CHAT, client=fast, progress=False)
    assert invocations(workspace, CHAT) == []


def test_resume_treats_every_pandas_missing_value_as_not_answered(workspace, fast):
    df = pd.DataFrame({"text": ["one", "two", "three"]})
    previous = df.assign(answer=["Echo: one", None, "Echo: three"], error=[None, "HTTP 500", None])
    for kept in (previous.convert_dtypes(), previous.astype("string")):  # pd.NA where the value is missing
        workspace.requests.clear()
        out = dbmagic.batch("{{ text }}", df, endpoint=CHAT, client=fast, progress=False, resume=kept)
        assert out["answer"].tolist() == ["Echo: one", "Echo: two", "Echo: three"]
        assert [prompt_of(r) for r in invocations(workspace, CHAT)] == ["two"]


def test_a_row_with_a_missing_value_gets_no_call_a_null_answer_and_an_error_naming_the_column(shell, workspace, fast):
    import numpy as np

    df = pd.DataFrame({"text": ["one", None, np.nan, "four"], "lang": ["en", "en", "en", None]})
    df["text"] = df["text"].astype("string")  # None and NaN become pd.NA
    out = dbmagic.batch("{{ text }} ({{ lang }})", df, endpoint=CHAT, client=fast, progress=False)
    assert out["answer"].tolist()[0] == "Echo: one (en)" and out["answer"].isna().tolist() == [False, True, True, True]
    assert "Row 1 was not sent: its 'text' is missing" in out["error"][1]
    assert "its 'lang' is missing" in out["error"][3] and "send_missing=True" in out["error"][3]
    assert [prompt_of(r) for r in invocations(workspace, CHAT)] == ["one (en)"]
    listed = dbmagic.batch("{{ row }}", ["a", None], endpoint=CHAT, client=fast, progress=False)
    assert listed.texts == ["Echo: a", None] and "'row' is missing" in listed.errors[1]
    sent = dbmagic.batch("{{ row }}", ["a", None], endpoint=CHAT, client=fast, progress=False, send_missing=True)
    assert sent.texts == ["Echo: a", "Echo: None"]
    shell.user_ns["rows"] = ["x", None]
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --send-missing -o got", "{{ row }}")
    assert shell.user_ns["got"].texts == ["Echo: x", "Echo: None"]


def test_a_row_rate_limited_again_and_again_stops_at_its_attempts(workspace):
    """On main one row sent 51 requests with attempts=5."""
    client = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(attempts=3, backoff=0.01,
                                                                                  max_backoff=0.02))
    workspace.fail(CHAT, 429, times=10_000, retry_after=0.01)
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(6)], endpoint=CHAT, concurrency=2, client=client,
                           progress=False)
    assert result.failed == list(range(6)) and "gave up after 3 attempts" in result.errors[0]
    per_row: dict[str, int] = {}
    for r in invocations(workspace, CHAT):
        per_row[prompt_of(r)] = per_row.get(prompt_of(r), 0) + 1
    assert per_row == {f"r{i}": 3 for i in range(6)}


def test_a_429_storm_ends_the_batch_once_nothing_answered_for_the_deadline(workspace):
    """On main a storm took about rows x deadline: each row waited out its own."""
    client = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(attempts=1000, deadline=0.5))
    workspace.fail(CHAT, 429, times=10_000, retry_after=0.05)
    started = time.monotonic()
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(40)], endpoint=CHAT, concurrency=2, client=client,
                           progress=False)
    took = time.monotonic() - started
    assert result.failed == list(range(40)) and all(isinstance(item, RateLimited) for item in result)
    unsent = {f"r{i}" for i in range(40)} - {prompt_of(r) for r in invocations(workspace, CHAT)}
    assert unsent and all("Not sent" in result.errors[int(name[1:])] for name in unsent)
    assert took < 2.0, took  # one deadline (0.5 s) and a little; 40 deadlines one after another on main


def test_a_batch_looks_its_endpoint_up_once(workspace):
    """On main 16 rows made 6 look-ups: the first calls raced to fill the cache."""
    workspace.add_endpoint(Endpoint("looked-up", "llm/v1/chat", latency=0.01))
    workspace.fail("/api/2.0/serving-endpoints/looked-up", delay=0.2)  # a slow look-up: the race is wide open
    client = Client(host=workspace.host, token=workspace.token)
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(16)], endpoint="looked-up", concurrency=8,
                           client=client, progress=False)
    assert result.failed == []
    lookups = [r for r in workspace.requests if r.path == "/api/2.0/serving-endpoints/looked-up"]
    assert len(lookups) == 1


@pytest.mark.parametrize("kind", ["input", "output"])
def test_an_endpoint_limited_in_tokens_is_paced_by_tokens_and_loses_no_row(workspace, fast, kind):
    """Issue 34: a token limit (ITPM or OTPM; here per second, the local workspace's quick stand-in
    for Databricks' minute) was paced as requests. The batch now counts tokens once a 429 names
    them: every row answered, few 429s, and the pace said in tokens."""
    workspace.add_endpoint(Endpoint("tokens", "llm/v1/chat", latency=0.02, token_limit=300, token_kind=kind,
                                    token_window="second", retry_after=False))
    rows = [" ".join(f"w{i}" for i in range(20)) + f" row {j}" for j in range(80)]  # 22 tokens in, 23 out
    result = dbmagic.batch("{{ row }}", rows, endpoint="tokens", concurrency=16, client=fast, progress=False)
    assert result.failed == [] and result.texts == [f"Echo: {r}" for r in rows]
    log = invocations(workspace, "tokens")
    limited = [r for r in log if r.status == 429]
    assert limited, "the endpoint never said 429: the test proves nothing"
    assert len(limited) < len(rows) / 2
    assert f"{kind} tokens/s by the endpoint's token limit" in result.summary()


def test_the_local_workspace_refuses_past_a_token_limit_as_databricks_words_it(workspace):
    workspace.add_endpoint(Endpoint("itpm", "llm/v1/chat", token_limit=30, retry_after=False))
    once = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(attempts=1))
    once.complete("one two three four five six seven eight nine ten", endpoint="itpm")
    with pytest.raises(dbmagic.RateLimited) as info:
        once.complete(" ".join(["word"] * 25), endpoint="itpm")  # 10 + 25 > 30 input tokens this minute
    assert "Exceeded the input tokens per minute rate limit" in str(info.value)
    assert info.value.tokens == "input" and info.value.window == 60.0
    once.close()
