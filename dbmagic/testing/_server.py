"""The local workspace: a real threaded HTTP server that speaks the Databricks REST subset dbmagic uses."""

from __future__ import annotations

import base64
import json
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import ThreadingHTTPServer as _ThreadingHTTPServer
from typing import Any

from ._handler import AppHandler, Handler
from ._model import (
    DEFAULT_ENDPOINTS,
    LIMIT_MESSAGES,
    TOKEN_WINDOWS,
    WINDOWS,
    Endpoint,
    Fault,
    RecordedRequest,
    secret_fingerprint,
    token_limit_message,
)
from ._replies import echo_reply, judge_reply, reply_text, schema_reply

__all__ = ["LocalWorkspace", "Endpoint", "Fault", "App", "RecordedRequest", "echo_reply", "schema_reply", "judge_reply",
           "LIMIT_MESSAGES", "DEFAULT_ENDPOINTS", "secret_fingerprint", "token_limit_message"]


class ThreadingHTTPServer(_ThreadingHTTPServer):
    """The standard library's, with room for a cluster's connections at once: its listen backlog
    of 5 reset connections when a Spark job's tasks (each with its own pool) all connected at once."""

    request_queue_size = 512


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
        self.expire_after: int | None = None  # see expire_tokens_after
        self.token_exchanges = 0  # notebook tokens exchanged for OAuth tokens (RFC 8693)
        self.workspace_id = "1234567890123456"
        self.token_lifetime = 3600.0
        self.service_principals: dict[str, str] = {}
        # what the token endpoint was sent: (client_id, secret_fingerprint(client_secret)), never the secret
        self.client_credentials_seen: list[tuple[str, str]] = []
        self.issued: dict[str, float] = {}  # token -> expiry (time.time())
        self.issued_to: dict[str, dict[str, Any]] = {}  # an issued token -> its user, when not the workspace's
        # who a token belongs to, as SCIM's Me answers: the personal access token's user, other users'
        # tokens (add_user, new_token), and the service principals' OAuth tokens
        self.user: dict[str, Any] = {"id": "1001", "userName": "local.user@dbmagic.test", "displayName": "Local User"}
        self._users: dict[str, dict[str, Any]] = {}  # another token -> its user
        self.denied: dict[str, set[str]] = {}  # endpoint name -> the userNames refused with 403 PERMISSION_DENIED
        self._admitted: dict[str, deque[float]] = {}  # endpoint -> monotonic times within the last second
        self._tokens: dict[str, deque[tuple[float, int]]] = {}  # endpoint -> (time, tokens) within its token window
        self.metadata_path = "/metadata-service/" + secrets.token_hex(8)
        self._faults: dict[str, deque[Fault]] = {}
        # its HTTP side (`dbmagic.testing._handler`) reads and changes this state under `lock` (issued,
        # denied, counter, expire_after) and calls admit, accepts, take_fault, next_id, count_towards_expiry
        self.lock = threading.RLock()
        self.counter = 0
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalWorkspace:
        for app in self.apps.values():
            if app.wanted:
                app.start()
        if self._server is None:
            handler = type("Handler", (Handler,), {"workspace": self})
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
        with self.lock:
            self._users[token] = user
        return token

    def deny(self, endpoint: str, user_name: str) -> None:
        """``user_name`` may not query ``endpoint``: its invocations answer 403 PERMISSION_DENIED."""
        self.denied.setdefault(endpoint, set()).add(user_name)

    def user_of(self, authorization: str) -> dict[str, Any] | None:
        """The user an ``Authorization`` header's token belongs to (as Me answers), or None."""
        token = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else ""
        if token and secrets.compare_digest(token, self.token):
            return self.user
        with self.lock:
            if token in self._users:
                return self._users[token]
            if self.issued.get(token, 0) > time.time():
                return self.issued_to.get(token, self.user)
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
        with self.lock:
            self.issued[token] = expires
        return token

    def expire_tokens_after(self, invocations: int) -> None:
        """A job that outlives its token: ``invocations`` more invocations are accepted, then the
        tokens in use stop working (a 401 for each request after), as an OAuth or notebook token
        expires in the middle of a long batch: the personal access token becomes a new one (read
        ``token`` for it: the fresh token to resume with) and every issued OAuth token is revoked."""
        with self.lock:
            self.expire_after = invocations

    def count_towards_expiry(self) -> bool:
        with self.lock:
            if self.expire_after is None:
                return True
            if self.expire_after <= 0:
                self.token, self.expire_after = "dbmagic-local-" + secrets.token_hex(12), None
                self.issued.clear()
                return False
            self.expire_after -= 1
            return True

    def revoke_tokens(self) -> None:
        """Every issued OAuth token stops working (the personal access token still does)."""
        with self.lock:
            self.issued.clear()

    @property
    def metadata_service_url(self) -> str:
        """The URL of this workspace's metadata service (``DATABRICKS_METADATA_SERVICE_URL``)."""
        return self.host + self.metadata_path

    def admit(self, endpoint: Endpoint) -> float:
        """0 when ``endpoint`` may answer now, else the seconds until its rate limit frees a slot."""
        if not endpoint.rate_limit:
            return 0.0
        span = WINDOWS[endpoint.rate_window][0]
        now = time.monotonic()
        with self.lock:
            window = self._admitted.setdefault(endpoint.name, deque())
            while window and window[0] <= now - span:
                window.popleft()
            if len(window) < endpoint.rate_limit:
                window.append(now)
                return 0.0
            return max(window[0] + span - now, 0.001)

    def admit_tokens(self, endpoint: Endpoint, tokens: int) -> float:
        """0 when ``endpoint``'s token limit admits a request now (of ``tokens`` input tokens, for an
        input limit, which counts them; an output limit counts answers with `spent`), else the seconds
        until enough of its window frees."""
        if not endpoint.token_limit:
            return 0.0
        span = TOKEN_WINDOWS[endpoint.token_window]
        now = time.monotonic()
        with self.lock:
            window = self._tokens.setdefault(endpoint.name, deque())
            while window and window[0][0] <= now - span:
                window.popleft()
            used = sum(t for _, t in window)
            asked = tokens if endpoint.token_kind == "input" else 0
            fits = used + asked <= endpoint.token_limit or not window if asked else used < endpoint.token_limit
            if fits:  # (a request larger than the whole limit passes alone, into an empty window)
                if asked:
                    window.append((now, asked))
                return 0.0
            return max(window[0][0] + span - now, 0.001)

    def spent(self, endpoint: Endpoint, output_tokens: int) -> None:
        """An answer of ``output_tokens``: what an output token limit counts."""
        if endpoint.token_limit and endpoint.token_kind == "output":
            with self.lock:
                self._tokens.setdefault(endpoint.name, deque()).append((time.monotonic(), output_tokens))

    def accepts(self, authorization: str) -> bool:
        return self.user_of(authorization) is not None

    def fail(self, name: str | tuple[str, ...], status: int | None = None, **fault: Any) -> Fault:
        """Queue a fault for the next request(s) to endpoint ``name`` (its invocations), a proxy
        app (``"CLUSTER_ID:PORT"``), or an exact path such as ``/api/2.0/serving-endpoints``.
        Several names share one fault (``times`` counts them all): ``gather`` across endpoints."""
        f = Fault(status=status, **fault)
        with self.lock:
            for key in (name,) if isinstance(name, str) else name:
                self._faults.setdefault(key, deque()).append(f)
        return f

    def clear(self) -> None:
        """Forget logged requests, connection counts and pending faults."""
        with self.lock:
            self.requests.clear()
            self.connections = 0
            self._faults.clear()

    def take_fault(self, *keys: str) -> Fault | None:
        with self.lock:
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

    def next_id(self) -> str:
        with self.lock:
            self.counter += 1
            return f"local-{self.counter:06d}"


def _echo_app(body: Any) -> Any:
    if not isinstance(body, dict) or "prompt" not in body:
        raise ValueError("the app expects a JSON object with a 'prompt'")
    return reply_text(str(body["prompt"]), stop=body.get("stop"))[0]


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
            handler = type("AppHandler", (AppHandler,), {"workspace": self.workspace, "app": self})
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
