"""An in-memory handler: a `dbmagic.Client` whose requests are answered by a Python function.

The model is httpx's ``MockTransport``: no socket, no server, the same retries, signing, error
mapping and parsing above it as over real HTTP.

>>> from dbmagic import Client
>>> from dbmagic.testing import MemoryHandler, reply
>>> def answer(request):
...     return reply(200, {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]})
>>> client = Client(host="https://example.cloud.databricks.com", token="t", handler=MemoryHandler(answer))
>>> client.complete("hello", endpoint="e", task="chat").text
'hi'
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..transport.http import Headers, HttpRequest, Response, TransportFailure, read_all

__all__ = ["MemoryHandler", "MemoryBody", "reply", "events", "Sent", "TransportFailure"]


class MemoryBody:
    """A body that gives the chunks it was handed, one per ``read`` (an exception among them is
    raised when reached: ``ConnectionError`` is a broken connection). ``abort`` ends it at once."""

    def __init__(self, chunks: Iterable[bytes | BaseException] = ()):
        self._chunks = list(chunks)
        self._aborted = threading.Event()
        self.closed = False

    def read(self, size: int = 65536, deadline: float | None = None) -> bytes:
        if self._aborted.is_set():
            raise ConnectionError("aborted")
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("the call's timeout passed")
        if not self._chunks:
            return b""
        item = self._chunks.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def read_all(self, limit: int | None = None, deadline: float | None = None) -> bytes:
        return read_all(self, limit, deadline)

    def abort(self) -> None:
        self._aborted.set()

    def close(self) -> None:
        self.closed = True


def reply(status: int = 200, json_body: Any = None, *, body: bytes | Iterable[bytes | BaseException] | None = None,
          headers: Mapping[str, str] | None = None) -> Response:
    """A `Response`: ``json_body`` as JSON, or ``body`` as bytes (or as chunks, one per read)."""
    all_headers = {"Content-Type": "application/json", "x-request-id": "memory-1"}
    if body is None:
        chunks: list[bytes | BaseException] = [json.dumps(json_body).encode()]
    elif isinstance(body, bytes):
        chunks = [body]
    else:
        chunks = list(body)
    all_headers.update(headers or {})
    return Response(status, Headers(all_headers), MemoryBody(chunks))


def events(*payloads: Any, done: bool = True, headers: Mapping[str, str] | None = None) -> Response:
    """A ``text/event-stream`` 200 whose events are ``payloads`` (dicts as JSON, bytes as they are,
    an exception raised when reached), then ``[DONE]``."""
    chunks: list[bytes | BaseException] = []
    for p in payloads:
        if isinstance(p, BaseException):
            chunks.append(p)
        else:
            chunks.append(b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n")
    if done:
        chunks.append(b"data: [DONE]\n\n")
    return reply(200, body=chunks, headers={"Content-Type": "text/event-stream", **(headers or {})})


class Sent:
    """One request as the handler received it: ``method``, ``url``, ``json``, ``headers`` (the
    signed ones, Authorization among them), ``stream``, ``timeout``."""

    def __init__(self, request: HttpRequest):
        self.method, self.url, self.json = request.method, request.url, request.json
        self.stream, self.timeout = request.stream, request.timeout
        self.headers = dict(request.sign())

    def __repr__(self) -> str:
        return f"Sent({self.method} {self.url})"


class MemoryHandler:
    """Answers each request with ``respond(sent) -> Response`` (`reply`, `events`), or a
    `TransportFailure` it raises (``TransportFailure("connect")``: no connection). ``sent`` lists
    what arrived, oldest first."""

    def __init__(self, respond: Callable[[Sent], Response]):
        self.respond = respond
        self.sent: list[Sent] = []
        self._lock = threading.Lock()

    def handle_request(self, request: HttpRequest) -> Response:
        sent = Sent(request)
        with self._lock:
            self.sent.append(sent)
        return self.respond(sent)

    def close(self) -> None:
        pass
