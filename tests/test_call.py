"""One call, one path: the `Call` object, the subscribers (hooks), `Usage`, the in-memory transport,
and the structure that keeps the core free of the notebook and of MLflow."""

from __future__ import annotations

import _thread
import dataclasses
import json
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import dbmagic
from dbmagic import (
    AnswerCut,
    Client,
    Completion,
    EndpointTimeout,
    RateLimited,
    RequestTimeout,
    RetryPolicy,
    StatusError,
    StreamInterrupted,
    Subscriber,
    TransportError,
    Usage,
)
from dbmagic.testing import MemoryHandler, TransportFailure, reply

from .conftest import CHAT, FakeClock

HOST = "https://adb-42.3.azuredatabricks.net"
ROOT = Path(__file__).resolve().parent.parent


def chat_answer(text="hi", **extra):
    return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "model": "m-1", **extra}


def memory_client(respond, **kwargs):
    handler = MemoryHandler(respond)
    return Client(host=HOST, token="dapi-memory-secret", handler=handler, **kwargs), handler


# -- the in-memory transport: the whole client path without a socket ---------------------------

def test_a_client_over_the_memory_handler_signs_sends_and_parses():
    client, handler = memory_client(lambda sent: reply(200, chat_answer("Hello", usage={"prompt_tokens": 3,
                                                                                        "completion_tokens": 1})))
    completion = client.complete("Hi", endpoint="my-chat", task="chat", temperature=0.5)
    assert (completion.text, completion.served_model, completion.usage) == ("Hello", "m-1", Usage(3, 1, 4))
    (sent,) = handler.sent
    assert sent.url == f"{HOST}/serving-endpoints/my-chat/invocations"
    assert sent.json == {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.5}
    assert sent.headers["Authorization"] == "Bearer dapi-memory-secret"
    assert "dapi-memory-secret" not in repr(client) + repr(completion)


def test_retries_over_the_memory_handler_use_the_clock_seam_without_sleeping():
    answers = iter([reply(503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "scaling"}),
                    reply(429, {"error_code": "REQUEST_LIMIT_EXCEEDED"}, headers={"Retry-After": "7"})])

    def respond(sent):
        scripted = next(answers, None)
        return scripted if scripted is not None else reply(200, chat_answer())

    clock = FakeClock()
    client, handler = memory_client(respond, clock=clock)
    client.transport.rand = lambda: 0.5
    completion = client.complete("x", endpoint="e", task="chat")
    assert completion.attempts == 3 and len(handler.sent) == 3
    assert clock.sleeps == [0.5, 7.0]  # backoff(1 s) x jitter 0.5, then the server's Retry-After


def test_a_connection_never_made_is_sent_again_one_that_dropped_is_not():
    failures = iter([TransportFailure("connect", "ConnectionRefusedError")])

    def respond(sent):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return reply(200, chat_answer())

    client, handler = memory_client(respond, clock=FakeClock())
    assert client.complete("x", endpoint="e", task="chat").text == "hi" and len(handler.sent) == 2

    def dropped(sent):
        raise TransportFailure("dropped", "RemoteDisconnected")

    client, handler = memory_client(dropped, clock=FakeClock())
    with pytest.raises(dbmagic.ConnectionFailed, match="dropped after the request .* was sent") as info:
        client.complete("x", endpoint="e", task="chat")
    assert info.value.sent is True and len(handler.sent) == 1


def test_a_stream_reads_through_the_memory_handler_split_anywhere():
    raw = b"".join(b"data: " + json.dumps({"choices": [{"delta": {"content": p}, "finish_reason": f}]}).encode()
                   + b"\n\n" for p, f in (("Hel", None), ("lo", None), (" there", "stop"))) + b"data: [DONE]\n\n"
    pieces = [raw[i:i + 7] for i in range(0, len(raw), 7)]  # events split at any byte
    client, _ = memory_client(lambda sent: reply(200, body=pieces, headers={"Content-Type": "text/event-stream",
                                                                             "x-request-id": "r1"}))
    stream = client.stream("x", endpoint="e", task="chat", transform_output=str.upper)
    assert list(stream) == ["Hel", "lo", " there"]
    assert (stream.completion.text, stream.completion.request_id) == ("HELLO THERE", "r1")
    assert stream.response.body.closed


# -- errors: an answer that is an error, or no answer -----------------------------------------

def test_a_504_is_a_status_error_a_read_timeout_a_transport_error():
    client, _ = memory_client(lambda sent: reply(504, {"error_code": "DEADLINE_EXCEEDED", "message": "slow"}))
    with pytest.raises(EndpointTimeout, match=r"timed out \(504 DEADLINE_EXCEEDED: slow\)") as info:
        client.complete("x", endpoint="e", task="chat")
    assert isinstance(info.value, StatusError) and info.value.status == 504

    def silent(sent):
        raise TransportFailure("read_timeout", "ReadTimeout")

    client, _ = memory_client(silent)
    with pytest.raises(RequestTimeout, match="sent no answer within 2 s") as timeout:
        client.complete("x", endpoint="e", task="chat", timeout=2)
    assert isinstance(timeout.value, TransportError) and not isinstance(timeout.value, StatusError)


def test_a_short_body_on_a_call_not_streamed_is_a_cut_answer_not_a_cut_stream(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(CHAT, short_body=True)
    with pytest.raises(AnswerCut, match="The answer from endpoint .* was cut") as info:
        client.complete("x", endpoint=CHAT)
    assert not isinstance(info.value, StreamInterrupted) and info.value.completion.finish_reason == "cut"


# -- the call object ------------------------------------------------------------------------------

def test_a_call_is_sent_only_when_read_and_ends_in_a_completion(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    call = client.call(client.prepare("one two", CHAT, stream=True))
    assert not workspace.requests[1:] and call.completion is None  # the look-up only
    assert "".join(call) == "Echo: one two" == call.text
    assert call.completion.finish_reason == "stop" and not call.completion.is_partial
    assert call.wait() is call.completion  # waiting again gives the same answer, sends nothing
    assert len([r for r in workspace.requests if r.method == "POST"]) == 1


def test_a_call_cancelled_from_another_thread_keeps_what_arrived(workspace):
    workspace.chunk_delay = 0.05
    client = Client(host=workspace.host, token=workspace.token)
    call = client.call(client.prepare("a b c d e f g h i j", CHAT, stream=True))
    first = next(iter(call))
    threading.Timer(0.08, call.cancel).start()
    rest = list(call)
    assert call.completion.finish_reason == "stopped" and call.completion.text == first + "".join(rest)
    assert 0 < len(rest) < 9


def test_a_call_cancelled_before_it_is_sent_sends_nothing(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    call = client.call(client.prepare("x", CHAT))
    call.cancel()
    assert call.wait().finish_reason == "stopped"
    assert not [r for r in workspace.requests if r.method == "POST"]


# -- subscribers ------------------------------------------------------------------------------------

class Recorder(Subscriber):
    def __init__(self):
        self.events = []

    def on_request(self, call):
        self.events.append(("request", call.prepared.name))

    def on_response(self, call, response):
        self.events.append(("response", response.status))

    def on_piece(self, call, piece):
        self.events.append(("piece", piece))

    def on_done(self, call, completion):
        self.events.append(("done", completion.finish_reason))

    def on_failed(self, call, error):
        self.events.append(("failed", type(error).__name__))

    def on_refused(self, endpoint, prompt, error):
        self.events.append(("refused", endpoint))


def test_a_subscriber_hears_each_call_in_order(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    recorder = Recorder()
    unsubscribe = client.subscribe(recorder)
    list(client.stream("one two", endpoint=CHAT))
    assert recorder.events == [("request", CHAT), ("response", 200), ("piece", "Echo:"), ("piece", " one"),
                               ("piece", " two"), ("done", "stop")]
    recorder.events.clear()
    workspace.fail(CHAT, 400)
    with pytest.raises(dbmagic.BadRequest):
        client.complete("x", endpoint=CHAT)
    with pytest.raises(dbmagic.EndpointNotFound):
        client.complete("x", endpoint="no-such-endpoint")
    assert recorder.events == [("request", CHAT), ("failed", "BadRequest"), ("refused", "no-such-endpoint")]
    unsubscribe()
    client.complete("x", endpoint=CHAT)
    assert len(recorder.events) == 3


def test_the_readme_subscriber_logs_every_call_of_every_client(workspace):
    calls = []

    class Log(Subscriber):
        def on_done(self, call, completion):
            calls.append((completion.endpoint, completion.usage.total))

        def on_failed(self, call, error):
            calls.append((call.prepared.name, repr(error)))

    unsubscribe = dbmagic.subscribe(Log())
    try:
        for client in (Client(host=workspace.host, token=workspace.token),
                       Client(host=workspace.host, token=workspace.token)):
            client.complete("one two", endpoint=CHAT)
    finally:
        unsubscribe()
    assert calls == [(CHAT, 5), (CHAT, 5)]  # 2 prompt tokens, 3 in "Echo: one two"


def test_a_subscriber_that_raises_is_logged_and_the_call_goes_on(workspace, caplog):
    class Broken(Subscriber):
        def on_piece(self, call, piece):
            raise ValueError("oops")

    client = Client(host=workspace.host, token=workspace.token)
    client.subscribe(Broken())
    with caplog.at_level(logging.WARNING, logger="dbmagic"):
        assert "".join(client.stream("one", endpoint=CHAT)) == "Echo: one"
    assert "subscriber Broken failed in on_piece: ValueError: oops" in caplog.text


# -- Usage, from every answer shape ----------------------------------------------------------------

@pytest.mark.parametrize("wire, expected", [
    ({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}, Usage(5, 6, 11)),
    ({"input_tokens": 7, "output_tokens": 5}, Usage(7, 5, 12)),
    ({"prompt_tokens": 100, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 64}},
     Usage(100, 2, 102, cache_read=64)),
    ({"input_tokens": 9, "output_tokens": 1, "cache_read_input_tokens": 4, "cache_creation_input_tokens": 5},
     Usage(9, 1, 10, cache_read=4, cache_creation=5)),
    ({"prompt_tokens": "many", "completion_tokens": True}, Usage()),
    (None, Usage()),
])
def test_usage_is_read_once_from_every_shape(wire, expected):
    assert Usage.from_wire(wire) == expected
    assert bool(expected) == bool(expected.as_dict())


@pytest.mark.parametrize("endpoint, stream", [(CHAT, False), (CHAT, True), ("local-completions", True),
                                              ("local-responses-agent", False), ("local-responses-agent", True)])
def test_every_kind_streamed_or_not_reports_its_usage_and_the_panel_line_shows_it(workspace, endpoint, stream):
    from dbmagic.frontends.panel import _summary

    client = Client(host=workspace.host, token=workspace.token)
    call = client.call(client.prepare("one two", endpoint, stream=stream))
    completion = call.wait()
    assert completion.usage.input and completion.usage.output == 3
    assert "? tokens in" not in _summary(completion) and f"in, {completion.usage.output} out" in _summary(completion)


# -- a cut stream, a Stop and a Ctrl-C: one partial Completion in every front end -----------------

class _Trigger(Subscriber):
    """Stops or interrupts each call once it has shown two pieces (or, for an answer that is not
    streamed, while it is on its way)."""

    def __init__(self, how):
        self.how = how

    def _fire(self, call):
        if self.how == "stop":
            call.cancel()
        else:
            _thread.interrupt_main()

    def on_request(self, call):
        if not call.prepared.stream:
            threading.Timer(0.1, self._fire, args=(call,)).start()

    def on_piece(self, call, piece):
        if call.prepared.stream and call.text.count(" ") == 1:  # "Echo: one" arrived
            self._fire(call)


def _in_cell(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {CHAT}", "one two three four five six")
    return shell.user_ns["_dbllm"]


def _in_panel(shell, workspace):
    from dbmagic.frontends.panel import Panel

    p = Panel(shell)
    p.endpoint.value = CHAT
    p.prompt.value = "one two three four five six"
    p.send()
    p.wait()
    return p.result if p.result is not None else shell.user_ns.get("_dbllm")


def _in_compare(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e other-chat", "one two three four five six")
    return shell.user_ns["_dbllm"][CHAT]


def _in_batch(shell, workspace):
    client = dbmagic.get_client()
    result = dbmagic.batch("{{ row }}", ["one two three four five six"], endpoint=CHAT, client=client,
                           progress=False, grace=0.1)  # an answer due after its grace: dropped, as a partial
    shell.user_ns["batch_result"] = result
    return result[0]


FRONT_ENDS = {"cell": _in_cell, "panel": _in_panel, "compare": _in_compare, "batch": _in_batch}


@pytest.mark.parametrize("how", ["cut", "stop", "ctrl-c"])
@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
def test_a_cut_a_stop_and_a_ctrl_c_give_one_partial_completion_everywhere(shell, workspace, front_end, how):
    if front_end == "panel" and how == "ctrl-c":
        pytest.skip("the panel answers in its own thread: Ctrl-C interrupts the cell, not the panel (Stop is its way)")
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("other-chat", "llm/v1/chat"))
    streamed = front_end != "batch"  # a batch waits for whole answers
    workspace.chunk_delay = 0.02
    if how == "cut":
        workspace.fail(CHAT, **({"cut_after": 2} if streamed else {"short_body": True}), times=5)
    else:
        workspace.add_endpoint(Endpoint(CHAT, "llm/v1/chat", latency=0 if streamed else 0.5))
    trigger = dbmagic.subscribe(_Trigger(how)) if how != "cut" else (lambda: None)
    try:
        raised = None
        try:
            partial = FRONT_ENDS[front_end](shell, workspace)
        except (StreamInterrupted, KeyboardInterrupt, Exception) as exc:  # the cell fails, as it must
            raised = exc
            partial = shell.user_ns["_dbllm"]
            if front_end == "compare":
                partial = partial[CHAT]
    finally:
        trigger()
    why = {"cut": "cut", "stop": "stopped", "ctrl-c": "interrupted"}[how]
    assert isinstance(partial, Completion), partial
    assert partial.is_partial and partial.finish_reason == why
    full = "Echo: one two three four five six"
    if how == "cut" or not streamed:
        assert partial.text == ("Echo: one" if streamed else "")
    else:  # a Stop or a Ctrl-C lands within a piece or two of the one that asked for it
        assert partial.text.startswith("Echo: one") and full.startswith(partial.text) and partial.text != full
    assert partial.value == partial.text
    assert partial.endpoint == CHAT and partial.kind == "chat"
    # a batch's row says why it has no whole answer: a cut, or the batch stopped while it was on its way
    assert (partial.error is not None) == (how == "cut" or (front_end == "batch" and how == "ctrl-c"))
    if how == "cut":
        assert isinstance(partial.error, AnswerCut) and partial.error.partial == partial.text
    # the cell fails on a cut or a Ctrl-C (Run All stops); a Stop is an answer the user asked for
    if front_end == "cell":
        assert (raised is not None) == (how != "stop")
    if front_end == "batch":
        result = shell.user_ns["batch_result"]
        assert (result.failed, result.missing) == {"cut": ([0], []), "stop": ([], [0]), "ctrl-c": ([0], [0])}[how]


# -- structure: one path, and a core that knows nothing of the notebook or MLflow --------------------

FRONT_END_MODULES = ("frontends/cell.py", "frontends/compare.py", "frontends/panel.py", "batching/run.py")


def test_no_front_end_chooses_a_client_method_or_reads_usage_keys():
    for name in FRONT_END_MODULES:
        source = (ROOT / "dbmagic" / name).read_text()
        for pattern in (r"\.send\(\s*prepared", r"open_stream", r"\bStream\b", r"prompt_tokens", r"completion_tokens",
                        r"usage\.get\(", r"usage\[", r"\.transport\b"):
            assert not re.search(pattern, source), f"{name} has {pattern}"


CORE = ("dbmagic.client", "dbmagic.transport.http", "dbmagic.transport.requests_handler", "dbmagic.call.wire", "dbmagic.errors",
        "dbmagic.transport.credentials", "dbmagic.settings", "dbmagic.call.hooks", "dbmagic.batching.pace", "dbmagic.call.schema",
        "dbmagic.call.tools")
# pydantic and jsonschema load with the first schema or tool, not with the modules that use them
NOT_IN_CORE = ("dbmagic.observe.tracing", "dbmagic.frontends.magic", "dbmagic.frontends.cell", "dbmagic.frontends.panel", "dbmagic.frontends.compare",
               "dbmagic.batching.run", "dbmagic.frontends.history", "dbmagic.frontends.render", "IPython", "mlflow", "ipywidgets", "pandas",
               "pydantic", "jsonschema")


@pytest.mark.parametrize("module", CORE)
def test_each_core_module_imports_alone_without_the_notebook_or_mlflow(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print([m for m in {NOT_IN_CORE!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"


# -- logging: what a user debugging a retry storm or an auth choice turns on ---------------------

def test_debug_logging_says_each_retry_the_credential_source_and_the_endpoint_kind(workspace, caplog):
    workspace.fail(CHAT, 429, times=1, retry_after=0)
    client = Client(host=workspace.host, token=workspace.token)
    with caplog.at_level(logging.DEBUG, logger="dbmagic"):
        client.complete("x", endpoint=CHAT)
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "dbmagic")
    assert f"credentials: explicit arguments for {workspace.host} (pat)" in text
    assert f"endpoint {CHAT!r}: task llm/v1/chat, so dbmagic sends chat requests" in text
    assert f"endpoint {CHAT!r}: HTTP 429 on try 1 of 5; trying again in 0.00 s (Retry-After)" in text
    assert workspace.token not in caplog.text


def test_a_batch_paces_429s_without_retry_after_with_the_limiter(workspace):
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("limited", "llm/v1/chat", latency=0.01, rate_limit=20, retry_after=False))
    client = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(backoff=0.05, max_backoff=0.2))
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(40)], endpoint="limited", concurrency=8,
                           client=client, progress=False)
    assert result.failed == [] and result.rate is not None
    assert "paced at" in result.summary()
    assert isinstance(RateLimited("x"), StatusError)


def test_the_call_options_are_the_call_settings_the_client_takes_plus_history_and_the_input_function():
    from dbmagic import settings
    from dbmagic.client import CallOptions

    # endpoint is the calls' second argument; history, the input function, the schema and the tools are
    # Python values (the notebook names them: the cell runner finds them)
    assert set(CallOptions.__annotations__) == ({*settings.CLIENT_OPTIONS, "history", "transform_input", "schema",
                                                 "tools"} - {"endpoint"})
    declared = {f.name: f.metadata["setting"] for f in dataclasses.fields(settings.CallSpec)}
    assert list(declared) == [s.name for s in settings.CALL] and all(declared[n].name == n for n in declared)


def test_waiting_on_a_call_that_failed_to_start_raises_its_error_again(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(CHAT, 400)
    call = client.call(client.prepare("x", CHAT, stream=True))
    with pytest.raises(dbmagic.BadRequest):
        call.start()
    with pytest.raises(dbmagic.BadRequest):
        call.wait()
    assert isinstance(call.outcome(), dbmagic.BadRequest) and call.completion is None
