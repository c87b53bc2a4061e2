"""A local Databricks workspace for tests, notebooks and demos: ``dbmagic.testing.LocalWorkspace``.

It is a real HTTP server on 127.0.0.1 that speaks the REST subset dbmagic uses (serving endpoint
list/get, invocations for chat, completions, embeddings and custom models, SSE streaming, and
driver-proxy apps), answers deterministically from the request, checks the token, logs what it
received and injects faults. Use it in your own tests::

    from dbmagic.testing import LocalWorkspace

    def test_my_prompt():
        with LocalWorkspace() as ws:
            client = dbmagic.Client(host=ws.host, token=ws.token)
            ws.fail("databricks-meta-llama-3-3-70b-instruct", 429, retry_after=0)
            assert client.complete("Hi", endpoint="databricks-meta-llama-3-3-70b-instruct").text == "Echo: Hi"
            assert ws.requests[-1].json["messages"][-1]["content"] == "Hi"

No socket at all: ``dbmagic.Client(..., handler=MemoryHandler(respond))`` answers each request
with ``respond(sent)`` (`reply`, `events`), as httpx's ``MockTransport`` does.

From a shell: ``python -m dbmagic.testing`` prints the two variables to export, then serves.
dbmagic never falls back to it by itself.
"""

from ._documents import text_pdf
from ._memory import MemoryBody, MemoryHandler, Sent, TransportFailure, events, reply
from ._process import in_another_process
from ._server import (
           DEFAULT_ENDPOINTS,
           LIMIT_MESSAGES,
           App,
           Endpoint,
           Fault,
           LocalWorkspace,
           RecordedRequest,
           echo_reply,
           judge_reply,
           schema_reply,
           secret_fingerprint,
           token_limit_message,
)

__all__ = ["LocalWorkspace", "Endpoint", "Fault", "App", "LIMIT_MESSAGES", "RecordedRequest", "echo_reply",
           "schema_reply", "judge_reply", "secret_fingerprint", "token_limit_message",
           "in_another_process", "DEFAULT_ENDPOINTS", "MemoryHandler", "MemoryBody", "Sent", "TransportFailure",
           "reply", "events", "text_pdf"]
