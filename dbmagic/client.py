"""The dbmagic client: one per kernel, shared by the magic, the panel and your own code.

>>> import dbmagic
>>> client = dbmagic.get_client()            # finds the workspace by itself
>>> client.complete("How are you?", endpoint="databricks-meta-llama-3-3-70b-instruct").text
>>> for piece in client.stream("Tell me a story", endpoint="databricks-meta-llama-3-3-70b-instruct"):
...     print(piece, end="")

A call goes: prompt + parameters -> the seed-shaped request ``{"prompt", "temperature", "stop", ...}``
-> ``transform_input(**request)`` -> the wire body of the endpoint's kind -> one HTTP request (with
bounded retries) -> the parsed answer -> ``transform_output(value)`` -> a `Completion`.

The `Client` finds the workspace and what a name given as ``-e`` is (a serving endpoint, a model
service, an app, a driver-proxy app), builds each request with the one builder
(`dbmagic.call.wire.build_request`), and makes each `Call` (`dbmagic.call.call`), handing it the
transport, the credentials the request carries, the subscribers and the cache. The data types of a
call are in `dbmagic.call.model`, the Databricks Apps login rules in `dbmagic.transport.apps`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

from . import settings
from .call import hooks, kinds, ledger, wire
from .call.answers import Usage
from .call.call import Call, megabytes, read_json
from .call.model import (
    PARTIAL,
    CallOptions,
    Completion,
    EndpointInfo,
    PreparedRequest,
    Step,
    Transform,
    checked_options,
    refuse_unknown_options,
    with_call_options,
)
from .errors import BadResponse, ConfigurationError, DbMagicError, RequestError, scrub
from .prompts.transforms import apply_input
from .transport.apps import NOTEBOOK_LOGINS, app_url_or_none, apps_login
from .transport.credentials import Credentials, org_id_from_host, resolve_credentials
from .transport.http import BodyTooLarge, Handler, Timeouts, Transport
from .transport.retry import Clock, RetryPolicy
from .transport.secret import Secret

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Client", "CallOptions", "Call", "Completion", "Step", "PreparedRequest", "EndpointInfo", "Usage",
           "get_client", "configure", "set_default", "PARTIAL", "refuse_unknown_options"]

log = logging.getLogger("dbmagic")
_WORKSPACE_ANSWER_LIMIT = 64 << 20  # bytes of a workspace API's answer (an endpoint list, an app)


class Target(NamedTuple):
    """Where a call goes: its request ``kind``, the ``path`` on its host, the ``label`` messages use
    (``endpoint 'name'``), its ``name`` (as ``-e`` gave it, or ``CLUSTER:PORT``), ``where`` it is
    (`dbmagic.call.kinds.target_of`) and an app's ``url`` (None for the workspace's own targets)."""

    kind: str
    path: str
    label: str
    name: str
    where: str
    url: str | None = None


class Client:
    """Talks to Databricks Model Serving endpoints and cluster driver-proxy apps.

    Credentials are found in this order: ``host=``/``token=`` (or ``profile=``, or a service
    principal's ``host=``, ``client_id=`` and ``client_secret=``: OAuth M2M), the Databricks
    notebook context, ``DATABRICKS_HOST``/``DATABRICKS_TOKEN``, then ``~/.databrickscfg``. They are
    resolved on first use; ``client.credentials.source`` says which one was used.

    ``timeouts``, ``retry``, ``clock``, ``jitter`` (the random fraction a backoff takes, for the
    transport and a batch's pace), ``session`` and ``handler`` (what sends one HTTP request:
    `dbmagic.testing.MemoryHandler` answers from memory) are seams for tuning and for tests.
    ``apps`` hands the client an app's URL and OAuth credentials (``{name: (url, credentials)}``:
    what a Spark task gets from the driver), and ``signer`` the principal and key that sign what it
    keeps in a checkpoint (`dbmagic.ledger.Signer`: a Spark task's are the driver's, so every
    executor's records verify wherever they are read). ``subscribe`` adds a subscriber to this client's calls
    (`dbmagic.hooks`).
    """

    def __init__(
        self,
        host: str | None = None,
        token: str | None = None,
        *,
        profile: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        credentials: Credentials | None = None,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        clock: Clock | None = None,
        session: Any = None,
        pool_size: int = 16,
        handler: Handler | None = None,
        jitter: Callable[[], float] = random.random,
        apps: Mapping[str, tuple[str, Credentials]] | None = None,
        signer: ledger.Signer | None = None,
    ):
        token = Secret(token) if token else None  # from here on no frame holds it as a plain str
        client_secret = Secret(client_secret) if client_secret else None
        self._explicit = (host, token, profile)
        self._service_principal = (client_id, client_secret)
        self._credentials = credentials
        self._lock = threading.Lock()
        self._endpoints: dict[str, EndpointInfo] = {}
        self._lookups: dict[str, threading.Lock] = {}  # one look-up of an endpoint at a time
        self._org: str | None = None
        self._app_urls: dict[str, str] = {}  # app name -> the URL the workspace's Apps API gave, per kernel
        self._app_credentials: dict[str, Credentials] = {}  # app URL -> OAuth credentials for it
        for name, (url, app_credentials) in (apps or {}).items():
            self._app_urls[name], self._app_credentials[url] = url, app_credentials
        # who the workspace says this login is (SCIM Me), and what signs and verifies what it keeps in a
        # ledger; handed in (a Spark task's, by the driver: one key for every executor) or found on first use
        self._principal: ledger.Principal | None = signer.principal if signer is not None else None
        self._signer: ledger.Signer | None = signer
        self.hooks = hooks.Hooks(parent=hooks.GLOBAL)
        self.jitter = jitter
        if handler is None:  # the real one: a requests.Session (imported here: the transport knows no library)
            from .transport.requests_handler import RequestsHandler

            handler = RequestsHandler(session=session, pool_size=pool_size)
        self.transport = Transport(timeouts=timeouts, retry=retry, clock=clock, rand=jitter, handler=handler)

    def __repr__(self) -> str:
        if self._credentials is None:
            return "Client(credentials not resolved yet)"
        return f"Client(host={self._credentials.host!r}, source={self._credentials.source!r})"

    # -- credentials and discovery -------------------------------------------------------------

    @property
    def credentials(self) -> Credentials:
        """The workspace host, token and their source, resolved on first use."""
        if self._credentials is None:
            with self._lock:
                if self._credentials is None:
                    host, token, profile = self._explicit
                    client_id, client_secret = self._service_principal
                    self._credentials = resolve_credentials(host, token, profile, client_id=client_id,
                                                            client_secret=client_secret)
        return self._credentials

    @property
    def retry(self) -> RetryPolicy:
        """The retry policy of every call (unless a call gives its own)."""
        return self.transport.retry

    @property
    def timeouts(self) -> Timeouts:
        return self.transport.timeouts

    @property
    def clock(self) -> Clock:
        """The clock every wait goes through (a seam for tests)."""
        return self.transport.clock

    def ensure_pool(self, size: int) -> None:
        """Keep ``size`` connections open to the workspace (a batch's concurrency)."""
        self.transport.ensure_pool(size)

    def subscribe(self, subscriber: Any) -> Callable[[], None]:
        """Tell ``subscriber`` about this client's calls (`dbmagic.hooks`); returns the function that
        unsubscribes it."""
        return self.hooks.add(subscriber)

    def whoami(self) -> dict[str, str]:
        """Host, credential source, ``token: ***``, and what Databricks Apps would get (`_apps_login`)."""
        creds = self.credentials
        info = creds.describe()
        factory, how = apps_login(creds)
        info["databricks apps"] = how if factory is not None else f"not reachable: {how} (Apps take OAuth only)"
        return info

    def principal(self) -> ledger.Principal:
        """Who this client's login is, as the workspace says (``GET /api/2.0/preview/scim/v2/Me``:
        the user's or service principal's id and name), asked once: a rotated notebook token is the
        same principal. What the ledger's records say paid for them."""
        if self._principal is None:
            host = self.credentials.host
            try:
                data = self._get("/api/2.0/preview/scim/v2/Me", "who you are (SCIM Me)")
            except RequestError as exc:  # no SCIM here: the ledger's key alone tells this login's records apart
                log.warning("dbmagic could not ask the workspace who you are (%s); the answers you keep in a "
                            "checkpoint or cache are told apart by this machine's ledger key alone.", exc.status)
                data = None
            found = data if isinstance(data, dict) else {}
            name = found.get("userName") or found.get("applicationId") or "unknown"
            self._principal = ledger.Principal(host, str(found.get("id") or "unknown"), str(name)[:200])
        return self._principal

    def signer(self) -> ledger.Signer:
        """What signs the records this principal writes to a checkpoint or the cache, and verifies
        the ones it reads (`dbmagic.ledger.Signer`, its key outside any ledger's folder)."""
        if self._signer is None:
            principal = self.principal()
            on_databricks = self.credentials.auth_type in NOTEBOOK_LOGINS
            self._signer = ledger.Signer.load(principal, ledger.key_folder(principal, on_databricks))
        return self._signer

    def endpoints(self) -> list[EndpointInfo]:
        """The workspace's serving endpoints (``GET /api/2.0/serving-endpoints``), fetched afresh."""
        data = self._get("/api/2.0/serving-endpoints", "the serving endpoints list")
        infos = [EndpointInfo.from_json(e) for e in data.get("endpoints") or []]
        self._endpoints.update((i.name, i) for i in infos)
        return infos

    def endpoint(self, name: str, *, refresh: bool = False) -> EndpointInfo:
        """One endpoint's description, cached for the client's life unless ``refresh``. The first
        calls of a batch arrive together: one of them looks the endpoint up, the others wait for it."""
        if not refresh and name in self._endpoints:
            return self._endpoints[name]
        with self._lock:
            lookup = self._lookups.setdefault(name, threading.Lock())
        with lookup:
            if refresh or name not in self._endpoints:
                data = self._get(f"/api/2.0/serving-endpoints/{quote(name, safe='')}", f"endpoint {name!r}")
                info = self._endpoints[name] = EndpointInfo.from_json(data)
                log.debug("endpoint %r: task %s, so dbmagic sends %s requests", name, info.task or "none (a custom "
                          "model)", info.kind)
            return self._endpoints[name]

    def _org_id(self) -> str:
        """The workspace's org id, for driver-proxy URLs: asked of ``/.well-known/databricks-config``
        once (its ``workspace_id``, else the ``x-databricks-org-id`` header of the answer); ``0``
        (what LangChain sends) if the workspace does not say."""
        if self._org is None:
            try:
                data, headers = self._get_with_headers("/.well-known/databricks-config",
                                                       "the workspace's configuration")
            except RequestError:
                data, headers = None, {}
            found = data.get("workspace_id") if isinstance(data, dict) else None
            header = headers.get("x-databricks-org-id") or ""
            self._org = str(found) if found else header if header.isdigit() else "0"
            log.debug("driver-proxy org id: %s", self._org)
        return self._org

    def _get(self, path: str, target: str) -> Any:
        return self._get_with_headers(path, target)[0]

    def _get_with_headers(self, path: str, target: str) -> tuple[Any, Mapping[str, str]]:
        response = self.transport.request(self.credentials, "GET", path, target=target)
        try:
            content = response.content(_WORKSPACE_ANSWER_LIMIT)
        except BodyTooLarge:
            raise BadResponse(f"The workspace sent more than {megabytes(_WORKSPACE_ANSWER_LIMIT)} for {target}",
                              target=target) from None
        return read_json(content, target, response.status), response.headers

    # -- calls ---------------------------------------------------------------------------------

    @with_call_options
    def prepare(self, prompt: Any, endpoint: str | None = None, *, stream: bool = False,
                **options: Unpack[CallOptions]) -> PreparedRequest:
        """Build the request a call would send, without sending it (the dry run). See `CallOptions`.
        A request that cannot be built is told to the subscribers (``on_refused``: with tracing on,
        an error span)."""
        return self._prepared(prompt, endpoint, stream, options, "Client.prepare")

    def _prepared(self, prompt: Any, endpoint: str | None, stream: bool, options: Mapping[str, Any],
                  called: str) -> PreparedRequest:
        refuse_unknown_options(options, called)  # a TypeError, as any Python call: not a refused request
        return self._telling_refusals(endpoint, prompt, lambda: self._build(endpoint, stream, options)(prompt))

    def _telling_refusals(self, endpoint: Any, prompt: Any, build: Callable[[], PreparedRequest]) -> PreparedRequest:
        """``build()``, telling the subscribers (``on_refused``) when the request cannot be built."""
        try:
            return build()
        except DbMagicError as exc:
            if self.hooks:
                self.hooks.fire("on_refused", endpoint if isinstance(endpoint, str) else None, prompt, exc)
            raise

    @with_call_options
    def preparer(self, endpoint: str | None = None, *, stream: bool = False,
                 **options: Unpack[CallOptions]) -> Callable[[Any], PreparedRequest]:
        """`prepare` for many prompts with the same options (a batch): the options are checked and
        the endpoint looked up once, here; the function returned builds each prompt's request."""
        refuse_unknown_options(options, "Client.preparer")
        build = self._build(endpoint, stream, options)

        return lambda prompt: self._telling_refusals(endpoint, prompt, lambda: build(prompt))

    def _build(self, endpoint: str | None, stream: bool, options: Mapping[str, Any]) -> Callable[[Any], PreparedRequest]:
        """The options checked and the target found once; the function that builds each prompt's
        request (`dbmagic.call.wire.build_request` decides its body)."""
        o = checked_options(options)
        if endpoint is not None:
            endpoint = settings.coerce("endpoint", endpoint)
        target = self._target(endpoint, o["cluster_id"], o["port"], o["org_id"], o["task"])
        kind = target.kind
        problem = wire.not_for_kind("--system", kind, target.label) if o["system"] else None
        if problem is None and o["service_tier"]:
            problem = wire.no_service_tier(kind, target.where, target.label)
        if problem:  # never silently dropped
            raise ConfigurationError(problem)
        schema, toolbox = _answer_shape(o, kind, target.label)
        info = self._endpoints.get(endpoint) if endpoint else None
        transform = o["transform_input"]
        plan = wire.Plan(
            kind=kind, where=target.where, name=target.name, target=target.label,
            params={"temperature": o["temperature"], "max_tokens": o["max_tokens"], "stop": o["stop"] or None,
                    "n": o["n"], "service_tier": o["service_tier"], **(o["extra_params"] or {})},
            external=info is not None and info.endpoint_type == "EXTERNAL_MODEL",
            model=" ".join([target.name, *(info.served if info is not None else ())]).lower(),
            system=o["system"], history=tuple(o["history"] or ()), stream=stream, schema=schema, tools=toolbox,
            transform=(lambda request: apply_input(transform, request)) if transform is not None else None)
        host = target.url or self.credentials.host
        rules = {"schema_retries": 1 if o["schema_retries"] is None else o["schema_retries"],
                 "run_tools": bool(o["run_tools"]), "max_steps": o["max_steps"] or 5,
                 "max_tool_runs": o["max_tool_runs"] or settings.BY_NAME["max_tool_runs"].default,
                 "max_answer_bytes": int((o["max_answer_mb"] or settings.BY_NAME["max_answer_mb"].default) * (1 << 20))}
        llm = _llm_of(target.where, target.name, info)

        def build(prompt: Any) -> PreparedRequest:
            body = wire.build_request(plan, prompt)
            return PreparedRequest(kind, target.label, target.path, body, host, stream=stream and kind in
                                   kinds.STREAMING_KINDS, name=target.name, schema=schema, tools=toolbox,
                                   model=plan.model, where=target.where, llm=llm, **rules)

        return build

    @with_call_options
    def complete(self, prompt: Any, endpoint: str | None = None, *, transform_output: Transform | None = None,
                 timeout: float | None = None, **options: Unpack[CallOptions]) -> Completion:
        """Send one prompt and wait for the whole answer.

        ``endpoint`` names a serving endpoint; or give ``cluster_id`` and ``port`` for a driver-proxy
        app. ``transform_output(value) -> value`` reads the answer; ``timeout`` bounds the wait (seconds).
        The other options are `CallOptions`. A cut answer raises `AnswerCut` (its ``.completion`` is
        what arrived).
        """
        prepared = self._prepared(prompt, endpoint, False, options, "Client.complete")
        return self.call(prepared, transform_output=transform_output, timeout=timeout).wait()

    @with_call_options
    def stream(self, prompt: Any, endpoint: str | None = None, *, transform_output: Transform | None = None,
               timeout: float | None = None, **options: Unpack[CallOptions]) -> Call:
        """Send one prompt and iterate over the answer's text as it arrives (options as `complete`).

        Endpoints that do not stream (embeddings, custom models, proxy apps) give their whole text
        as one piece. After the loop, ``stream.completion`` holds the `Completion`. A cut stream
        raises `StreamInterrupted`, whose ``.partial`` (and ``stream.text``) keep what arrived.
        The request is sent here: an error answer raises before the loop.
        """
        prepared = self._prepared(prompt, endpoint, True, options, "Client.stream")
        return self.call(prepared, transform_output=transform_output, timeout=timeout).start()

    def call(self, prepared: PreparedRequest, *, transform_output: Transform | None = None,
             timeout: float | None = None, retry: RetryPolicy | None = None,
             tags: Mapping[str, Any] | None = None, use_cache: bool = True) -> Call:
        """The `Call` that sends ``prepared`` (built by `prepare`; streamed when it was prepared with
        ``stream=True`` and its kind streams). Nothing is sent until it is iterated, waited on or
        started. ``retry`` overrides the client's policy for this call; ``tags`` are for the
        subscribers (the notebook's history reads ``tags["conversation"]``). ``use_cache=False``:
        the kernel's cache neither answers nor keeps it (a batch's packed request: the cache keeps
        each row's answer)."""
        call = Call(prepared, transport=self.transport, credentials=self.credentials_for(prepared), hooks=self.hooks,
                    cache=ledger.cache() if use_cache else None, signer=self.signer, transform_output=transform_output,
                    timeout=None if timeout is None else settings.coerce("timeout", timeout), retry=retry,
                    tags=dict(tags or {}))
        if self.hooks:
            self.hooks.fire("on_request", call)
        return call

    def _target(self, endpoint: str | None, cluster_id: Any, port: Any, org_id: Any, task: str | None) -> Target:
        """Where a call goes (`Target`; a name's meaning is `dbmagic.call.kinds.target_of`)."""
        if endpoint and (cluster_id or port):
            raise ConfigurationError(
                "Give either an endpoint or a driver-proxy app (cluster id and port), not both."
            )
        if endpoint:
            where, bare = kinds.target_of(endpoint)
            if where == kinds.APP:
                if self._app_urls.get(bare) not in self._app_credentials:  # (a Spark task has both from the driver)
                    self._apps_login()  # a login with no OAuth token is refused here, before anything is sent
                url = self.app_url(bare)
                self.app_credentials(url)
                kind = kinds.kind_for(task) if task else kinds.RESPONSES
                return Target(kind, "/responses", f"app {bare!r}", endpoint, where, url)
            if where == kinds.MODEL_SERVICE:
                kind = kinds.kind_for(task) if task else kinds.CHAT
                route = "/responses" if kind == kinds.RESPONSES else "/chat/completions"
                return Target(kind, kinds.MODEL_SERVICES_PATH + route, f"model service {endpoint!r}", endpoint, where)
            kind = kinds.kind_for(task) if task else self.endpoint(endpoint).kind
            return Target(kind, f"/serving-endpoints/{quote(endpoint, safe='')}/invocations", f"endpoint {endpoint!r}",
                          endpoint, where)
        if port:
            creds = self.credentials
            cluster_id = cluster_id or creds.cluster_id
            if not cluster_id:
                raise ConfigurationError(
                    "A driver-proxy app needs the cluster id: pass cluster_id= (--cluster-id), or set "
                    "DATABRICKS_CLUSTER_ID; it is found by itself inside a Databricks notebook."
                )
            org_id = org_id or creds.workspace_id or org_id_from_host(creds.host) or self._org_id()
            cluster_id, org_id = settings.coerce("cluster_id", cluster_id), settings.coerce("org_id", org_id)
            path = f"/driver-proxy-api/o/{quote(str(org_id), safe='')}/{quote(cluster_id, safe='')}/{int(port)}"
            return Target(kinds.PROXY, path, f"proxy app on cluster {cluster_id} port {port}", f"{cluster_id}:{port}",
                          kinds.DRIVER_PROXY)
        raise ConfigurationError(
            "No endpoint given: pass endpoint= (--endpoint NAME, or %config DbLLM.endpoint = NAME), "
            "or cluster_id= and port= for a driver-proxy app. `%dbllm endpoints` lists the endpoints."
        )

    # -- Databricks Apps and model services ---------------------------------------------------

    def targets(self) -> tuple[list[EndpointInfo], list[str]]:
        """Everything ``-e`` takes, as `EndpointInfo`: the serving endpoints, the model services
        (``catalog.schema.name``) and the apps (``apps/NAME``); and notes on what could not be
        listed (the model services API is a Beta: a workspace without it answers 404)."""
        found = list(self.endpoints())
        notes = []
        try:
            found += [EndpointInfo(s["name"], "llm/v1/chat", "READY", "UNITY_AI_GATEWAY",
                                   tuple(s.get("supported_api_types") or ()), s) for s in self.model_services()]
        except RequestError as exc:
            notes.append(f"Model services (catalog.schema.name) could not be listed ({exc.status or 'no answer'} from "
                         "/api/2.1/unity-catalog/model-services); query one by its name all the same, e.g. "
                         "-e system.ai.claude-sonnet-4-5.")
        try:
            found += [EndpointInfo(f"apps/{a.get('name')}", "agent/v1/responses",
                                   (a.get("app_status") or {}).get("state") or "UNKNOWN", "DATABRICKS_APP",
                                   (str(a.get("url") or ""),), a) for a in self.apps()]
        except RequestError as exc:
            notes.append(f"Apps could not be listed ({exc.status or 'no answer'} from /api/2.0/apps).")
        return found, notes

    def apps(self) -> list[dict[str, Any]]:
        """The workspace's apps (``GET /api/2.0/apps``, every page): name, url and state of each."""
        found = self._listed("/api/2.0/apps", "apps", "the apps list")
        for app in found:
            url = app_url_or_none(app.get("url"), self.credentials.host)
            if url and isinstance(app.get("name"), str):
                self._app_urls.setdefault(app["name"], url)
        return found

    def model_services(self) -> list[dict[str, Any]]:
        """The Unity AI Gateway model services you can query (``GET /api/2.1/unity-catalog/model-services``,
        a Beta API, every page): each with ``name`` (``catalog.schema.name``, as ``-e`` takes it)."""
        return [{**s, "name": s["name"].removeprefix("model-services/")} for s in
                self._listed("/api/2.1/unity-catalog/model-services", "model_services", "the model services list")
                if isinstance(s.get("name"), str)]

    def _listed(self, path: str, key: str, what: str, pages: int = 50) -> list[dict[str, Any]]:
        """The objects under ``key`` of a workspace list API, following ``next_page_token``."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(pages):
            data = self._get(path + (f"?page_token={quote(token, safe='')}" if token else ""), what)
            if not isinstance(data, dict):
                break
            out += [item for item in data.get(key) or [] if isinstance(item, dict)]
            token = data.get("next_page_token")
            if not isinstance(token, str) or not token:
                break
        return out

    def app_url(self, name: str, *, refresh: bool = False) -> str:
        """The URL of app ``name``, as the workspace's Apps API gives it (``GET /api/2.0/apps/{name}``),
        asked once per kernel. Only that URL ever gets a token for the app: it must be https on a
        Databricks Apps domain (plain http only on loopback, for the local workspace)."""
        if not refresh and name in self._app_urls:
            return self._app_urls[name]
        if kinds.is_url(name):  # typed by the user: taken on a Databricks Apps domain only, never asked about
            url = app_url_or_none(name, self.credentials.host)
            if url is None:
                raise ConfigurationError(
                    f"{name[:120]!r} is not a URL dbmagic sends a token to: an app's URL must be https on a "
                    "Databricks Apps domain (*.databricksapps.com). Or name the app (-e apps/NAME): its URL then "
                    "comes from the workspace.")
            return url
        data = self._get(f"/api/2.0/apps/{quote(name, safe='')}", f"app {name!r}")
        raw = data.get("url") if isinstance(data, dict) else None
        state = ((data.get("app_status") or {}).get("state") if isinstance(data, dict) else None) or "unknown"
        if not raw:
            raise ConfigurationError(f"App {name!r} has no URL yet (its state: {state}): deploy it, then run the cell "
                                     "again.")
        url = app_url_or_none(raw, self.credentials.host)
        if url is None:
            raise ConfigurationError(
                f"App {name!r}: the workspace gave the URL {scrub(str(raw), self.credentials.secrets())[:120]!r}, "
                "which is not https on a Databricks Apps domain (*.databricksapps.com), so no token is sent to it.")
        self._app_urls[name] = url
        log.debug("app %r: %s (state %s)", name, url, state)
        return url

    def credentials_for(self, prepared: PreparedRequest) -> Credentials:
        """The credentials a request carries: the workspace's, or the OAuth ones of an app's URL."""
        if prepared.where == kinds.APP:
            return self.app_credentials(prepared.host)
        return self.credentials

    def _apps_login(self) -> tuple[Callable[[], Mapping[str, str]], str]:
        """`dbmagic.transport.apps.apps_login` of this client's login, or the error that says how to
        sign in with OAuth."""
        base = self.credentials
        factory, how = apps_login(base)
        if factory is None:
            raise ConfigurationError(
                f"Databricks Apps accept OAuth tokens only, and dbmagic signed in to {base.host} with {how} "
                f"({base.source}). Sign in with OAuth: `databricks auth login --host {base.host}` "
                "(then DATABRICKS_CONFIG_PROFILE=<profile>, or dbmagic.configure(profile=...)), or as a service "
                "principal (DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET). Inside a Databricks notebook this "
                "works by itself.")
        return factory, how

    def app_credentials(self, url: str) -> Credentials:
        """The OAuth credentials a request to the app at ``url`` carries (made once per URL; a
        login that gives no OAuth token is refused, saying how to sign in)."""
        found = self._app_credentials.get(url)
        if found is not None:
            return found
        base = self.credentials
        factory, how = self._apps_login()
        found = Credentials(url, f"{base.source}, {how}", auth_type="oauth (Databricks Apps)", _header_factory=factory,
                            _sign_in_secrets=tuple(base.secrets()))
        with self._lock:
            return self._app_credentials.setdefault(url, found)

    def close(self) -> None:
        """Close the HTTP session (its pooled connections)."""
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _llm_of(where: str, name: str, info: EndpointInfo | None) -> tuple[str, str] | None:
    """``(model, provider)`` as MLflow's trace UI prices and groups a call (``mlflow.llm.model``,
    ``mlflow.llm.provider``): an external model's own name and provider; otherwise the target's
    name with provider ``databricks`` (MLflow prices ``databricks-*`` endpoint names from its
    Databricks catalog). None for a driver-proxy app, which names no model."""
    if where == kinds.DRIVER_PROXY:
        return None
    external = info.external_model if info is not None else None
    return external if external is not None else (name, "databricks")


def _answer_shape(options: Mapping[str, Any], kind: str, target: str) -> tuple[Any, Any]:
    """The call's `Schema` and `Toolbox` (None when not asked for), refused for a kind that cannot
    use them, before anything is sent."""
    from .call.schema import schema_of

    schema = schema_of(options["schema"]) if options["schema"] is not None else None
    toolbox = None
    if options["tools"] is not None:
        from .call.tools import toolbox_of

        toolbox = toolbox_of(options["tools"])
    if schema is not None and kind == kinds.EMBEDDINGS:
        raise ConfigurationError(f"--schema asks for an answer as data, and {target} answers embeddings (vectors). "
                                 "Drop --schema, or use a chat endpoint.")
    if toolbox is not None and kind not in kinds.TOOL_KINDS:
        raise ConfigurationError(f"--tools needs a chat endpoint or a Responses agent, and {target} takes {kind} "
                                 "requests. Drop --tools, or use a chat endpoint.")
    if options["run_tools"] and toolbox is None:
        raise ConfigurationError("--run-tools runs the functions named in --tools (tools=): name them, e.g. "
                                 "--tools weather,lookup.")
    return schema, toolbox


_default: Client | None = None
_default_lock = threading.Lock()


def set_default(client: Client | None) -> None:
    """Make ``client`` the kernel's shared one (None: a new one is made on next use); the one it
    replaces is closed. A seam for tests and tools; notebooks use `configure`."""
    global _default
    with _default_lock:
        old, _default = _default, client
    if old is not None and old is not client:
        old.close()


def get_client() -> Client:
    """The kernel's one shared client (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Client()
    return _default


def configure(host: str | None = None, token: str | None = None, *, profile: str | None = None,
              **client_options: Any) -> Client:
    """Replace the shared client, e.g. ``dbmagic.configure(host=..., token=dbutils.secrets.get(...))``.

    With no arguments it re-resolves the credentials from the notebook context, environment or
    profile (after you changed them).
    """
    global _default
    token = Secret(token) if token else None  # no frame holds it as a plain str (Verbose tracebacks)
    if client_options.get("client_secret"):
        client_options["client_secret"] = Secret(client_options["client_secret"])
    with _default_lock:
        old, _default = _default, Client(host, token, profile=profile, **client_options)
    if old is not None:
        old.close()
    return _default
