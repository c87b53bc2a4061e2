"""Retries, timeouts and error mapping, over real HTTP against the local workspace, on a fake clock."""

from __future__ import annotations

import socket

import pytest
import requests

from dbmagic import (
    AuthenticationError,
    BadRequest,
    Client,
    ConnectionFailed,
    EndpointNotFound,
    EndpointTimeout,
    PermissionDenied,
    RateLimited,
    RequestError,
    RequestTimeout,
    RetryPolicy,
    ServerError,
    Timeouts,
    TransportError,
)
from dbmagic.transport.http import TransportFailure
from dbmagic.transport.retry import parse_retry_after, retry_delay, retry_reason

from .conftest import CHAT


def invocations(workspace):
    return [r for r in workspace.requests if r.path.endswith("/invocations")]


# -- the pure policy -------------------------------------------------------------------------------

def test_retry_reason_table():
    import urllib3

    assert [retry_reason(s) for s in (429, 503)] == ["HTTP 429", "HTTP 503"]
    assert [retry_reason(s) for s in (400, 401, 403, 404, 500, 502, 504)] == [None] * 7  # may have run, or will fail
    # the requests handler's failures as kinds (the transport decides on the kind alone)
    from dbmagic.transport.requests_handler import _failure

    refused = urllib3.exceptions.NewConnectionError(None, "Connection refused")
    kinds = [_failure(e).kind for e in (requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", refused)),
                                        requests.ConnectTimeout("no connection in time"),
                                        requests.ConnectionError(urllib3.exceptions.ProtocolError(
                                            "Connection aborted.", ConnectionResetError())),
                                        requests.ReadTimeout("slow"), requests.exceptions.SSLError("bad certificate"),
                                        requests.exceptions.ChunkedEncodingError("short"))]
    assert kinds == ["connect", "connect_timeout", "dropped", "read_timeout", "tls", "cut"]
    assert [retry_reason(None, TransportFailure(k)) for k in kinds] == [
        "could not connect", "could not connect", None, None, None, None]  # after the send: it may have run
    assert [parse_retry_after(v) for v in ("7", "0.25", "nan", "inf", "-1", "soon", "")] == [7.0, 0.25, None, None,
                                                                                           None, None, None]


def test_retry_delay_honours_and_caps_retry_after_else_backs_off():
    policy = RetryPolicy(backoff=1.0, max_backoff=8.0, max_retry_after=30.0)
    assert retry_delay(policy, 1, 5.0, lambda: 0.5) == 5.0
    assert retry_delay(policy, 1, 999.0, lambda: 0.5) == 30.0
    assert [retry_delay(policy, a, None, lambda: 1.0) for a in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert retry_delay(policy, 3, None, lambda: 0.25) == 1.0  # full jitter


# -- against the local workspace -----------------------------------------------------------------

def test_429_with_retry_after_waits_that_long_then_succeeds(client, workspace, clock):
    workspace.fail(CHAT, 429, retry_after=7, times=2)
    assert client.complete("hi", endpoint=CHAT).text == "Echo: hi"
    assert clock.sleeps == [7.0, 7.0]
    assert len(invocations(workspace)) == 3


def test_429_without_retry_after_backs_off_exponentially(workspace, clock):
    client = Client(host=workspace.host, token=workspace.token, clock=clock)
    client.transport.rand = lambda: 1.0
    workspace.fail(CHAT, 429, times=3)
    assert client.complete("hi", endpoint=CHAT).text == "Echo: hi"
    assert clock.sleeps == [1.0, 2.0, 4.0]


def test_503_is_retried_500_and_502_are_not_sent_again(client, workspace, clock):
    workspace.fail(CHAT, 503)
    assert client.complete("hi", endpoint=CHAT).text == "Echo: hi"
    assert len(invocations(workspace)) == 2
    for status in (500, 502):
        workspace.requests.clear()
        workspace.fail(CHAT, status)
        with pytest.raises(ServerError):
            client.complete("hi", endpoint=CHAT)
        assert len(invocations(workspace)) == 1  # the model may have run: not sent again silently


def test_a_connection_refused_is_retried_and_named(workspace, clock):
    import socket

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    client = Client(host=f"http://127.0.0.1:{port}", token="t", clock=clock, retry=RetryPolicy(attempts=3))
    with pytest.raises(ConnectionFailed, match=r"Could not reach http://127.0.0.1:\d+ .*gave up after 3 attempts"):
        client.complete("hi", endpoint=CHAT, task="chat")
    assert len(clock.sleeps) == 2


def test_attempts_are_bounded_and_the_error_says_so(client, workspace, clock):
    workspace.fail(CHAT, 429, retry_after=1, times=10)
    with pytest.raises(RateLimited, match=r"gave up after 4 attempts") as info:
        client.complete("hi", endpoint=CHAT)
    assert len(invocations(workspace)) == 4
    assert info.value.retry_after == 1.0


def test_total_deadline_bounds_the_waits(workspace, clock):
    client = Client(host=workspace.host, token=workspace.token, clock=clock,
                    retry=RetryPolicy(attempts=100, deadline=30, max_retry_after=60))
    workspace.fail(CHAT, 503, retry_after=20, times=10)
    with pytest.raises(ServerError, match="gave up after 2 attempts"):
        client.complete("hi", endpoint=CHAT)
    assert clock.sleeps == [20.0]  # a second 20 s wait would pass the 30 s deadline


@pytest.mark.parametrize("status, cls", [(400, BadRequest), (401, AuthenticationError), (403, PermissionDenied),
                                         (404, EndpointNotFound), (504, EndpointTimeout)])
def test_no_retry_for_4xx_and_504(client, workspace, clock, status, cls):
    workspace.fail(CHAT, status)
    with pytest.raises(cls):
        client.complete("hi", endpoint=CHAT)
    assert len(invocations(workspace)) == 1
    assert clock.sleeps == []


def test_connection_refused_is_retried_then_fails_clearly(clock):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = Client(host=f"http://127.0.0.1:{port}", token="t", clock=clock, retry=RetryPolicy(attempts=3))
    with pytest.raises(ConnectionFailed, match=rf"Could not reach http://127.0.0.1:{port}.*gave up after 3 attempts"
                                               r".*Check the host"):
        client.complete("hi", endpoint=CHAT, task="chat")
    assert len(clock.sleeps) == 2


def test_read_timeout_is_not_retried(workspace, clock):
    client = Client(host=workspace.host, token=workspace.token, clock=clock, timeouts=Timeouts(read=0.2))
    workspace.fail(CHAT, delay=1.0)
    with pytest.raises(RequestTimeout, match=r"endpoint 'databricks-meta-llama-3-3-70b-instruct' sent no answer "
                                             r"within 0.2 s.*raise the timeout"):
        client.complete("hi", endpoint=CHAT, task="chat")
    assert len(invocations(workspace)) == 1


def test_per_call_timeout(client, workspace):
    workspace.fail(CHAT, delay=1.0)
    with pytest.raises(RequestTimeout, match="within 0.3 s"):
        client.complete("hi", endpoint=CHAT, task="chat", timeout=0.3)


def test_ctrl_c_during_a_wait_stops_at_once(client, workspace, clock):
    def interrupted(seconds):
        raise KeyboardInterrupt

    clock.sleep = interrupted
    workspace.fail(CHAT, 429, retry_after=30, times=5)
    with pytest.raises(KeyboardInterrupt):
        client.complete("hi", endpoint=CHAT)
    assert len(invocations(workspace)) == 1


def test_redirect_is_not_followed_with_the_token(client, workspace):
    workspace.fail(CHAT, 302, body="", headers={"Location": "https://elsewhere.example.com/steal"})
    with pytest.raises(RequestError, match="redirected .* to https://elsewhere.example.com/steal, which dbmagic "
                                           "does not follow"):
        client.complete("hi", endpoint=CHAT)
    assert len(workspace.requests) == 2  # the endpoint lookup and the one invocation; nothing followed


def test_netrc_cannot_replace_the_token(client, workspace, clean_env):
    (clean_env / ".netrc").write_text("machine 127.0.0.1 login token password wrong-password\n")
    assert client.complete("hi", endpoint=CHAT).text == "Echo: hi"
    assert workspace.requests[-1].authorized


def test_tls_failure_is_not_retried_and_names_the_fix(workspace, clock):
    # https:// to the plain-HTTP local workspace: a real failed TLS handshake
    client = Client(host=f"https://127.0.0.1:{workspace.port}", token=workspace.token, clock=clock)
    with pytest.raises(ConnectionFailed, match=r"The TLS handshake with https://127.0.0.1:\d+ failed .*"
                                               r"REQUESTS_CA_BUNDLE") as info:
        client.complete("hi", endpoint=CHAT, task="chat")
    assert clock.sleeps == []
    assert "gave up" not in str(info.value)


def test_a_proxy_from_the_environment_still_carries_https_though_read_once_per_host(monkeypatch):
    # requests reads the environment on every request; dbmagic's session reads it once per host
    import threading

    seen: list[bytes] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def proxy() -> None:  # a stand-in proxy: records what it was asked, answers nothing
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                seen.append(conn.recv(1024).split(b"\r\n", 1)[0])

    threading.Thread(target=proxy, daemon=True).start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = Client(host="https://adb-1.2.azuredatabricks.net", token="dapi-x", retry=RetryPolicy(attempts=1))
    for _ in range(2):
        with pytest.raises(TransportError):
            client.complete("hi", endpoint=CHAT, task="chat")
    listener.close()
    assert seen == [b"CONNECT adb-1.2.azuredatabricks.net:443 HTTP/1.0"] * 2 or \
        seen == [b"CONNECT adb-1.2.azuredatabricks.net:443 HTTP/1.1"] * 2
