"""Hostile input and injected faults: a short dbmagic error before anything is sent, never a raw
traceback; every fault ends in the right answer or a clear error, in bounded time, with threads
released. The fault suite runs through the magic, the panel and a batch (pytest -m faults)."""

from __future__ import annotations

import math
import re
import threading
import time

import pytest
from IPython.core.error import UsageError

import dbmagic
from dbmagic import Client, RetryPolicy, SettingError, Timeouts
from dbmagic.frontends.panel import Panel
from dbmagic.testing import Endpoint

from .conftest import CHAT, CUSTOM

LONG = "e" * 10_000


def posts(workspace):
    return [r for r in workspace.requests if r.method == "POST"]


@pytest.mark.parametrize("line, body, words", [
    (f"-e {CHAT} -t nan", "x", "temperature must be a finite number"),
    (f"-e {CHAT} -t inf", "x", "temperature must be a finite number"),
    (f"-e {CHAT} -p top_p=Infinity", "x", "Infinity is not a finite number"),
    (f"-e {CHAT} -p top_p=NaN", "x", "NaN is not a finite number"),
    (f"-e {CHAT} --timeout 0", "x", "timeout must be above 0"),
    (f"-e {CHAT} --timeout inf", "x", "timeout must be a finite number"),
    (f"-e {CHAT} --timeout 1e300", "x", "timeout must be above 0 and at most 3600"),  # main: a raw OverflowError
    (f"-e {CHAT} --timeout 3601", "x", "timeout must be above 0 and at most 3600"),
    (f"-e {CHAT} -o print", "x", "output must be a valid variable name"),
    (f"-e {CHAT} -o __name__", "x", "output must be a valid variable name"),
    (f"-e {CHAT} -o for", "x", "output must be a valid variable name"),
    (f"-e {CHAT} --cluster-id c-1 --port 7", "x", "Give either an endpoint or a driver-proxy app"),
    (f"-e {LONG}", "x", "endpoint must be at most 255 characters"),
    (f"-e {CHAT} -p deep=" + "[" * 5000 + "]" * 5000, "x", "nested too deeply"),
    (f"-e {CHAT}", "{{ 1 / 0 }}", "failed at line 1: ZeroDivisionError"),
    (f"-e {CHAT}", "line one\n{{ boom() }}", "failed at line 2: RuntimeError: boom"),
    (f"-e {CHAT}", "{% include 'other.txt' %}", "The prompt template failed at line 1"),
    (f"-e {CHAT}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed without end"),
    (f"-e {CHAT} --transform-input add_bytes", "x", "Cannot send: messages[0].content is a bytes"),
    (f"-e {CHAT} --transform-input add_set", "x", "Cannot send: tags is a set"),
    ("--cluster-id .. --port 7777", "x", "cluster_id must be a plain name"),
    ("--cluster-id c-1 --port 7777 --org-id ../2", "x", "org_id must be a plain name"),
    (f"-e {CHAT} --temprature 1", "x", "Unknown option '--temprature'"),
])
def test_bad_input_is_a_short_error_and_sends_nothing(shell, workspace, line, body, words):
    shell.user_ns["boom"] = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
    shell.run_cell("def add_bytes(**r):\n    return {'messages': [{'role': 'user', 'content': b'raw'}]}\n"
                   "def add_set(**r):\n    r['tags'] = {'a'}\n    return r\n")
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("dbllm", line, body)
    assert words in str(info.value)
    assert len(str(info.value)) < 700  # bounded, whatever was typed
    assert posts(workspace) == []


def test_non_finite_and_bad_timeouts_are_refused_everywhere(shell, workspace):
    magics = next(c for c in shell.configurables if type(c).__name__ == "DbLLM")
    shell.run_line_magic("config", "DbLLM.temperature = float('nan')")
    assert magics.temperature is None
    for bad in (float("nan"), float("inf"), 0, -1):
        with pytest.raises(SettingError, match="must be a number of seconds above 0 and at most 3600"):
            Timeouts(read=bad)
    with pytest.raises(SettingError, match="at most 3600"):
        Timeouts(connect=1e300)
    for call in ("complete", "stream"):
        with pytest.raises(SettingError, match="timeout must be above 0 and at most 3600"):
            getattr(Client(host=workspace.host, token=workspace.token), call)("x", endpoint=CHAT, timeout=1e300)
    with pytest.raises(SettingError, match="at most 3600"):
        dbmagic.batch("{{ row }}", ["a"], endpoint=CHAT, timeout=1e300,
                      client=Client(host=workspace.host, token=workspace.token), progress=False)
    with pytest.raises(SettingError, match="timeout must be"):
        Client(host=workspace.host, token=workspace.token).complete("x", endpoint=CHAT, timeout=math.inf)
    assert posts(workspace) == []


def test_raw_sends_braces_verbatim_and_dashes_start_a_prompt(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {CHAT} --raw", "{{ not_a_variable }} and {% also not %}")
    assert posts(workspace)[-1].json["messages"][-1]["content"] == "{{ not_a_variable }} and {% also not %}"
    shell.run_line_magic("dbllm", f"-e {CHAT} -5 degrees outside?")
    assert posts(workspace)[-1].json["messages"][-1]["content"] == "-5 degrees outside?"
    shell.run_line_magic("dbllm", f"-e {CHAT} -- --not-an-option")
    assert posts(workspace)[-1].json["messages"][-1]["content"] == "--not-an-option"


def test_an_answer_with_a_lone_surrogate_renders(shell, workspace):
    workspace.add_endpoint(Endpoint("odd", None, "CUSTOM_MODEL", predict=lambda records: ["bad \ud800 text"]))
    shell.run_cell_magic("dbllm", "-e odd -f text", "x")
    assert shell.display_pub.outputs[-1]["data"]["text/plain"] == "bad \ufffd text"


def test_a_body_cut_short_is_a_cut_answer_and_a_dropped_request_is_not_sent_again(client, workspace):
    workspace.fail(CHAT, short_body=True)
    with pytest.raises(dbmagic.AnswerCut, match="was cut: the body ended before its length"):
        client.complete("x", endpoint=CHAT)
    workspace.fail(CHAT, drop=True)
    with pytest.raises(dbmagic.ConnectionFailed, match="dropped after the request .* was sent"):
        client.complete("x", endpoint=CHAT)
    assert len(posts(workspace)) == 2  # one each: neither was sent again


# -- the fault suite: each fault through the magic, the panel and a batch --------------------------------

FAULTS = [
    # (id, fault kwargs, times, what the user gets: an answer, or words of the error)
    ("429 burst with Retry-After", {"status": 429, "retry_after": 0}, 2, "answer"),
    ("429 burst without Retry-After", {"status": 429}, 2, "answer"),
    ("429 with Retry-After nan", {"status": 429, "retry_after": "nan"}, 1, "answer"),
    ("429 with Retry-After -5", {"status": 429, "retry_after": "-5"}, 1, "answer"),
    ("429 with Retry-After soon", {"status": 429, "retry_after": "soon"}, 1, "answer"),
    ("503 spell", {"status": 503}, 2, "answer"),
    ("500", {"status": 500}, 1, "failed"),
    ("502", {"status": 502}, 1, "failed"),
    ("504", {"status": 504}, 1, "timed out"),
    ("slow first byte past the read timeout", {"delay": 1.5}, 1, "sent no answer within 0.5 s"),
    ("reset before the response", {"drop": True}, 1, "dropped after the request"),
    ("short body", {"short_body": True}, 1, "was cut"),
    ("cut stream", {"cut_after": 2}, 1, "was cut"),
    ("non-JSON body", {"malformed": True}, 1, "not JSON"),
    ("HTML error page", {"status": 502, "body": "<html><title>502 Bad Gateway</title></html>"}, 1,
     "an HTML error page: 502 Bad Gateway"),
    ("echoed Authorization", {"status": 400, "body": "bad header: Authorization: Bearer {token}"}, 1,
     "Authorization: Bearer ***"),
]


def _fault(workspace, kwargs, times, name=CHAT):
    kwargs = {k: (v.format(token=workspace.token) if isinstance(v, str) else v) for k, v in kwargs.items()}
    workspace.fail(name, times=times, **kwargs)


def _descriptors() -> int:
    import gc
    import os

    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def _settles(check) -> bool:
    deadline = time.monotonic() + 3
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _threads_settle(before: int = 0) -> bool:
    """dbmagic's own threads (stream readers, panel workers, batch workers) are all gone again."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        ours = [t for t in threading.enumerate() if t.name.startswith("dbmagic-") and t.name != "dbmagic-local-workspace"]
        if len(ours) <= before:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.faults
@pytest.mark.parametrize("case", FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_through_the_magic(case, shell, workspace):
    _, kwargs, times, expected = case
    dbmagic.configure(retry=RetryPolicy(backoff=0.01, max_backoff=0.05), timeouts=Timeouts(connect=2, read=0.5))
    before = 0
    started = time.monotonic()
    _fault(workspace, kwargs, times)
    if expected == "answer":
        shell.run_cell_magic("dbllm", f"-e {CHAT}", "one two three")
        assert shell.user_ns["_dbllm"].text == "Echo: one two three"
    else:
        with pytest.raises(UsageError) as info:
            shell.run_cell_magic("dbllm", f"-e {CHAT}", "one two three")
        assert expected in str(info.value) and workspace.token not in str(info.value)
    assert time.monotonic() - started < 5  # no hang past its timeout
    assert _threads_settle(before)


@pytest.mark.faults
@pytest.mark.parametrize("case", FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_through_the_panel(case, shell, workspace):
    _, kwargs, times, expected = case
    dbmagic.configure(retry=RetryPolicy(backoff=0.01, max_backoff=0.05), timeouts=Timeouts(connect=2, read=0.5))
    p = Panel(shell)
    before = 0
    _fault(workspace, kwargs, times)
    p.endpoint.value, p.prompt.value = CHAT, "one two three"
    p.send()
    p.wait(10)
    assert not p.running
    status = p.status.value
    if expected == "answer":
        assert p.output.outputs[-1]["data"]["text/markdown"] == "Echo: one two three", status
    else:
        import html

        assert expected in html.unescape(status) and workspace.token not in status
    assert _threads_settle(before)


@pytest.mark.faults
@pytest.mark.parametrize("case", FAULTS, ids=[f[0] for f in FAULTS])
def test_faults_through_a_batch(case, workspace):
    name, kwargs, times, expected = case
    if name == "cut stream":  # a batch does not stream: the fault never comes up
        expected = "answer"
    descriptors = _descriptors()
    client = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(backoff=0.01, max_backoff=0.05),
                    timeouts=Timeouts(connect=2, read=0.5))
    before = 0
    _fault(workspace, kwargs, times)
    result = dbmagic.batch("{{ row }}", ["one", "two"], endpoint=CHAT, concurrency=1, client=client, progress=False)
    if expected == "answer":
        assert result.failed == [] and result.texts == ["Echo: one", "Echo: two"]
    else:  # the faulted row keeps its error in its place; the other row is answered
        assert result.failed == [0] and expected in result.errors[0] and result.texts[1] == "Echo: two"
        assert workspace.token not in result.errors[0]
    client.close()
    assert _threads_settle(before)
    assert _settles(lambda: _descriptors() <= descriptors + 1)  # the client's connections are released


def test_an_expired_notebook_token_is_read_again(workspace):
    from dbmagic.transport.credentials import Credentials

    tokens = iter(["expired-token", workspace.token])
    creds = Credentials(workspace.host, "notebook context", auth_type="notebook token",
                        _header_factory=lambda: {"Authorization": f"Bearer {next(tokens, workspace.token)}"})
    assert Client(credentials=creds).complete("x", endpoint=CHAT, task="chat").text == "Echo: x"
    assert [r.authorized for r in posts(workspace)] == [False, True]


def test_custom_model_answers_that_are_not_text_are_shown(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {CUSTOM}", "plain")
    assert shell.display_pub.outputs[-1]["data"]["text/markdown"] == "Echo: plain"


def test_a_verbose_traceback_shows_no_token(shell, workspace, capsys):
    # %xmode Verbose prints every frame's locals: the token is never a plain string local
    shell.run_line_magic("xmode", "Verbose")
    shell.run_cell("import os, dbmagic\ndbmagic.get_client().complete('x', endpoint='no-such-endpoint')\n")
    shell.run_cell("os.environ['DATABRICKS_HOST'] = 'http://evil.example.com'")
    shell.run_cell("dbmagic.configure().whoami()\n")  # fails inside the credential sources
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # without the colours
    assert "EndpointNotFound" in out and "Refusing plain http://" in out
    assert "env=<environment>" in out and "token = Secret('***')" in out  # the locals Verbose printed
    assert workspace.token not in out


def test_ctrl_c_ends_a_retry_wait_or_a_blocked_read_within_a_second(workspace):
    import os
    import signal

    client = Client(host=workspace.host, token=workspace.token)
    for fault in ({"status": 429, "retry_after": 30}, {"delay": 30}):
        workspace.fail(CHAT, **fault)
        timer = threading.Timer(0.3, os.kill, args=(os.getpid(), signal.SIGINT))  # a real interrupt
        started = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            client.complete("x", endpoint=CHAT)
        timer.cancel()
        assert time.monotonic() - started < 1.3, fault


def test_server_text_is_scrubbed_wherever_it_is_shown_or_stored(shell, workspace, capsys):
    """On main the request id of an error, a 200 body that is not JSON and the served model of an
    answer reached the cell, `%dbllm last`, the output metadata and the batch error column as sent."""
    token = workspace.token
    hostile = {"x-request-id": f"req-{token}", "served-model-name": f"model-{token}"}
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "model": f"m-{token}", "object": "chat.completion"}
    shown = []
    workspace.fail(CHAT, 500, headers=hostile)
    with pytest.raises(UsageError) as error:
        shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "x")
    shown.append(str(error.value))
    workspace.fail(CHAT, 200, body=f"<html>oops {token}</html>")
    with pytest.raises(UsageError) as error:
        shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "x")
    shown.append(str(error.value))
    workspace.fail(CHAT, 200, body=answer, headers=hostile)
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "x")
    shell.run_line_magic("dbllm", "last")
    shown += [repr(o) for o in shell.display_pub.outputs]
    workspace.fail(CHAT, 200, body=f"not json {token}")
    result = dbmagic.batch("{{ row }}", ["a"], endpoint=CHAT, progress=False)
    shown += result.errors
    shown.append(capsys.readouterr().out)
    assert "not JSON" in shown[1] and "not JSON" in result.errors[0]
    assert all(token not in text for text in shown), [t for t in shown if token in t]
    assert any("req-***" in text for text in shown) and any("model-***" in text or "m-***" in text for text in shown)


@pytest.mark.parametrize("call", ["complete", "stream"])
def test_ctrl_c_while_waiting_shows_no_authorization_header_in_a_verbose_traceback(shell, workspace, capsys, call):
    """On main the interrupt's traceback ran through requests' and urllib3's frames, whose locals
    (printed by %xmode Verbose) hold the request's headers."""
    import _thread

    shell.run_line_magic("xmode", "Verbose")
    workspace.fail(CHAT, delay=2)  # no answer, and for a stream no first byte, until Ctrl-C
    timer = threading.Timer(0.4, _thread.interrupt_main)
    timer.start()
    try:
        shell.run_cell(f"import dbmagic\nanswer = dbmagic.get_client().{call}('x', endpoint={CHAT!r})\n"
                       "list(answer) if hasattr(answer, '__iter__') and not isinstance(answer, str) else answer")
    finally:
        timer.cancel()
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "KeyboardInterrupt" in out
    assert "Authorization" not in out and "Bearer" not in out and workspace.token not in out
    assert "urllib3" not in out and "requests/sessions.py" not in out  # the traceback ends in dbmagic


@pytest.mark.parametrize("token, problem", [("dapi-good\nX-Injected: 1", "a line break"),
                                            ("dapi-tökén", "not plain ASCII"), ("dapi\x7f", "a control character")])
def test_a_token_http_cannot_carry_is_refused_before_sending_without_showing_it(workspace, token, problem):
    with pytest.raises(dbmagic.ConfigurationError) as info:
        Client(host=workspace.host, token=token).complete("x", endpoint=CHAT)
    assert problem in str(info.value) and token not in str(info.value) and "dapi" not in str(info.value)
    assert workspace.requests == []


def test_messages_name_what_the_user_called_and_options_a_kind_cannot_use(shell, workspace, capsys):
    from dbmagic.call import wire as _wire

    client = Client(host=workspace.host, token=workspace.token)
    for call in (client.complete, client.stream):
        with pytest.raises(TypeError, match=rf"^Client.{call.__name__}\(\) got an unexpected keyword argument 'bogus'"):
            call("x", endpoint=CHAT, bogus=1)
    with pytest.raises(TypeError, match=r"^dbmagic.batch\(\) got an unexpected keyword argument 'bogus'"):
        dbmagic.batch("{{ row }}", ["a"], endpoint=CHAT, client=client, bogus=1)
    assert _wire.json_problem({"x": object()}) == "x is an object"
    # one rule for options a kind cannot use: --system was silently dropped on main, --chat refused
    from .conftest import EMBEDDINGS

    with pytest.raises(UsageError, match=f"--system sets the system prompt with a chat or agent endpoint, and "
                                         f"endpoint '{EMBEDDINGS}' takes embeddings requests"):
        shell.run_cell_magic("dbllm", f"-e {EMBEDDINGS} --system terse", "x")
    with pytest.raises(dbmagic.ConfigurationError, match="--system sets the system prompt"):
        client.complete("x", endpoint=EMBEDDINGS, system="terse")
    assert posts(workspace) == []
    shell.run_cell_magic("dbllm", f"-e {CHAT} --max-tokens 1 --no-stream", "a long answer")
    assert "cut at the token limit (finish_reason=length): raise --max-tokens" in capsys.readouterr().out
