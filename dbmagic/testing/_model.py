"""What the local workspace is made of and records: endpoints, faults, the requests it received,
the 429 messages of Databricks' limits."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Endpoint:
    """A serving endpoint of the local workspace.

    ``task`` picks the behaviour (``llm/v1/chat``, ``llm/v1/completions``, ``llm/v1/embeddings``,
    the agents' ``agent/v1/responses``, ``agent/v2/chat`` and ``agent/v1/chat``, or None for a
    custom model). ``predict`` replaces a custom model's behaviour: it gets the input records (a
    list of dicts or values) and returns the predictions list, answered under ``output_key``
    (``predictions``, or ``outputs`` as some models answer). ``latency`` seconds pass before each
    answer; ``rate_limit`` admits that many invocations in any one ``rate_window`` (``second``,
    ``minute`` or ``hour``) and answers the rest 429 ``REQUEST_LIMIT_EXCEEDED``, its message naming
    the limit as Databricks does (`LIMIT_MESSAGES`), with ``Retry-After`` (seconds, fractional)
    until a slot frees, or with no ``Retry-After`` when ``retry_after`` is False. An
    ``EXTERNAL_MODEL`` chat endpoint (and a model service) streams usage only when asked
    (``stream_options.include_usage``), in a last chunk with no choices, as OpenAI does.

    Structured output and tools, as Databricks chat and Responses endpoints take them: a
    ``response_format`` (chat) or ``text.format`` (Responses) of type ``json_schema`` is answered
    with `schema_reply` (a ``json_schema`` without a ``name`` is refused with 400, as Databricks
    refuses it); ``json_style="fenced"`` wraps the JSON in prose and a code fence, as some models
    do. A prompt carrying dbmagic's schema instruction (completions, custom models, proxy apps) is
    answered the same way, fenced. With ``tools`` in the request the endpoint asks for a call of the
    tool the prompt names (else the first), with `schema_reply` arguments (the required ones); after the tool results
    it answers their summary as text, or (``tool_loop=True``) asks for another call, forever. Its
    quirks are Databricks': ``strict`` in a tool definition is refused unless the served model is a
    GPT, an assistant message with tool calls and empty ``content`` is refused by Claude models,
    and a Responses input item id longer than 64 characters is refused (while its own function
    call ids are longer, as the Foundation Model APIs' are).
    """

    name: str
    task: str | None
    endpoint_type: str = "FOUNDATION_MODEL_API"
    model: str = "local-echo"
    ready: str = "READY"
    predict: Callable[[list[Any]], list[Any]] | None = None
    output_key: str = "predictions"
    latency: float = 0.0
    rate_limit: float | None = None
    retry_after: bool = True
    json_style: str = "plain"
    tool_loop: bool = False
    rate_window: str = "second"  # the window of rate_limit: second (QPS), minute (QPM) or hour
    judge: bool = False  # answers a judge's question (`judge_reply`) instead of echoing
    # a proxy or app that echoes what it was sent: every answer ends with the Authorization header it got
    echo_headers: bool = False
    usage: str = "yes"  # the usage it reports: "yes" (its word counts), "no" (none at all), "low" (1 and 1)
    # inputs one request may carry (an embeddings ``input`` list, a custom model's records); more is a 400
    # INVALID_PARAMETER_VALUE, as a served model with a batch limit answers
    max_inputs: int | None = None
    # tokens admitted per token_window ("minute", as Databricks' ITPM and OTPM limits; "second", a quick
    # stand-in for tests), of token_kind ("input": the prompt's, counted before answering; "output": the
    # answers', counted after): past it, 429 naming the limit (`LIMIT_MESSAGES`), with Retry-After as
    # retry_after says
    token_limit: int | None = None
    token_kind: str = "input"
    token_window: str = "minute"

    def describe(self) -> dict[str, Any]:
        entity: dict[str, Any] = {"name": f"{self.name}-entity"}
        if self.endpoint_type == "FOUNDATION_MODEL_API":
            entity["foundation_model"] = {"name": self.model}
        elif self.endpoint_type == "EXTERNAL_MODEL":
            entity["external_model"] = {"name": self.model, "provider": "local"}
        else:
            entity["entity_name"] = self.model
        data = {
            "name": self.name,
            "creator": "local@dbmagic.test",
            "creation_timestamp": 1700000000000,
            "last_updated_timestamp": 1700000000000,
            "state": {"ready": self.ready, "config_update": "NOT_UPDATING"},
            "endpoint_type": self.endpoint_type,
            "config": {"served_entities": [entity]},
            "tags": [],
            "id": hashlib.md5(self.name.encode()).hexdigest(),
        }
        if self.task:
            data["task"] = self.task
        return data


DEFAULT_ENDPOINTS = (
    Endpoint("databricks-meta-llama-3-3-70b-instruct", "llm/v1/chat", model="meta-llama-3.3-70b-instruct"),
    Endpoint("databricks-gte-large-en", "llm/v1/embeddings", model="gte-large-en"),
    Endpoint("local-completions", "llm/v1/completions", "EXTERNAL_MODEL", model="local-instruct"),
    Endpoint("local-custom-model", None, "CUSTOM_MODEL", model="local-custom-model-1"),
    Endpoint("local-responses-agent", "agent/v1/responses", "CUSTOM_MODEL", model="local-responses-agent-1"),
    Endpoint("local-chat-agent", "agent/v2/chat", "CUSTOM_MODEL", model="local-chat-agent-1"),
)


@dataclass
class Fault:
    """What to do instead of a normal answer, ``times`` times.

    ``status`` answers with that status (and ``body``, else a Databricks-shaped error) and
    ``retry_after`` as a header (and any other ``headers``); ``delay`` waits first; ``cut_after``
    streams that many chunks (then ``body`` as an event, when it is a dict) and drops the connection; ``stall_after`` pauses ``stall`` seconds
    after that many chunks; ``malformed`` sends a body that is not JSON; ``short_body`` a body
    that ends before its Content-Length; ``drop`` closes the connection after reading the request,
    with no answer (the request may have run). ``off_schema`` answers a schema with JSON whose first
    field has the wrong type; ``tool_call`` (``{"name": ..., "arguments": {...}}``) asks for that call
    whatever tools were given; ``text`` answers exactly that text (``chunk_chars``: streamed in
    pieces of that many characters). ``trickle`` sends a whole answer a byte at a time, that many
    seconds apart; ``keepalive`` sends a stream's SSE comments that many seconds apart for
    ``keepalive_for`` seconds before its first event; ``gzip_bomb`` answers a gzip-encoded body
    whose text is that many bytes once decompressed. ``gather`` holds each request
    until that many have arrived (proof that a client sends them at the same time; give ``times``
    as many): if they do not all arrive within ``gather_timeout`` seconds, each answers 409.
    """

    status: int | None = None
    body: Any = None
    retry_after: float | str | None = None
    delay: float = 0.0
    cut_after: int | None = None
    stall_after: int | None = None
    stall: float = 0.0
    malformed: bool = False
    short_body: bool = False  # a 200 whose body ends before its Content-Length, then the connection drops
    drop: bool = False  # the request is read, then the connection closes with no answer at all
    off_schema: bool = False  # answer JSON whose first field has the wrong type (a schema is not followed)
    limit: str | None = None  # answer 429 naming this limit (LIMIT_MESSAGES: qps, qpm, tpm, qph), no Retry-After
    tool_call: dict[str, Any] | None = None  # ask for this call ({"name", "arguments"}) instead of the scripted one
    text: str | None = None  # answer exactly this text (a lone surrogate, a token echoed by a proxy, ...)
    chunk_chars: int | None = None  # stream the text in pieces of this many characters (a word split in two)
    trickle: float = 0.0  # a whole answer's body sent a byte at a time, this many seconds apart
    keepalive: float = 0.0  # a stream kept alive: an SSE comment this many seconds apart, for keepalive_for s
    keepalive_for: float = 0.0
    gzip_bomb: int = 0  # a whole answer gzip-encoded, its text this many bytes once decompressed (a few KB sent)
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1
    gather: int = 0
    gather_timeout: float = 5.0

    def __post_init__(self) -> None:
        self.barrier = threading.Barrier(self.gather) if self.gather else None


@dataclass
class RecordedRequest:
    """One request the local workspace received. ``headers['Authorization']`` is masked.

    ``at`` is when it arrived (``time.monotonic()``); ``status`` the status it was answered with and
    ``retry_after`` the ``Retry-After`` it was given and ``request_id`` the ``x-request-id`` (None
    until answered).
    """

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    authorized: bool
    at: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    request_id: str | None = None  # the x-request-id it was answered with
    chunks_sent_at: list[float] = field(default_factory=list, repr=False)  # perf_counter of each SSE write
    credential: str = ""  # at an app: "oauth", "personal access token", "other" or "none" (never the token)


# the 429 messages of Databricks' limits (Foundation Model APIs, AI Gateway), by limit
LIMIT_MESSAGES = {
    "qps": "REQUEST_LIMIT_EXCEEDED: Exceeded workspace QPS rate limit for this endpoint. Please retry later.",
    "qpm": "REQUEST_LIMIT_EXCEEDED: Exceeded the queries per minute (QPM) rate limit of this endpoint's AI Gateway.",
    "tpm": "REQUEST_LIMIT_EXCEEDED: Exceeded the input tokens per minute rate limit for this endpoint.",
    "qph": "REQUEST_LIMIT_EXCEEDED: Exceeded the queries per hour rate limit for this endpoint.",
    "otpm": "REQUEST_LIMIT_EXCEEDED: Exceeded the output tokens per minute rate limit for this endpoint.",
}
TOKEN_WINDOWS = {"second": 1.0, "minute": 60.0}
# the largest request body served, as the Model Serving limits page gives them: 4 MB for foundation,
# external and agent endpoints, 16 MB for custom models (read as MiB here; dbmagic keeps under 4,000,000 bytes)
REQUEST_LIMIT = 4 << 20
CUSTOM_REQUEST_LIMIT = 16 << 20


def token_limit_message(kind: str, window: str) -> str:
    """The 429's message for a token limit of ``kind`` (input, output) per ``window``."""
    return f"REQUEST_LIMIT_EXCEEDED: Exceeded the {kind} tokens per {window} rate limit for this endpoint."
WINDOWS = {"second": (1.0, "qps"), "minute": (60.0, "qpm"), "hour": (3600.0, "qph")}

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
PAT_TOKEN_TYPE = "urn:databricks:params:oauth:token-type:personal-access-token"

CODES = {400: "BAD_REQUEST", 401: "401", 403: "PERMISSION_DENIED", 404: "RESOURCE_DOES_NOT_EXIST",
          429: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR", 503: "TEMPORARILY_UNAVAILABLE"}


def secret_fingerprint(secret: str) -> str:
    """A short digest of a client secret: which secret a token endpoint received, without keeping it."""
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()[:12]
