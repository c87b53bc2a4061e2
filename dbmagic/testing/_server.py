"""The local workspace: a real threaded HTTP server that speaks the Databricks REST subset dbmagic uses."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["LocalWorkspace", "Endpoint", "Fault", "App", "RecordedRequest", "echo_reply", "schema_reply", "judge_reply",
           "LIMIT_MESSAGES", "DEFAULT_ENDPOINTS"]

_INVOCATIONS = re.compile(r"^/serving-endpoints/([^/]+)/invocations/?$")
_ENDPOINT = re.compile(r"^/api/2\.0/serving-endpoints/([^/]+)/?$")
_APP = re.compile(r"^/api/2\.0/apps/([^/]+)/?$")
_OPENAI_ROUTES = {"/serving-endpoints/chat/completions": "llm/v1/chat", "/serving-endpoints/completions":
                  "llm/v1/completions", "/serving-endpoints/embeddings": "llm/v1/embeddings"}
_PROXY = re.compile(r"^/driver-proxy-api/o/([^/]+)/([^/]+)/(\d+)(/.*)?$")


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
        self._barrier = threading.Barrier(self.gather) if self.gather else None


@dataclass
class RecordedRequest:
    """One request the local workspace received. ``headers['Authorization']`` is masked.

    ``at`` is when it arrived (``time.monotonic()``); ``status`` the status it was answered with and
    ``retry_after`` the ``Retry-After`` it was given (both None until answered).
    """

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    authorized: bool
    at: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    chunks_sent_at: list[float] = field(default_factory=list, repr=False)  # perf_counter of each SSE write
    credential: str = ""  # at an app: "oauth", "personal access token", "other" or "none" (never the token)


# the 429 messages of Databricks' limits (Foundation Model APIs, AI Gateway), by limit
LIMIT_MESSAGES = {
    "qps": "REQUEST_LIMIT_EXCEEDED: Exceeded workspace QPS rate limit for this endpoint. Please retry later.",
    "qpm": "REQUEST_LIMIT_EXCEEDED: Exceeded the queries per minute (QPM) rate limit of this endpoint's AI Gateway.",
    "tpm": "REQUEST_LIMIT_EXCEEDED: Exceeded the input tokens per minute rate limit for this endpoint.",
    "qph": "REQUEST_LIMIT_EXCEEDED: Exceeded the queries per hour rate limit for this endpoint.",
}
_WINDOWS = {"second": (1.0, "qps"), "minute": (60.0, "qpm"), "hour": (3600.0, "qph")}

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
PAT_TOKEN_TYPE = "urn:databricks:params:oauth:token-type:personal-access-token"

_CODES = {400: "BAD_REQUEST", 401: "401", 403: "PERMISSION_DENIED", 404: "RESOURCE_DOES_NOT_EXIST",
          429: "REQUEST_LIMIT_EXCEEDED", 500: "INTERNAL_ERROR", 503: "TEMPORARILY_UNAVAILABLE"}


def secret_fingerprint(secret: str) -> str:
    """A short digest of a client secret: which secret a token endpoint received, without keeping it."""
    import hashlib

    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def echo_reply(prompt: str, *, system: str | None = None, stop: list[str] | None = None,
               max_tokens: int | None = None) -> tuple[str, str]:
    """The local workspace's deterministic answer: ``(text, finish_reason)``.

    ``Echo: <prompt>``, prefixed with ``[<system>] `` when a system prompt is given, cut at the
    first stop sequence, and cut to ``max_tokens`` words.
    """
    text = f"[{system}] Echo: {prompt}" if system else f"Echo: {prompt}"
    finish = "stop"
    for s in stop or []:
        if s and s in text:
            text = text[: text.index(s)]
    if max_tokens is not None:
        words = _pieces(text)
        if len(words) > max_tokens:
            text, finish = "".join(words[:max_tokens]), "length"
    return text, finish


def _pieces(text: str) -> list[str]:
    """Token-like pieces: each word with the white space before it (the last keeps what follows)."""
    return re.findall(r"\s*\S+(?:\s+$)?", text) or ([text] if text else [])


def _embed(text: str, dim: int = 8) -> list[float]:
    digest = hashlib.sha256(str(text).encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:dim]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


class LocalWorkspace:
    """A local Databricks workspace on 127.0.0.1 for tests, notebooks and demos.

    >>> with LocalWorkspace() as ws:
    ...     client = dbmagic.Client(host=ws.host, token=ws.token)
    ...     client.complete("Hi", endpoint="databricks-meta-llama-3-3-70b-instruct").text
    'Echo: Hi'

    It checks the bearer token (401 otherwise), logs every request (``ws.requests``), counts new
    connections (``ws.connections``), streams SSE when asked (``stream_mode`` ``"chunked"`` or
    ``"close"`` for close-delimited bodies, ``chunk_delay`` seconds between chunks), and injects
    faults with `fail`. The client never falls back to it by itself.

    Besides its personal access token it signs in as a workspace does, for databricks-sdk's auth
    types: ``/.well-known/databricks-config`` and the OIDC discovery document, a client-credentials
    token endpoint for service principals (`add_service_principal`, OAuth M2M), a metadata service
    (`metadata_service_url`, as the VS Code extension serves), and tokens issued for other flows
    (`issue_token`, e.g. what a stub ``databricks auth token`` prints). Issued tokens expire after
    ``token_lifetime`` seconds, or at once with `revoke_tokens`. Every answer carries the
    ``x-databricks-org-id`` header (``ws.workspace_id``).
    """

    def __init__(self, *, token: str | None = None, endpoints: tuple[Endpoint, ...] | list[Endpoint] = DEFAULT_ENDPOINTS,
                 port: int = 0, stream_mode: str = "chunked", chunk_delay: float = 0.0,
                 proxy_apps: dict[tuple[str, int], Callable[[Any], Any]] | None = None):
        self.token = token or "dbmagic-local-" + secrets.token_hex(12)
        self.endpoints = {e.name: e for e in endpoints}
        self.proxy_apps: dict[tuple[str, int], Callable[[Any], Any]] = (
            dict(proxy_apps) if proxy_apps is not None else {("0123-456789-local", 7777): _echo_app}
        )
        self.stream_mode = stream_mode
        self.chunk_delay = chunk_delay
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        # Unity AI Gateway model services, by their Unity Catalog name (chat behaviours)
        self.model_services: dict[str, Endpoint] = {
            "system.ai.claude-sonnet-4-5": Endpoint("system.ai.claude-sonnet-4-5", "llm/v1/chat",
                                                    model="databricks-claude-sonnet-4-5")}
        self.apps: dict[str, App] = {}
        self.page_size = 50  # items a page of the apps and model services lists
        self._expire_after: int | None = None  # see expire_tokens_after
        self.token_exchanges = 0  # notebook tokens exchanged for OAuth tokens (RFC 8693)
        self.workspace_id = "1234567890123456"
        self.token_lifetime = 3600.0
        self.service_principals: dict[str, str] = {}
        # what the token endpoint was sent: (client_id, secret_fingerprint(client_secret)), never the secret
        self.client_credentials_seen: list[tuple[str, str]] = []
        self._issued: dict[str, float] = {}  # token -> expiry (time.time())
        self._issued_to: dict[str, dict[str, Any]] = {}  # an issued token -> its user, when not the workspace's
        # who a token belongs to, as SCIM's Me answers: the personal access token's user, other users'
        # tokens (add_user, new_token), and the service principals' OAuth tokens
        self.user: dict[str, Any] = {"id": "1001", "userName": "local.user@dbmagic.test", "displayName": "Local User"}
        self._users: dict[str, dict[str, Any]] = {}  # another token -> its user
        self._denied: dict[str, set[str]] = {}  # endpoint name -> the userNames refused with 403 PERMISSION_DENIED
        self._admitted: dict[str, deque[float]] = {}  # endpoint -> monotonic times within the last second
        self._metadata_path = "/metadata-service/" + secrets.token_hex(8)
        self._faults: dict[str, deque[Fault]] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalWorkspace:
        for app in self.apps.values():
            if app.wanted:
                app.start()
        if self._server is None:
            handler = type("Handler", (_Handler,), {"workspace": self})
            self._server = ThreadingHTTPServer(("127.0.0.1", self._port), handler)
            self._server.daemon_threads = True
            self._server.block_on_close = False
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), name="dbmagic-local-workspace",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        for app in self.apps.values():
            app.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalWorkspace:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.host if self._server else "stopped"
        return f"LocalWorkspace({state}, token='***', endpoints={list(self.endpoints)})"

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("The local workspace is not running: call start() first.")
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """``DATABRICKS_HOST``/``DATABRICKS_TOKEN`` for this workspace, e.g. ``os.environ.update(ws.environ())``."""
        return {"DATABRICKS_HOST": self.host, "DATABRICKS_TOKEN": self.token}

    # -- configuration --------------------------------------------------------------------------

    def add_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoints[endpoint.name] = endpoint

    def add_model_service(self, name: str, model: str = "local-echo", **behaviour: Any) -> Endpoint:
        """Serve a Unity AI Gateway model service ``catalog.schema.name`` (a chat behaviour, as `Endpoint`)."""
        service = Endpoint(name, "llm/v1/chat", model=model, **behaviour)
        self.model_services[name] = service
        return service

    def add_app(self, name: str, *, host: str = "127.0.0.2", running: bool = True, **behaviour: Any) -> App:
        """Deploy an agent on Databricks Apps: the Apps API names it, and it answers the Responses API
        at ``{url}/responses`` from its own server on ``host`` (another loopback address: another
        host, for real), accepting OAuth tokens only. ``running=False``: the app is stopped (its URL
        refuses connections)."""
        app = App(self, name, Endpoint(f"apps/{name}", "agent/v1/responses", "CUSTOM_MODEL", model=f"app-{name}",
                                       **behaviour), host)
        self.apps[name] = app
        if running and self._server is not None:
            app.start()
        elif running:
            app.wanted = True
        return app

    def add_proxy_app(self, cluster_id: str, port: int, app: Callable[[Any], Any] | None = None) -> None:
        """Serve a driver-proxy app: ``app(body) -> JSON value`` (default: echo the prompt)."""
        self.proxy_apps[(cluster_id, int(port))] = app or _echo_app

    def add_service_principal(self, client_id: str, client_secret: str | None = None) -> str:
        """Accept ``client_id`` with ``client_secret`` at the token endpoint; returns the secret."""
        secret = client_secret or "dbmagic-local-secret-" + secrets.token_hex(8)
        self.service_principals[client_id] = secret
        return secret

    def add_user(self, user_name: str, display_name: str | None = None) -> str:
        """Another user of this workspace (``user_name``, as SCIM names users); returns a token of
        theirs, which ``GET /api/2.0/preview/scim/v2/Me`` answers with that user."""
        user = {"id": str(1001 + len({u["id"] for u in self._users.values()}) + 1), "userName": user_name,
                "displayName": display_name or user_name.split("@")[0]}
        return self._token_of(user)

    def new_token(self, user_name: str | None = None) -> str:
        """Another token of an existing user (the workspace's own by default): what a notebook's
        rotated token is, the same principal with a new secret."""
        if user_name is None or user_name == self.user["userName"]:
            return self._token_of(self.user)
        found = next((u for u in self._users.values() if u["userName"] == user_name), None)
        if found is None:
            raise KeyError(f"no user {user_name!r}: add_user() first")
        return self._token_of(found)

    def _token_of(self, user: dict[str, Any]) -> str:
        token = "dbmagic-local-" + secrets.token_hex(12)
        with self._lock:
            self._users[token] = user
        return token

    def deny(self, endpoint: str, user_name: str) -> None:
        """``user_name`` may not query ``endpoint``: its invocations answer 403 PERMISSION_DENIED."""
        self._denied.setdefault(endpoint, set()).add(user_name)

    def user_of(self, authorization: str) -> dict[str, Any] | None:
        """The user an ``Authorization`` header's token belongs to (as Me answers), or None."""
        token = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else ""
        if token and secrets.compare_digest(token, self.token):
            return self.user
        with self._lock:
            if token in self._users:
                return self._users[token]
            if self._issued.get(token, 0) > time.time():
                return self._issued_to.get(token, self.user)
        return None

    def issue_token(self, lifetime: float | None = None) -> str:
        """A new OAuth access token this workspace accepts for ``lifetime`` seconds: a JWT, as
        Databricks' OAuth tokens are (``eyJ...``: header, claims and a signature nobody checks here)."""
        expires = time.time() + (self.token_lifetime if lifetime is None else lifetime)

        def part(data: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

        token = ".".join((part({"alg": "RS256", "typ": "JWT", "kid": "dbmagic-local"}),
                          part({"iss": f"{self.host}/oidc", "exp": int(expires), "scope": "all-apis",
                                "jti": secrets.token_hex(8)}),
                          secrets.token_urlsafe(24)))
        with self._lock:
            self._issued[token] = expires
        return token

    def expire_tokens_after(self, invocations: int) -> None:
        """A job that outlives its token: ``invocations`` more invocations are accepted, then the
        tokens in use stop working (a 401 for each request after), as an OAuth or notebook token
        expires in the middle of a long batch: the personal access token becomes a new one (read
        ``token`` for it: the fresh token to resume with) and every issued OAuth token is revoked."""
        with self._lock:
            self._expire_after = invocations

    def _count_towards_expiry(self) -> bool:
        with self._lock:
            if self._expire_after is None:
                return True
            if self._expire_after <= 0:
                self.token, self._expire_after = "dbmagic-local-" + secrets.token_hex(12), None
                self._issued.clear()
                return False
            self._expire_after -= 1
            return True

    def revoke_tokens(self) -> None:
        """Every issued OAuth token stops working (the personal access token still does)."""
        with self._lock:
            self._issued.clear()

    @property
    def metadata_service_url(self) -> str:
        """The URL of this workspace's metadata service (``DATABRICKS_METADATA_SERVICE_URL``)."""
        return self.host + self._metadata_path

    def _admit(self, endpoint: Endpoint) -> float:
        """0 when ``endpoint`` may answer now, else the seconds until its rate limit frees a slot."""
        if not endpoint.rate_limit:
            return 0.0
        span = _WINDOWS[endpoint.rate_window][0]
        now = time.monotonic()
        with self._lock:
            window = self._admitted.setdefault(endpoint.name, deque())
            while window and window[0] <= now - span:
                window.popleft()
            if len(window) < endpoint.rate_limit:
                window.append(now)
                return 0.0
            return max(window[0] + span - now, 0.001)

    def _accepts(self, authorization: str) -> bool:
        return self.user_of(authorization) is not None

    def fail(self, name: str | tuple[str, ...], status: int | None = None, **fault: Any) -> Fault:
        """Queue a fault for the next request(s) to endpoint ``name`` (its invocations), a proxy
        app (``"CLUSTER_ID:PORT"``), or an exact path such as ``/api/2.0/serving-endpoints``.
        Several names share one fault (``times`` counts them all): ``gather`` across endpoints."""
        f = Fault(status=status, **fault)
        with self._lock:
            for key in (name,) if isinstance(name, str) else name:
                self._faults.setdefault(key, deque()).append(f)
        return f

    def clear(self) -> None:
        """Forget logged requests, connection counts and pending faults."""
        with self._lock:
            self.requests.clear()
            self.connections = 0
            self._faults.clear()

    def _take_fault(self, *keys: str) -> Fault | None:
        with self._lock:
            for key in keys:
                queue = self._faults.get(key)
                if queue:
                    fault = queue[0]
                    fault.times -= 1
                    if fault.times <= 0:
                        for other in self._faults.values():  # a fault shared by several names ends for all
                            if other and other[0] is fault:
                                other.popleft()
                    return fault
        return None

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"local-{self._counter:06d}"


def _echo_app(body: Any) -> Any:
    if not isinstance(body, dict) or "prompt" not in body:
        raise ValueError("the app expects a JSON object with a 'prompt'")
    return _reply_text(str(body["prompt"]), stop=body.get("stop"))[0]


class App:
    """An agent deployed on Databricks Apps (`LocalWorkspace.add_app`): its own server on another
    loopback address, answering the Responses API at ``/responses`` (the ``endpoint`` behaviour,
    streamed or not) to OAuth tokens the workspace issued, and 401 to anything else, a personal
    access token included. ``requests`` logs what reached it (``credential`` says which kind of
    token came, never the token)."""

    def __init__(self, workspace: LocalWorkspace, name: str, endpoint: Endpoint, host: str):
        self.workspace, self.name, self.endpoint, self.bind = workspace, name, endpoint, host
        self.requests: list[RecordedRequest] = []
        self.wanted = False
        self._server: ThreadingHTTPServer | None = None
        self._port = 0

    def start(self) -> None:
        if self._server is None:
            handler = type("AppHandler", (_AppHandler,), {"workspace": self.workspace, "app": self})
            self._server = ThreadingHTTPServer((self.bind, self._port), handler)
            self._server.daemon_threads = True
            self._server.block_on_close = False
            self._port = self._server.server_address[1]
            threading.Thread(target=self._server.serve_forever, args=(0.02,), name=f"dbmagic-local-app-{self.name}",
                             daemon=True).start()
        self.wanted = True

    def stop(self) -> None:
        """Stop the app: its URL refuses connections (as a stopped app's does)."""
        self.wanted = False
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        if not self._port:  # never started: a port nothing listens on
            with socket.socket() as probe:
                probe.bind((self.bind, 0))
                self._port = probe.getsockname()[1]
        return f"http://{self.bind}:{self._port}"

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/2.0/apps/{name}`` answers."""
        state = "RUNNING" if self.running else "STOPPED"
        return {"name": self.name, "url": self.url, "description": f"agent {self.name}",
                "app_status": {"state": state, "message": f"App is {state.lower()}."},
                "compute_status": {"state": "ACTIVE" if self.running else "STOPPED"},
                "creator": "local@dbmagic.test"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    workspace: LocalWorkspace
    server_version = "dbmagic-local-workspace"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without NODELAY, Nagle + delayed ACK add ~40 ms
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.workspace._lock:
            self.workspace.connections += 1

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (Stop, Ctrl-C)
            pass

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- routing --------------------------------------------------------------------------------

    def _read(self) -> tuple[bytes, Any, dict[str, str], str, str]:
        """The request: its raw body, the body's JSON (None when it is not JSON), the headers as
        recorded (the Authorization value masked), the Authorization value sent, and the path."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        sent_auth = self.headers.get("Authorization", "")  # header names are case-insensitive (openai's is lower case)
        headers = {k: (v.split(" ", 1)[0] + " ***" if k.lower() == "authorization" else v)
                   for k, v in self.headers.items()}
        return raw, body, headers, sent_auth, self.path.split("?", 1)[0]

    def _dispatch(self, method: str) -> None:
        ws = self.workspace
        raw, body, headers, sent_auth, path = self._read()
        with ws._lock:  # one decision: a request that races the token's expiry is refused, never let through
            authorized = ws._accepts(sent_auth)
            if authorized and ws._expire_after is not None and _INVOCATIONS.match(path):
                authorized = ws._count_towards_expiry()
        self._record = RecordedRequest(method, path, headers, body, authorized, at=time.monotonic())
        self._authorization, self._fault_now = sent_auth, None
        ws.requests.append(self._record)
        if method == "GET" and path == "/.well-known/databricks-config":  # public, as on a workspace
            if self._fault(path) is True:
                return
            return self._json(200, {"workspace_id": ws.workspace_id, "oidc_endpoint": f"{ws.host}/oidc"})
        if method == "GET" and path == "/oidc/.well-known/oauth-authorization-server":
            return self._json(200, {"issuer": f"{ws.host}/oidc", "token_endpoint": f"{ws.host}/oidc/v1/token",
                                    "authorization_endpoint": f"{ws.host}/oidc/v1/authorize"})
        if method == "POST" and path == "/oidc/v1/token":
            if self._fault(path) is True:
                return
            return self._token_endpoint(raw, sent_auth)
        if method == "GET" and path == ws._metadata_path:
            return self._metadata_service()
        if not authorized:
            return self._error(401, "Credential was not sent or was of an unsupported type for this API.")
        if raw and body is None:
            return self._error(400, "Malformed JSON in the request body.", "MALFORMED_REQUEST")

        if method == "GET" and path.rstrip("/") == "/api/2.0/preview/scim/v2/Me":
            if self._fault(path) is True:
                return
            return self._json(200, _scim_me(ws.user_of(sent_auth) or {}))
        if method == "GET" and path.rstrip("/") == "/api/2.0/apps":
            return self._json(200, self._page("apps", [a.describe() for a in ws.apps.values()]))
        match = _APP.match(path)
        if method == "GET" and match:
            found = ws.apps.get(urllib.parse.unquote(match.group(1)))
            if found is None:
                return self._error(404, f"App with name {match.group(1)} does not exist.", "RESOURCE_DOES_NOT_EXIST")
            return self._json(200, found.describe())
        if method == "GET" and path.rstrip("/") == "/api/2.1/unity-catalog/model-services":
            return self._json(200, self._page("model_services", [
                {"name": f"model-services/{name}", "owner": "local@dbmagic.test",
                 "supported_api_types": ["CHAT_COMPLETIONS"], "comment": f"serves {e.model}"}
                for name, e in ws.model_services.items()]))
        if method == "POST" and path in ("/ai-gateway/mlflow/v1/chat/completions", "/ai-gateway/mlflow/v1/responses"):
            model = body.get("model") if isinstance(body, dict) else None
            service = ws.model_services.get(model) if isinstance(model, str) else None
            if service is None:
                return self._error(404, f"Model service '{model}' does not exist, or you lack EXECUTE on it.",
                                   "RESOURCE_DOES_NOT_EXIST")
            if path.endswith("/responses"):  # the same service through the Responses API
                service = dataclasses.replace(service, task="agent/v1/responses")
            return self._serve(service, body, path, named=True, usage_when_asked=True)
        if method == "POST" and path in _OPENAI_ROUTES:  # what the openai client sends, base_url {host}/serving-endpoints
            model = body.get("model") if isinstance(body, dict) else None
            endpoint = ws.endpoints.get(model) if isinstance(model, str) else None
            if endpoint is None:
                return self._not_found(str(model))
            if endpoint.task != _OPENAI_ROUTES[path]:
                return self._error(400, f"Endpoint {model} does not serve {path.rsplit('/', 1)[-1]}.", "BAD_REQUEST")
            return self._serve(endpoint, body, path, named=True)
        if method == "GET" and path.rstrip("/") == "/api/2.0/serving-endpoints":
            if self._fault(path) is True:
                return
            return self._json(200, {"endpoints": [e.describe() for e in ws.endpoints.values()]})
        match = _ENDPOINT.match(path)
        if method == "GET" and match:
            endpoint = ws.endpoints.get(match.group(1))
            if endpoint is None:
                return self._not_found(match.group(1))
            if self._fault(path) is True:
                return
            return self._json(200, {**endpoint.describe(), "permission_level": "CAN_QUERY"})
        match = _INVOCATIONS.match(path)
        if method == "POST" and match:
            endpoint = ws.endpoints.get(match.group(1))
            if endpoint is None:
                return self._not_found(match.group(1))
            return self._serve(endpoint, body, path)
        match = _PROXY.match(path)
        if method == "POST" and match:
            key = (match.group(2), int(match.group(3)))
            app = ws.proxy_apps.get(key)
            if app is None:
                return self._error(404, f"No app is listening on cluster {key[0]} port {key[1]}.")
            if self._fault(f"{key[0]}:{key[1]}", path) is True:
                return
            try:
                return self._json(200, app(body))
            except Exception as exc:  # the app's own failure, as a real driver app would give
                return self._text(500, f"{exc.__class__.__name__}: {exc}")
        return self._error(404, f"No API found for '{method} {path}'.", "ENDPOINT_NOT_FOUND")

    def _fault(self, *keys: str) -> Fault | bool | None:
        """Apply a queued fault. True when it answered; a Fault for streaming faults to apply later."""
        fault = self.workspace._take_fault(*keys)
        if fault is None:
            return None
        if fault._barrier is not None:
            try:
                fault._barrier.wait(fault.gather_timeout)
            except threading.BrokenBarrierError:
                self._error(409, f"Only some of {fault.gather} requests arrived within {fault.gather_timeout:g} s "
                                 "of each other.", "REQUESTS_DID_NOT_OVERLAP")
                return True
        if fault.delay:
            time.sleep(fault.delay)
        if fault.limit is not None:
            self._error(429, LIMIT_MESSAGES[fault.limit], "REQUEST_LIMIT_EXCEEDED", extra=dict(fault.headers))
            return True
        if fault.status is not None:
            extra = dict(fault.headers)
            if fault.retry_after is not None:
                extra["Retry-After"] = str(fault.retry_after)
            if fault.body is None:
                self._error(fault.status, f"Injected failure {fault.status}.", extra=extra)
            elif isinstance(fault.body, (dict, list)):
                self._json(fault.status, fault.body, extra=extra)
            else:
                self._text(fault.status, str(fault.body), extra=extra)
            return True
        if fault.malformed and fault.cut_after is None:
            self._send(200, b'{"choices": [{"message": ', "application/json")
            return True
        if fault.drop:
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return True
        if fault.short_body:
            self._record.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "400")
            self.end_headers()
            self.wfile.write(b'{"choices": [{"message": {"role": "assistant", "content": "Echo')
            self.wfile.flush()
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return True
        return fault

    # -- signing in ------------------------------------------------------------------------------

    def _token_endpoint(self, raw: bytes, authorization: str) -> None:
        """OAuth client credentials (RFC 6749 4.4): the client authenticates with HTTP Basic or form fields."""
        ws = self.workspace
        form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode("utf-8", "replace")).items()}
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if authorization.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
            except ValueError:
                pass
        with ws._lock:
            ws.client_credentials_seen.append((urllib.parse.unquote(client_id),
                                               secret_fingerprint(urllib.parse.unquote(secret))))
        if form.get("grant_type") == TOKEN_EXCHANGE:  # RFC 8693: a notebook token for an OAuth token
            subject = form.get("subject_token", "")
            if form.get("subject_token_type") != PAT_TOKEN_TYPE or not ws._accepts(f"Bearer {subject}"):
                return self._json(400, {"error": "invalid_request", "error_description": "The subject token is not "
                                                                                         "a valid token."})
            with ws._lock:
                ws.token_exchanges += 1
            return self._json(200, {"access_token": ws.issue_token(), "token_type": "Bearer",
                                    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                                    "expires_in": int(ws.token_lifetime), "scope": form.get("scope", "all-apis")})
        if form.get("grant_type") != "client_credentials":
            return self._json(400, {"error": "unsupported_grant_type", "error_description": "client_credentials only"})
        expected = ws.service_principals.get(urllib.parse.unquote(client_id))
        if expected is None or not secrets.compare_digest(urllib.parse.unquote(secret), expected):
            return self._json(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
        principal = urllib.parse.unquote(client_id)  # the service principal's own token: Me answers with it
        token = ws.issue_token()
        with ws._lock:
            ws._issued_to[token] = {"id": "sp-" + secret_fingerprint(principal), "userName": principal,
                                    "applicationId": principal, "displayName": principal}
        self._json(200, {"access_token": token, "token_type": "Bearer",
                         "expires_in": int(ws.token_lifetime), "scope": form.get("scope", "all-apis")})

    def _metadata_service(self) -> None:
        """What the VS Code extension's metadata service answers (databricks-sdk's metadata-service)."""
        ws = self.workspace
        if self.headers.get("X-Databricks-Metadata-Version") != "1" or self.headers.get("X-Databricks-Host") != ws.host:
            return self._json(400, {"error": "wrong metadata version or host"})
        self._json(200, {"access_token": ws.issue_token(), "token_type": "Bearer",
                         "expires_on": int(time.time() + ws.token_lifetime)})

    def _serve(self, endpoint: Endpoint, body: Any, path: str, *, named: bool = False,
               usage_when_asked: bool = False) -> None:
        """An invocation of ``endpoint``: its rate limit, a queued fault, its latency, then its answer.
        ``named``: the body names it (``model``: a model service, an OpenAI-compatible route), which
        is not part of what the endpoint reads. ``usage_when_asked``: as OpenAI's API, a stream
        carries usage only when ``stream_options.include_usage`` asks for it (model services, and
        external models anywhere)."""
        ws = self.workspace
        user = ws.user_of(getattr(self, "_authorization", "")) or {}
        if user.get("userName") in ws._denied.get(endpoint.name, ()):
            return self._error(403, f"User {user['userName']} does not have permission 'CAN QUERY' on endpoint "
                                    f"{endpoint.name}.", "PERMISSION_DENIED")
        wait = ws._admit(endpoint)
        if wait:
            return self._error(429, LIMIT_MESSAGES[_WINDOWS[endpoint.rate_window][1]], "REQUEST_LIMIT_EXCEEDED",
                               extra={"Retry-After": f"{wait:.3f}"} if endpoint.retry_after else None)
        fault = self._fault(endpoint.name, path)
        if fault is True:
            return
        self._fault_now = fault
        if endpoint.latency:
            time.sleep(endpoint.latency)
        if named and isinstance(body, dict):
            body = {k: v for k, v in body.items() if k != "model"}
        return self._invoke(endpoint, body, fault, usage_when_asked=usage_when_asked)

    def _page(self, key: str, items: list[Any]) -> dict[str, Any]:
        """One page of a list API (``page_size`` of the workspace a page), with ``next_page_token``
        while more remain, as Databricks' list APIs page."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        start = int((query.get("page_token") or ["0"])[0] or 0)
        size = self.workspace.page_size
        page: dict[str, Any] = {key: items[start:start + size]}
        if start + size < len(items):
            page["next_page_token"] = str(start + size)
        return page

    # -- endpoint behaviours --------------------------------------------------------------------

    def _invoke(self, endpoint: Endpoint, body: Any, fault: Fault | None, usage_when_asked: bool = False) -> None:
        if not isinstance(body, dict):
            return self._error(400, "The request body must be a JSON object.")
        task = endpoint.task
        if task == "llm/v1/embeddings":
            inputs = body.get("input")
            if inputs is None:
                return self._error(400, "Missing required field 'input'.", "INVALID_PARAMETER_VALUE")
            items = inputs if isinstance(inputs, list) else [inputs]
            return self._json(200, {
                "object": "list", "model": endpoint.model,
                "data": [{"object": "embedding", "index": i, "embedding": _embed(t)} for i, t in enumerate(items)],
                "usage": {"prompt_tokens": sum(len(_pieces(str(t))) for t in items),
                          "total_tokens": sum(len(_pieces(str(t))) for t in items)},
            })
        if task is None:
            records = _records(body)
            if records is None:
                return self._error(400, "Provide one of dataframe_split, dataframe_records, instances, inputs.")
            predict = endpoint.predict or _echo_predictions
            try:
                predictions = predict(records)
                if endpoint.echo_headers:
                    predictions = [f"{p} (it came with Authorization: {getattr(self, '_authorization', '')})"
                                   for p in predictions]
            except Exception as exc:  # the model's own failure, answered as serving answers it
                return self._error(400, f"Model prediction failed: {exc.__class__.__name__}: {exc}", "BAD_REQUEST")
            return self._json(200, {endpoint.output_key: predictions})
        shape = _SHAPES.get(task, "completions")
        if shape in ("chat", "chat_agent", "responses"):
            field = "input" if shape == "responses" else "messages"
            turns = body.get(field)
            if isinstance(turns, str):
                turns = [{"role": "user", "content": turns}]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
                return self._error(400, f"Missing required field '{field}'.", "INVALID_PARAMETER_VALUE")
            system = next((_text(m.get("content")) for m in turns if m.get("role") == "system"), None)
            prompt = _asked(turns)
            prompt_tokens = sum(len(_pieces(_text(m.get("content")))) for m in turns)
        else:
            if "prompt" not in body:
                return self._error(400, "Missing required field 'prompt'.", "INVALID_PARAMETER_VALUE")
            system, prompt = None, body["prompt"]
            prompt_tokens = len(_pieces(str(prompt)))
        for name, kind in (("temperature", (int, float)), ("max_tokens", int), ("n", int)):
            if name in body and not isinstance(body[name], kind):
                return self._error(400, f"Invalid value for '{name}': {body[name]!r}.", "INVALID_PARAMETER_VALUE")
        turns = body.get("input" if shape == "responses" else "messages") if shape != "completions" else []
        refused = _refused_by_quirks(endpoint, body, shape, turns if isinstance(turns, list) else [])
        if refused:
            return self._error(400, refused, "INVALID_PARAMETER_VALUE")
        try:
            reply = _reply(endpoint, body, shape, turns if isinstance(turns, list) else [], str(prompt), system, fault)
        except ValueError as exc:
            return self._error(400, str(exc), "INVALID_PARAMETER_VALUE")
        text, finish, calls = reply["text"], reply["finish"], reply.get("tool_calls")
        if endpoint.echo_headers:
            text += f" (it came with Authorization: {getattr(self, '_authorization', '')})"
        completion_tokens = len(_pieces(text)) + sum(len(c["arguments"]) // 4 + 1 for c in calls or ())
        if endpoint.usage == "low":  # an endpoint that under-reports
            prompt_tokens = completion_tokens = 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if body.get("stream"):
            asked = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True
            only_when_asked = usage_when_asked or endpoint.endpoint_type == "EXTERNAL_MODEL"
            return self._stream(endpoint, text, finish, usage, shape, fault, calls,
                                usage_chunk=False if endpoint.usage == "no" else asked if only_when_asked else None,
                                n=body.get("n") or 1)
        n = body.get("n") or 1
        answer: dict[str, Any]
        if shape == "responses":
            output = [_function_call_item(c) for c in calls] if calls else [_output_item(text)]
            answer = {"object": "response", "id": f"resp_{_count(self)}", "status": "completed",
                      "output": output, "usage": _responses_usage(usage)}
        elif shape == "chat_agent":
            answer = {"messages": [{"role": "assistant", "content": text, "id": "msg_1"}]}
        elif shape == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": [_chat_tool_call(c) for c in calls]}
            answer = {"id": f"chatcmpl-{_count(self)}", "object": "chat.completion", "created": 1700000000,
                      "model": endpoint.model, "usage": usage,
                      "choices": [{"index": i, "message": _nth(message, i), "finish_reason": finish}
                                  for i in range(n)]}
        else:
            answer = {"id": f"cmpl-{_count(self)}", "object": "text_completion", "created": 1700000000,
                      "model": endpoint.model, "usage": usage,
                      "choices": [{"index": i, "text": _nth_text(text, i), "finish_reason": finish}
                                  for i in range(n)]}
        if endpoint.usage == "no":
            answer.pop("usage", None)
        self._json(200, answer)

    def _stream(self, endpoint: Endpoint, text: str, finish: str, usage: dict, shape: str, fault: Fault | None,
                calls: list[dict[str, Any]] | None = None, usage_chunk: bool | None = None, n: int = 1) -> None:
        """``usage_chunk`` None: usage in the last chunk (as the Foundation Model APIs send it); True:
        in a chunk of its own after it, with no choices (OpenAI's ``include_usage``); False: none."""
        ws = self.workspace
        chunked = ws.stream_mode == "chunked"
        self._record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("x-request-id", ws._next_id())
        self.send_header("x-databricks-org-id", ws.workspace_id)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

        sent_at = self._record.chunks_sent_at

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.wfile.flush()
            sent_at.append(time.perf_counter())

        def event(data: dict[str, Any]) -> None:
            write(b"data: " + json.dumps(data).encode() + b"\n\n")

        if fault is not None and fault.keepalive:  # kept alive with comments, no event, as proxies do
            until = time.monotonic() + fault.keepalive_for
            while time.monotonic() < until:
                write(b": keep-alive\n\n")
                time.sleep(fault.keepalive)
        if calls:
            return self._stream_calls(endpoint, usage, shape, calls, event, write, chunked)
        pieces = _pieces(text)
        if fault is not None and fault.chunk_chars:
            pieces = [text[i:i + fault.chunk_chars] for i in range(0, len(text), fault.chunk_chars)]
        for i, piece in enumerate(pieces):
            if fault is not None and fault.cut_after is not None and i >= fault.cut_after:
                if fault.malformed:
                    write(b"data: {\"choices\": [{\"delta\": \n\n")
                elif isinstance(fault.body, dict):  # an error event mid-stream, as gateways send
                    event(fault.body)
                self.close_connection = True
                return  # drop the connection mid-stream: no [DONE], no final chunk
            last = i == len(pieces) - 1
            if shape == "responses":
                event({"type": "response.output_text.delta", "item_id": "msg_1", "delta": piece})
            elif shape == "chat_agent":
                event({"delta": {"role": "assistant", "content": piece, "id": "msg_1"}})
            else:
                if shape == "chat":
                    delta: dict[str, Any] = {"content": piece}
                    if i == 0:
                        delta["role"] = "assistant"
                    choice = {"index": 0, "delta": delta, "finish_reason": finish if last else None}
                    chunk: dict[str, Any] = {"id": "chatcmpl-0", "object": "chat.completion.chunk",
                                             "created": 1700000000, "model": endpoint.model, "choices": [choice]}
                else:
                    choice = {"index": 0, "text": piece, "finish_reason": finish if last else None}
                    chunk = {"id": "cmpl-0", "object": "text_completion", "created": 1700000000, "model": endpoint.model,
                             "choices": [choice]}
                if last and usage_chunk is None:
                    chunk["usage"] = usage
                event(chunk)
                for k in range(1, n):  # the other answers (n), each in chunks of its own index
                    other = {**choice, "index": k}
                    extra = _nth_text(" ", k)[1:] if last else ""
                    if "delta" in other:
                        other["delta"] = {"content": piece + extra}
                    else:
                        other["text"] = piece + extra
                    event({**{key: v for key, v in chunk.items() if key != "usage"}, "choices": [other]})
                if last and usage_chunk:
                    event({**chunk, "choices": [], "usage": usage})
            if ws.chunk_delay:
                time.sleep(ws.chunk_delay)
            if fault is not None and fault.stall_after == i + 1:
                time.sleep(fault.stall)
        if shape == "responses":  # the whole item again, as MLflow's agent server sends it; then, as the
            # Responses API ends a stream, the whole response with its usage
            event({"type": "response.output_item.done", "item": _output_item(text)})
            event({"type": "response.completed", "response": {"object": "response", "status": "completed",
                                                              "output": [_output_item(text)],
                                                              "usage": _responses_usage(usage)}})
        write(b"data: [DONE]\n\n")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _stream_calls(self, endpoint: Endpoint, usage: dict, shape: str, calls: list[dict[str, Any]],
                      event: Callable[[dict[str, Any]], None], write: Callable[[bytes], None], chunked: bool) -> None:
        """Tool calls streamed as the APIs stream them: the arguments in pieces to concatenate."""
        for index, call in enumerate(calls):
            arguments = call["arguments"]
            pieces = [arguments[i:i + 7] for i in range(0, len(arguments), 7)] or [""]
            if shape == "responses":
                item = _function_call_item(call)
                event({"type": "response.output_item.added", "output_index": index, "item": {**item, "arguments": ""}})
                for piece in pieces:
                    event({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": index, "delta": piece})
                event({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                       "arguments": arguments})
                event({"type": "response.output_item.done", "output_index": index, "item": item})
                continue
            head = {"index": index, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}
            first = {"role": "assistant", "content": None, "tool_calls": [head]} if index == 0 else {"tool_calls": [head]}
            event({"object": "chat.completion.chunk", "model": endpoint.model,
                   "choices": [{"index": 0, "delta": first, "finish_reason": None}]})
            for piece in pieces:
                event({"object": "chat.completion.chunk", "model": endpoint.model,
                       "choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, "function": {"arguments": piece}}]},
                                    "finish_reason": None}]})
        if shape == "responses":
            event({"type": "response.completed", "response": {
                "object": "response", "status": "completed", "output": [_function_call_item(c) for c in calls],
                "usage": _responses_usage(usage)}})
        else:
            event({"object": "chat.completion.chunk", "model": endpoint.model, "usage": usage,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        write(b"data: [DONE]\n\n")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    # -- answers --------------------------------------------------------------------------------

    def _not_found(self, name: str) -> None:
        self._error(404, f"Endpoint with name '{name}' does not exist.")

    def _error(self, status: int, message: str, code: str | None = None, extra: dict[str, str] | None = None) -> None:
        self._json(status, {"error_code": code or _CODES.get(status, str(status)), "message": message}, extra=extra)

    def _json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", extra)

    def _text(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8", extra)

    def _send(self, status: int, payload: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self._record.status, self._record.retry_after = status, (extra or {}).get("Retry-After")
        fault = getattr(self, "_fault_now", None) if status == 200 else None
        if fault is not None and fault.gzip_bomb:
            payload, extra = _gzip_bomb(fault.gzip_bomb), {**(extra or {}), "Content-Encoding": "gzip"}
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-request-id", self.workspace._next_id())
        self.send_header("x-databricks-org-id", self.workspace.workspace_id)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if fault is not None and fault.trickle:
            for i in range(len(payload)):
                self.wfile.write(payload[i:i + 1])
                self.wfile.flush()
                time.sleep(fault.trickle)
            return
        self.wfile.write(payload)


def _gzip_bomb(size: int) -> bytes:
    """A chat answer's JSON, gzip-compressed, whose text is ``size`` bytes of ``x`` (sent: a few KB)."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    parts = [packer.compress(b'{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", '
                             b'"content": "')]
    block = b"x" * (1 << 20)
    for _ in range(size // len(block)):
        parts.append(packer.compress(block))
    parts.append(packer.compress(b"x" * (size % len(block)) + b'"}}]}'))
    parts.append(packer.flush())
    return b"".join(parts)


# the request and answer shape of each task
_SHAPES = {"llm/v1/chat": "chat", "agent/v1/chat": "chat", "llm/v1/completions": "completions",
           "agent/v2/chat": "chat_agent", "agent/v1/responses": "responses"}


def _nth_text(text: str, index: int) -> str:
    """Answer ``index`` of several (``n``): the first as it is, the others told apart (``... [2]``)."""
    return text if index == 0 or not text else f"{text} [{index + 1}]"


def _nth(message: dict[str, Any], index: int) -> dict[str, Any]:
    return {**message, "content": _nth_text(message["content"], index)} if isinstance(message.get("content"), str) \
        else message


def _scim_me(user: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /api/2.0/preview/scim/v2/Me`` answers (a user; a service principal has ``applicationId``)."""
    return {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], **user, "active": True,
            "emails": [{"value": user.get("userName", ""), "type": "work", "primary": True}]}


def _count(handler: _Handler) -> int:
    return handler.workspace._counter


def _text(content: Any) -> str:
    """A message's content as text: a string, or a list of parts with ``text``."""
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else str(content)


def _output_item(text: str) -> dict[str, Any]:
    return {"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def _responses_usage(usage: dict[str, int]) -> dict[str, int]:
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "total_tokens": usage["total_tokens"]}


# -- structured output and tools -------------------------------------------------------------------

def judge_reply(prompt: str) -> dict[str, str]:
    """The local judge's deterministic verdict on a `dbmagic.judge` prompt (its material: a JSON
    object with ``question``, ``input``, ``answer`` and maybe ``expected``), ``{"value": "yes"|"no",
    "rationale"}``: with a phrase in double quotes in the question, whether the answer contains that
    phrase; else, with an expected answer, whether the answer contains it; else whether there is an
    answer at all (case is ignored). It reads the material as JSON, as a model reads it: a part of
    the answer that looks like another part is text of the answer."""
    start = prompt.find("{")
    try:
        material, _ = json.JSONDecoder().raw_decode(prompt, start) if start >= 0 else ({}, 0)
    except ValueError:
        material = {}
    material = material if isinstance(material, dict) else {}
    answer, expected = str(material.get("answer") or ""), material.get("expected")
    question = str(material.get("question") or "")
    quoted = re.search(r'"([^"]+)"', question)
    wanted = quoted.group(1) if quoted else str(expected) if expected is not None else None
    if wanted is None:
        ok = bool(answer)
        return {"value": "yes" if ok else "no", "rationale": "There is an answer." if ok else "The answer is empty."}
    ok = wanted.casefold() in answer.casefold()
    return {"value": "yes" if ok else "no",
            "rationale": f"The answer {'contains' if ok else 'does not contain'} {wanted!r}."}


def schema_reply(schema: dict[str, Any], prompt: str) -> Any:
    """The local workspace's deterministic JSON answer that fits ``schema`` (a JSON Schema), made
    from ``prompt``: a string is the first phrase in double quotes of the prompt, or the prompt itself, an integer the number of words in it, a number
    that number / 10, a boolean whether it is even, a list the first three words (as the list's item
    type makes them), a choice (``enum``) the one at (number of words modulo the number of choices),
    an object every property filled so; where only null fits, null."""
    words = prompt.split()
    quoted = re.search(r'"([^"]+)"', prompt)
    phrase = quoted.group(1) if quoted else prompt
    root = schema

    def make(node: Any, depth: int = 0) -> Any:
        node = _followed(root, node)
        if depth > 12 or not isinstance(node, dict):
            return None
        if "const" in node:
            return node["const"]
        if node.get("enum"):
            choices = [c for c in node["enum"] if c is not None] or [None]
            return choices[len(words) % len(choices)]
        typed = node.get("type")
        if isinstance(typed, list):
            typed = next((t for t in typed if t != "null"), "null")
        if typed is None:
            for key in ("anyOf", "oneOf", "allOf"):
                options = [o for o in node.get(key) or () if _followed(root, o).get("type") != "null"]
                if options:
                    return make(options[0], depth + 1)
            typed = "object" if "properties" in node else "string"
        if typed == "object":
            return {name: make(sub, depth + 1) for name, sub in (node.get("properties") or {}).items()}
        if typed == "array":
            if depth > 3:  # a recursive schema (a tree) ends in empty lists, as a model's answer would
                return []
            items = node.get("items") or {"type": "string"}
            if _followed(root, items).get("type") == "string" and not _followed(root, items).get("enum"):
                return words[:3]
            return [make(items, depth + 1) for _ in words[:2]]
        if typed == "integer":
            return len(words)
        if typed == "number":
            return len(words) / 10
        if typed == "boolean":
            return len(words) % 2 == 0
        if typed == "null":
            return None
        return phrase

    return make(schema)


def _followed(root: Any, node: Any) -> dict[str, Any]:
    """``node`` with a local ``$ref`` followed (pydantic writes nested models so)."""
    for _ in range(16):
        if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/")):
            break
        target = root
        for part in node["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        node = target
    return node if isinstance(node, dict) else {}


def _asked(turns: list[Any]) -> str:
    """The prompt a conversation asks about: the last user turn, or, when it asks again for an answer
    that did not fit a schema (dbmagic's retry), the question before it."""
    from dbmagic.call.schema import RETRY_NOTE

    users = [_text(m.get("content")) for m in turns if isinstance(m, dict) and m.get("role") == "user"]
    asked = [u for u in users if not u.startswith(RETRY_NOTE)]
    return (asked or users or [""])[-1]


def _off_schema(value: Any) -> Any:
    """``value`` with its first field given a value of the wrong type (a model that did not follow)."""
    if isinstance(value, dict) and value:
        first = next(iter(value))
        wrong = {str: 12345, bool: "maybe", int: "many", float: "high", list: "not a list", dict: "not an object"}
        return {**value, first: wrong.get(type(value[first]), "unexpected")}
    return {"unexpected": value}


def _wanted_schema(shape: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema the request asks the answer to fit, or None; ValueError for a malformed one."""
    if shape == "responses":
        fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return None
        holder, where = fmt, "text.format"
    else:
        fmt = body.get("response_format")
        if not isinstance(fmt, dict):
            return None
        if fmt.get("type") == "json_object":
            return {"type": "object", "properties": {"answer": {"type": "string"}}}
        if fmt.get("type") != "json_schema":
            raise ValueError(f"response_format.type must be json_schema or json_object; got {fmt.get('type')!r}.")
        holder, where = fmt.get("json_schema"), "response_format.json_schema"
        if not isinstance(holder, dict):
            raise ValueError("response_format.json_schema is required when the type is json_schema.")
    if not holder.get("name"):
        raise ValueError(f"{where}.name is required.")
    if not isinstance(holder.get("schema"), dict):
        raise ValueError(f"{where}.schema must be a JSON Schema object.")
    return holder["schema"]


def _instructed(prompt: str) -> tuple[str, dict[str, Any] | None]:
    """A prompt that carries dbmagic's schema instruction: ``(the prompt before it, the schema)``."""
    from dbmagic.call.schema import INSTRUCTION

    before, found, after = prompt.partition(INSTRUCTION)
    if not found:
        return prompt, None
    try:
        schema, _ = json.JSONDecoder().raw_decode(after.lstrip())
    except ValueError:
        return prompt, None
    return before.strip(), schema if isinstance(schema, dict) else None


def _json_text(value: Any, fenced: bool) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"Here is the JSON you asked for:\n```json\n{text}\n```" if fenced else text


def _reply_text(prompt: str, *, system: str | None = None, stop: list[str] | None = None,
                max_tokens: int | None = None, fault: Fault | None = None) -> tuple[str, str]:
    """What a model that follows instructions answers a plain prompt: JSON (fenced, as such models
    write it) when the prompt carries dbmagic's schema instruction, else `echo_reply`."""
    before, schema = _instructed(prompt)
    if schema is None:
        return echo_reply(prompt, system=system, stop=stop, max_tokens=max_tokens)
    value = schema_reply(schema, before)
    return _json_text(_off_schema(value) if fault is not None and fault.off_schema else value, True), "stop"


def _reply(endpoint: Endpoint, body: dict[str, Any], shape: str, turns: list[Any], prompt: str,
           system: str | None, fault: Fault | None) -> dict[str, Any]:
    """The answer to a chat, agent or completions request: text, finish reason and tool calls."""
    if fault is not None and fault.text is not None:
        return {"text": fault.text, "finish": "stop"}
    tools = body.get("tools") if shape in ("chat", "responses") else None
    if tools and body.get("tool_choice") != "none":
        results = _tool_results(shape, turns)
        if not results or endpoint.tool_loop:
            if fault is not None and fault.tool_call:
                wanted = fault.tool_call
                call = {"name": str(wanted.get("name")), "arguments": json.dumps(wanted.get("arguments", {}))}
            else:
                call = _scripted_call(tools, shape, prompt)
            number = sum(1 for _ in results) + 1
            call["id"] = f"call_{number}_{hashlib.md5(prompt.encode()).hexdigest()[:8]}"
            return {"text": "", "finish": "tool_calls", "tool_calls": [call]}
        return {"text": f"Echo: {prompt}" + "".join(f" | {name} -> {content}" for name, content in results),
                "finish": "stop"}
    schema = _wanted_schema(shape, body) if shape in ("chat", "responses") else None
    if endpoint.judge:
        return {"text": _json_text(judge_reply(prompt), schema is None and endpoint.json_style == "fenced"),
                "finish": "stop"}
    if schema is not None:
        value = schema_reply(schema, prompt)
        return {"text": _json_text(_off_schema(value) if fault is not None and fault.off_schema else value,
                                   endpoint.json_style == "fenced"), "finish": "stop"}
    text, finish = _reply_text(prompt, system=system, stop=body.get("stop"), max_tokens=body.get("max_tokens"),
                               fault=fault)
    return {"text": text, "finish": finish}


def _tool_definition(tool: Any, shape: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise ValueError("Each tool must be {\"type\": \"function\", ...}.")
    definition = tool if shape == "responses" else tool.get("function")
    if not isinstance(definition, dict) or not isinstance(definition.get("name"), str):
        where = "tools[i].name" if shape == "responses" else "tools[i].function.name"
        raise ValueError(f"{where} is required.")
    return definition


def _scripted_call(tools: list[Any], shape: str, prompt: str) -> dict[str, Any]:
    definitions = [_tool_definition(t, shape) for t in tools]
    chosen = next((d for d in definitions if d["name"] in prompt), definitions[0])
    parameters = chosen.get("parameters") or {"type": "object", "properties": {}}
    arguments = schema_reply(parameters, prompt)  # a model leaves out the parameters that have defaults
    required = parameters.get("required")
    if isinstance(arguments, dict) and isinstance(required, list):
        arguments = {k: v for k, v in arguments.items() if k in required}
    return {"name": chosen["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}


def _tool_results(shape: str, turns: list[Any]) -> list[tuple[str, str]]:
    """``(tool name, result)`` of each tool result after the last user turn."""
    last_user = max((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("role") == "user"), default=-1)
    names: dict[str, str] = {}
    results = []
    for turn in turns[last_user + 1:]:
        if not isinstance(turn, dict):
            continue
        if shape == "responses":
            if turn.get("type") == "function_call":
                names[str(turn.get("call_id"))] = str(turn.get("name"))
            elif turn.get("type") == "function_call_output":
                results.append((names.get(str(turn.get("call_id")), "?"), _text(turn.get("output"))))
        else:
            for call in turn.get("tool_calls") or ():
                if isinstance(call, dict):
                    names[str(call.get("id"))] = str((call.get("function") or {}).get("name"))
            if turn.get("role") == "tool":
                results.append((names.get(str(turn.get("tool_call_id")), "?"), _text(turn.get("content"))))
    return results


def _refused_by_quirks(endpoint: Endpoint, body: dict[str, Any], shape: str, turns: list[Any]) -> str | None:
    """What Databricks refuses that the OpenAI API takes (the quirks databricks_openai works around)."""
    model = endpoint.model.lower()
    for i, tool in enumerate(body.get("tools") or () if shape in ("chat", "responses") else ()):
        definition = tool.get("function") if shape == "chat" and isinstance(tool, dict) else tool
        if isinstance(definition, dict) and "strict" in definition and "gpt" not in model:
            return f"tools[{i}]: 'strict' is not supported by {endpoint.model}."
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            continue
        empty = turn.get("content") in (None, "", [])  # a space is what databricks_openai sends, and is taken
        if "claude" in model and turn.get("role") == "assistant" and turn.get("tool_calls") and empty:
            return f"messages[{i}]: an assistant message with tool calls must have non-empty content."
        if shape == "responses" and isinstance(turn.get("id"), str) and len(turn["id"]) > 64:
            return f"input[{i}].id: string too long, at most 64 characters (got {len(turn['id'])})."
    return None


def _chat_tool_call(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def _function_call_item(call: dict[str, Any]) -> dict[str, Any]:
    # the Foundation Model APIs' item ids are longer than the 64 characters they take back as input
    item_id = "fc_" + hashlib.sha256(call["id"].encode()).hexdigest()[:67]
    return {"type": "function_call", "id": item_id, "call_id": call["id"], "name": call["name"],
            "arguments": call["arguments"], "status": "completed"}


def _records(body: dict[str, Any]) -> list[Any] | None:
    if "dataframe_records" in body:
        return list(body["dataframe_records"])
    if "dataframe_split" in body:
        split = body["dataframe_split"]
        return [dict(zip(split.get("columns", []), row, strict=False)) for row in split.get("data", [])]
    if "instances" in body:
        return list(body["instances"])
    if "inputs" in body:
        inputs = body["inputs"]
        return list(inputs) if isinstance(inputs, list) else [inputs]
    return None


def _echo_predictions(records: list[Any]) -> list[Any]:
    out = []
    for record in records:
        if isinstance(record, dict) and "prompt" in record:
            out.append(_reply_text(str(record["prompt"]), stop=record.get("stop"))[0])
        else:
            out.append(record)
    return out


class _AppHandler(_Handler):
    """An app's own server: ``POST /responses`` to OAuth tokens only."""

    app: App

    def _dispatch(self, method: str) -> None:
        ws, app = self.workspace, self.app
        _, body, headers, sent, path = self._read()
        token = sent[len("Bearer "):] if sent.startswith("Bearer ") else ""
        with ws._lock:
            oauth = ws._issued.get(token, 0) > time.time()
        credential = ("oauth" if oauth else "personal access token" if token and secrets.compare_digest(token, ws.token)
                      else "other" if sent else "none")
        if not app.running:  # stopped while a connection stayed open: as a stopped app, no answer
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return
        self._record = RecordedRequest(method, path, headers, body, oauth, at=time.monotonic(), credential=credential)
        app.requests.append(self._record)
        if not oauth:
            return self._json(401, {"error": "unauthorized", "message": "Databricks Apps accept OAuth tokens only."})
        if method != "POST" or path.rstrip("/") != "/responses":
            return self._json(404 if method == "POST" else 405, {"error": f"Not Found: {method} {path}"})
        return self._serve(app.endpoint, body, path)  # its rate limit, a fault queued for apps/NAME, its latency
