"""The dbmagic client: one per kernel, shared by the magic, the panel and your own code.

>>> import dbmagic
>>> client = dbmagic.get_client()            # finds the workspace by itself
>>> client.complete("How are you?", endpoint="databricks-meta-llama-3-3-70b-instruct").text
>>> for piece in client.stream("Tell me a story", endpoint="databricks-meta-llama-3-3-70b-instruct"):
...     print(piece, end="")

A call goes: prompt + parameters -> the seed-shaped request ``{"prompt", "temperature", "stop", ...}``
-> ``transform_input(**request)`` -> the wire body of the endpoint's kind -> one HTTP request (with
bounded retries) -> the parsed answer -> ``transform_output(value)`` -> a `Completion`.

Every call, whatever front end sends it (``%%dbllm``, the panel, compare, `dbmagic.batch`, your own
code), is one `Call`: ``client.call(client.prepare(...))`` iterates for pieces or ``wait()``s, ends
in a `Completion` (a partial one says why in ``finish_reason``), can be cancelled from another
thread, and tells the subscribers (`dbmagic.hooks`) as it goes. `Client.complete` and
`Client.stream` are the short ways to make one.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote

from . import settings
from .batching import ledger as _ledger
from .call import hooks
from .call import wire as _wire
from .call.wire import Usage
from .errors import (
    AnswerCut,
    BadResponse,
    ConfigurationError,
    ConnectionFailed,
    DbMagicError,
    RequestError,
    RequestTimeout,
    SchemaError,
    StreamInterrupted,
    StreamScrubber,
    TransformError,
    parse_error_body,
    scrub,
    scrub_value,
)
from .transport.credentials import Credentials, org_id_from_host, resolve_credentials
from .transport.http import BodyTooLarge, Clock, Handler, Response, RetryPolicy, Timeouts, Transport
from .transport.secret import Secret

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Client", "CallOptions", "Call", "Completion", "Step", "Stream", "PreparedRequest", "EndpointInfo", "Usage",
           "get_client", "configure", "PARTIAL"]

Transform = Callable[..., Any]
log = logging.getLogger("dbmagic")
# why an answer ended early: the connection or the stream broke, a Stop (cancel), a Ctrl-C
PARTIAL = ("cut", "stopped", "interrupted")


class CallOptions(TypedDict, total=False):
    """The keyword options of `Client.prepare`, `Client.complete` and `Client.stream`.

    - ``cluster_id``, ``port``, ``org_id``: a cluster driver-proxy app instead of an endpoint
      (``cluster_id`` is found by itself inside a Databricks notebook, ``org_id`` from the workspace);
    - ``task``: the request shape, when the endpoint's own is not the one to use
      (``chat``, ``completions``, ``embeddings``, ``custom``, or a task such as ``llm/v1/chat``);
    - ``system``: the system prompt; ``history``: earlier turns, ``[{"role": ..., "content": ...}]``
      (chat endpoints);
    - ``temperature``, ``max_tokens``, ``stop`` (a string or a list), ``n``: the usual parameters;
    - ``extra_params``: more request fields, merged into the request as they are
      (``{"top_p": 0.9}``), as LangChain's ``extra_params``; JSON values only;
    - ``transform_input``: ``f(**request) -> request``, applied before the endpoint's body is built;
    - ``schema``: the answer as data (`dbmagic.schema`): a pydantic model class, a JSON Schema dict
      or the short form ``"label: str, score: float"``; ``schema_retries`` (default 1): how many
      times an answer that does not fit is asked for again, with the problem appended;
    - ``tools``: functions the model may ask to call (`dbmagic.tools`); ``run_tools`` runs them and
      sends the results back, in at most ``max_steps`` (default 5) requests and ``max_tool_runs``
      (default 20) tool calls;
    - ``max_answer_mb`` (default 64): the largest answer taken, decompressed.

    Values are checked as ``%%dbllm`` checks its options (`dbmagic.settings`), before anything is sent.
    """

    cluster_id: str | None
    port: int | None
    org_id: str | None
    task: str | None
    system: str | None
    history: Sequence[Mapping[str, Any]]
    temperature: float | None
    max_tokens: int | None
    stop: str | Sequence[str] | None
    n: int | None
    extra_params: Mapping[str, Any] | None
    transform_input: Transform | None
    schema: Any
    schema_retries: int | None
    tools: Any
    run_tools: bool | None
    max_steps: int | None
    max_tool_runs: int | None
    max_answer_mb: float | None


def refuse_unknown_options(options: Mapping[str, Any], called: str) -> None:
    """An unknown keyword is a TypeError, as for any Python call, naming what the user called."""
    unknown = sorted(set(options) - set(CallOptions.__annotations__))
    if unknown:
        raise TypeError(f"{called}() got an unexpected keyword argument {unknown[0]!r}; its options are "
                        + ", ".join(CallOptions.__annotations__) + " (request fields go in extra_params=).")


def _checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every `CallOptions` key, with the given values checked (unknown keys were refused before)."""
    checked: dict[str, Any] = dict.fromkeys(CallOptions.__annotations__)
    for name, value in options.items():
        if name in settings.CLIENT_OPTIONS and value is not None:
            typed = settings.BY_NAME[name].type
            numeric_text = isinstance(value, str) and typed in (int, float)  # port="7777" from Python
            value = settings.from_text(name, value) if numeric_text else settings.coerce(name, value)
        checked[name] = value
    return checked


def _with_call_options(method: Callable[..., Any]) -> Callable[..., Any]:
    """Show the `CallOptions` keywords in ``help()`` and signatures, in place of ``**options``."""
    signature = inspect.signature(method)
    kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
             for name, annotation in CallOptions.__annotations__.items()]
    method.__signature__ = signature.replace(parameters=kept + added)  # type: ignore[attr-defined]
    return method


@dataclass(frozen=True)
class EndpointInfo:
    """One serving endpoint as the workspace describes it."""

    name: str
    task: str | None
    state: str
    endpoint_type: str | None
    served: tuple[str, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """The request shape dbmagic uses for it (see `dbmagic._wire`): chat, completions, embeddings,
        responses, chat_agent or custom."""
        return _wire.kind_for(self.task)

    @property
    def where(self) -> str:
        """serving endpoint, model service or app (`dbmagic._wire.target_of` of its name)."""
        return _wire.target_of(self.name)[0]

    @property
    def described(self) -> str:
        """What it is, in a word or two: its task for a serving endpoint, else what it is."""
        if self.where == _wire.SERVING:
            return self.task or "custom model"
        return "app (Responses API)" if self.where == _wire.APP else self.where

    @property
    def external_model(self) -> tuple[str, str] | None:
        """``(model, provider)`` of an external model endpoint's first served entity (``gpt-4o``,
        ``openai``), as the workspace describes it; None for other endpoints."""
        for entity in (self.raw.get("config") or {}).get("served_entities") or []:
            external = entity.get("external_model") if isinstance(entity, dict) else None
            if isinstance(external, dict) and external.get("name") and external.get("provider"):
                return str(external["name"]), str(external["provider"])
        return None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EndpointInfo:
        served = []
        for entity in (data.get("config") or {}).get("served_entities") or []:
            model = entity.get("foundation_model") or entity.get("external_model") or {}
            served.append(model.get("name") or entity.get("entity_name") or entity.get("name") or "")
        return cls(
            name=data.get("name", ""),
            task=data.get("task"),
            state=(data.get("state") or {}).get("ready", "UNKNOWN"),
            endpoint_type=data.get("endpoint_type"),
            served=tuple(s for s in served if s),
            raw=data,
        )


@dataclass(frozen=True)
class PreparedRequest:
    """Exactly what a call will send (what ``--dry-run`` shows). ``name`` is the endpoint's name (or
    ``CLUSTER:PORT`` for a driver-proxy app), as data; ``target`` the label messages use
    (``endpoint 'name'``)."""

    kind: str
    target: str
    path: str
    body: dict[str, Any]
    host: str
    stream: bool = False
    name: str = ""
    schema: Any = field(default=None, compare=False)  # a dbmagic.schema.Schema
    tools: Any = field(default=None, compare=False)  # a dbmagic.tools.Toolbox
    schema_retries: int = 1
    run_tools: bool = False
    max_steps: int = 5
    max_tool_runs: int = 20
    max_answer_bytes: int = 64 << 20
    model: str = field(default="", compare=False, repr=False)  # endpoint and served model names, lower case
    where: str = _wire.SERVING  # serving endpoint, model service, app or driver-proxy app (`_wire.target_of`)
    # (model, provider) as MLflow prices and groups usage (mlflow.llm.model / .provider); None: unknown
    llm: tuple[str, str] | None = field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        return self.host + self.path

    def describe(self) -> dict[str, Any]:
        """The request as a dict with the token hidden."""
        return {
            "method": "POST",
            "url": self.url,
            "headers": {"Authorization": "Bearer ***", "Content-Type": "application/json"},
            "json": self.body,
        }


@dataclass
class Completion:
    """One answer.

    ``choices`` holds every answer's text when ``n`` asked for several (``text`` is the first).
    ``value`` is what ``transform_output`` returned (else the natural value: the text for chat and
    completions, the vectors for embeddings, ``predictions[0]`` for custom models, the JSON value for
    proxy apps); ``text`` is the answer as text; ``raw`` the parsed JSON the server sent (for a
    streamed answer, the last event that carried data). ``endpoint`` is the endpoint's name
    (``CLUSTER:PORT`` for a driver-proxy app) and ``kind`` its request kind. ``usage`` is a
    `Usage` (``usage.input``, ``usage.output``, ``usage.total``). ``latency`` and
    ``time_to_first_token`` are in **seconds** (what is shown is in ms: ``latency_ms``).

    With a ``schema``, ``value`` is the parsed answer (a model instance or the JSON value) and
    ``text`` the raw answer; one that does not fit raises `SchemaError`, which keeps this
    Completion (``error`` is the SchemaError). ``tool_calls`` are the tools the answer asks for
    (`dbmagic._wire.ToolCall`: id, name, arguments); ``steps`` the earlier round trips of a call
    that went on (schema retries, tools run), and ``usage`` sums every round trip.

    ``finish_reason`` is ``length`` when ``max_tokens`` cut the answer, and for an answer that did
    not end normally (``is_partial``): ``cut`` (the connection or stream broke; ``error`` says how),
    ``stopped`` (cancelled, the panel's Stop) or ``interrupted`` (Ctrl-C). A partial answer's
    ``text`` and ``value`` are what arrived.
    """

    text: str
    value: Any
    endpoint: str
    kind: str
    raw: Any = field(default=None, repr=False)
    usage: Usage = field(default_factory=Usage)
    latency: float = 0.0
    request: dict[str, Any] = field(default_factory=dict, repr=False)
    request_id: str | None = None
    served_model: str | None = None
    finish_reason: str | None = None
    time_to_first_token: float | None = None
    attempts: int = 1
    error: BaseException | None = field(default=None, repr=False, compare=False)
    tool_calls: list[Any] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list, repr=False)
    schema: Any = field(default=None, repr=False, compare=False)  # the dbmagic.schema.Schema the value fits
    where: str = _wire.SERVING  # serving endpoint, model service, app or driver-proxy app
    cached: bool = False  # answered from the ledger (a checkpoint, the cache): not sent, not paid again
    # every answer's text when ``n`` asked for several (the first is ``text``); [] for one answer
    choices: list[str] = field(default_factory=list, repr=False)
    # the answer's own value, before a schema and transform_output read it (what the ledger keeps)
    natural: Any = field(default=None, repr=False, compare=False)

    @property
    def pending_tool_calls(self) -> list[Any]:
        """The tool calls asked for and not run (by dbmagic, or by the agent itself)."""
        return [c for c in self.tool_calls if not c.ran]

    @property
    def is_partial(self) -> bool:
        """True for an answer that did not end normally (cut, stopped or interrupted)."""
        return self.finish_reason in PARTIAL

    @property
    def latency_ms(self) -> float:
        return round(self.latency * 1000, 1)

    def __str__(self) -> str:
        return self.text


@dataclass
class Step:
    """An earlier round trip of a call that went on: ``why`` it went on (``retry``: the answer did
    not fit the schema, ``error`` says how; ``tools``: the tools it asked for ran, ``tool_calls``
    hold their outputs), the ``request`` body sent and the `Completion` that came back."""

    why: str
    request: dict[str, Any] = field(repr=False)
    completion: Completion = field(repr=False)
    error: BaseException | None = None
    tool_calls: list[Any] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)  # this round trip's own (the completion's sums the call's so far)

    def describe(self) -> str:
        """One line, as the cell shows it."""
        if self.why == "retry":
            field_name = getattr(self.error, "field", None)
            return f"asked again: {f'{field_name}: ' if field_name else ''}{getattr(self.error, 'problem', '') or self.error}"
        return "; ".join(f"ran {c.describe()} → " + (f"error: {c.error}" if c.error else _brief(c.output))
                         for c in self.tool_calls)


def _brief(value: Any, limit: int = 120) -> str:
    text = _wire.as_text(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 1] + "…"


class Client:
    """Talks to Databricks Model Serving endpoints and cluster driver-proxy apps.

    Credentials are found in this order: ``host=``/``token=`` (or ``profile=``, or a service
    principal's ``host=``, ``client_id=`` and ``client_secret=``: OAuth M2M), the Databricks
    notebook context, ``DATABRICKS_HOST``/``DATABRICKS_TOKEN``, then ``~/.databrickscfg``. They are
    resolved on first use; ``client.credentials.source`` says which one was used.

    ``timeouts``, ``retry``, ``clock``, ``session`` and ``handler`` (what sends one HTTP request:
    `dbmagic.testing.MemoryHandler` answers from memory) are seams for tuning and for tests.
    ``subscribe`` adds a subscriber to this client's calls (`dbmagic.hooks`).
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
        self._principal: _ledger.Principal | None = None  # who the workspace says this login is (SCIM Me)
        self._signer: _ledger.Signer | None = None  # signs and verifies what this principal keeps in a ledger
        self.hooks = hooks.Hooks(parent=hooks.GLOBAL)
        self.transport = Transport(timeouts=timeouts, retry=retry, clock=clock, session=session, pool_size=pool_size,
                                   handler=handler)

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
        factory, how = _apps_login(creds)
        info["databricks apps"] = how if factory is not None else f"not reachable: {how} (Apps take OAuth only)"
        return info

    def principal(self) -> _ledger.Principal:
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
            self._principal = _ledger.Principal(host, str(found.get("id") or "unknown"), str(name)[:200])
        return self._principal

    def signer(self) -> _ledger.Signer:
        """What signs the records this principal writes to a checkpoint or the cache, and verifies
        the ones it reads (`dbmagic.ledger.Signer`, its key outside any ledger's folder)."""
        if self._signer is None:
            principal = self.principal()
            on_databricks = self.credentials.auth_type in _NOTEBOOK_LOGINS
            self._signer = _ledger.Signer.load(principal, _ledger.key_folder(principal, on_databricks))
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
            raise BadResponse(f"The workspace sent more than {_megabytes(_WORKSPACE_ANSWER_LIMIT)} for {target}",
                              target=target) from None
        return _json(content, target, response.status), response.headers

    # -- calls ---------------------------------------------------------------------------------

    @_with_call_options
    def prepare(self, prompt: Any, endpoint: str | None = None, *, stream: bool = False,
                **options: Unpack[CallOptions]) -> PreparedRequest:
        """Build the request a call would send, without sending it (the dry run). See `CallOptions`.
        A request that cannot be built is told to the subscribers (``on_refused``: with tracing on,
        an error span)."""
        return self._prepared(prompt, endpoint, stream, options, "Client.prepare")

    def _prepared(self, prompt: Any, endpoint: str | None, stream: bool, options: Mapping[str, Any],
                  called: str) -> PreparedRequest:
        refuse_unknown_options(options, called)  # a TypeError, as any Python call: not a refused request
        return self._told(endpoint, prompt, lambda: self._build(endpoint, stream, options)(prompt))

    def _told(self, endpoint: Any, prompt: Any, build: Callable[[], PreparedRequest]) -> PreparedRequest:
        """``build()``, telling the subscribers (``on_refused``) when the request cannot be built."""
        try:
            return build()
        except DbMagicError as exc:
            if self.hooks:
                self.hooks.fire("on_refused", endpoint if isinstance(endpoint, str) else None, prompt, exc)
            raise

    @_with_call_options
    def preparer(self, endpoint: str | None = None, *, stream: bool = False,
                 **options: Unpack[CallOptions]) -> Callable[[Any], PreparedRequest]:
        """`prepare` for many prompts with the same options (a batch): the options are checked and
        the endpoint looked up once, here; the function returned builds each prompt's request."""
        refuse_unknown_options(options, "Client.preparer")
        build = self._build(endpoint, stream, options)

        return lambda prompt: self._told(endpoint, prompt, lambda: build(prompt))

    def _build(self, endpoint: str | None, stream: bool, options: Mapping[str, Any]) -> Callable[[Any], PreparedRequest]:
        o = _checked_options(options)
        if endpoint is not None:
            endpoint = settings.coerce("endpoint", endpoint)
        kind, path, target, name, where, app_url = self._target(endpoint, o["cluster_id"], o["port"], o["org_id"],
                                                                o["task"])
        problem = _wire.not_for_kind("--system", kind, target) if o["system"] else None
        if problem:  # never silently dropped
            raise ConfigurationError(problem)
        params = {"temperature": o["temperature"], "max_tokens": o["max_tokens"], "stop": o["stop"] or None,
                  "n": o["n"], **(o["extra_params"] or {})}
        transform, system, history = o["transform_input"], o["system"], o["history"] or ()
        host = app_url or self.credentials.host
        streams = stream and kind in _wire.STREAMING_KINDS
        schema, toolbox = _answer_shape(o, kind, target)
        info = self._endpoints.get(endpoint) if endpoint else None
        # the model field: a model service is named in it, as an app is by name (what databricks_openai sends)
        by_name = where == _wire.MODEL_SERVICE or (where == _wire.APP and not _wire.is_url(endpoint or ""))
        named = {"model": endpoint} if by_name else {}
        # usage in a stream: external models (and model services) send it only when asked (OpenAI's
        # stream_options, for chat and completions alike)
        usage_asked = streams and kind in (_wire.CHAT, _wire.COMPLETIONS) and (
            where == _wire.MODEL_SERVICE or (info is not None and info.endpoint_type == "EXTERNAL_MODEL"))
        model = " ".join([name, *(info.served if info is not None else ())]).lower()
        llm = _llm_of(where, name, info)
        instruction = schema.instruction() if schema is not None and kind not in _wire.SCHEMA_ON_WIRE else None
        rules = {"schema_retries": 1 if o["schema_retries"] is None else o["schema_retries"],
                 "run_tools": bool(o["run_tools"]), "max_steps": o["max_steps"] or 5,
                 "max_tool_runs": o["max_tool_runs"] or settings.BY_NAME["max_tool_runs"].default,
                 "max_answer_bytes": int((o["max_answer_mb"] or settings.BY_NAME["max_answer_mb"].default) * (1 << 20))}

        def build(prompt: Any) -> PreparedRequest:
            if _wire.is_messages(prompt):  # a chat prompt brings every turn itself
                problem = _wire.not_for_kind("A chat prompt", kind, target)
                if problem is None and (system or history):
                    problem = ("A chat prompt brings its own messages, so --system and --chat have nothing to add: "
                               "drop them (or their %config DbLLM defaults), or put the text in the prompt.")
                if problem:
                    raise ConfigurationError(problem)
                prompt = [{"role": str(m["role"]), "content": m.get("content")} for m in prompt]
            elif instruction is not None:  # a kind that cannot take the schema on the wire reads it in the prompt
                prompt = f"{_wire.as_text(prompt)}\n\n{instruction}"
            request = _wire.seed_request(prompt, params)
            if transform is not None:
                request = _apply_input_transform(transform, request)
            body = _wire.build_body(kind, request, system=system, history=history, stream=stream)
            if named:
                body = {**named, **body}
            if usage_asked and "stream_options" not in body:
                body["stream_options"] = {"include_usage": True}
            if schema is not None and kind in _wire.SCHEMA_ON_WIRE:
                body = _wire.with_schema(kind, body, schema.wire())
            if toolbox is not None:
                body = _wire.with_tools(kind, body, toolbox.definitions())
            if "tools" in body:
                body = _wire.databricks_quirks(kind, body, model)
            _check_json(body)
            return PreparedRequest(kind, target, path, body, host, stream=streams, name=name, schema=schema,
                                   tools=toolbox, model=model, where=where, llm=llm, **rules)

        return build

    @_with_call_options
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

    @_with_call_options
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
             tags: Mapping[str, Any] | None = None) -> Call:
        """The `Call` that sends ``prepared`` (built by `prepare`; streamed when it was prepared with
        ``stream=True`` and its kind streams). Nothing is sent until it is iterated, waited on or
        started. ``retry`` overrides the client's policy for this call; ``tags`` are for the
        subscribers (the notebook's history reads ``tags["conversation"]``)."""
        call = Call(self, prepared, transform_output, _timeout(timeout), retry, dict(tags or {}))
        if self.hooks:
            self.hooks.fire("on_request", call)
        return call

    def _target(self, endpoint: str | None, cluster_id: Any, port: Any, org_id: Any, task: str | None):
        """``(kind, path, target label, name, where, app URL or None)`` of a call (see `_wire.target_of`)."""
        if endpoint and (cluster_id or port):
            raise ConfigurationError(
                "Give either an endpoint or a driver-proxy app (cluster id and port), not both."
            )
        if endpoint:
            where, bare = _wire.target_of(endpoint)
            if where == _wire.APP:
                if self._app_urls.get(bare) not in self._app_credentials:  # (a Spark task has both from the driver)
                    self._apps_login()  # a login with no OAuth token is refused here, before anything is sent
                url = self.app_url(bare)
                self._credentials_for_app(url)
                kind = _wire.kind_for(task) if task else _wire.RESPONSES
                return kind, "/responses", f"app {bare!r}", endpoint, where, url
            if where == _wire.MODEL_SERVICE:
                kind = _wire.kind_for(task) if task else _wire.CHAT
                route = "/responses" if kind == _wire.RESPONSES else "/chat/completions"
                return kind, _wire.MODEL_SERVICES_PATH + route, f"model service {endpoint!r}", endpoint, where, None
            kind = _wire.kind_for(task) if task else self.endpoint(endpoint).kind
            return (kind, f"/serving-endpoints/{quote(endpoint, safe='')}/invocations", f"endpoint {endpoint!r}",
                    endpoint, where, None)
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
            return (_wire.PROXY, path, f"proxy app on cluster {cluster_id} port {port}", f"{cluster_id}:{port}",
                    _wire.DRIVER_PROXY, None)
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
            url = _app_url_or_none(app.get("url"), self.credentials.host)
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
        if _wire.is_url(name):  # typed by the user: taken on a Databricks Apps domain only, never asked about
            url = _app_url_or_none(name, self.credentials.host)
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
        url = _app_url_or_none(raw, self.credentials.host)
        if url is None:
            raise ConfigurationError(
                f"App {name!r}: the workspace gave the URL {scrub(str(raw), self.credentials.secrets())[:120]!r}, "
                "which is not https on a Databricks Apps domain (*.databricksapps.com), so no token is sent to it.")
        self._app_urls[name] = url
        log.debug("app %r: %s (state %s)", name, url, state)
        return url

    def _credentials_for(self, prepared: PreparedRequest) -> Credentials:
        """The credentials a request carries: the workspace's, or the OAuth ones of an app's URL."""
        if prepared.where == _wire.APP:
            return self._credentials_for_app(prepared.host)
        return self.credentials

    def _apps_login(self) -> tuple[Callable[[], Mapping[str, str]], str]:
        """`_apps_login` of this client's login, or the error that says how to sign in with OAuth."""
        base = self.credentials
        factory, how = _apps_login(base)
        if factory is None:
            raise ConfigurationError(
                f"Databricks Apps accept OAuth tokens only, and dbmagic signed in to {base.host} with {how} "
                f"({base.source}). Sign in with OAuth: `databricks auth login --host {base.host}` "
                "(then DATABRICKS_CONFIG_PROFILE=<profile>, or dbmagic.configure(profile=...)), or as a service "
                "principal (DATABRICKS_CLIENT_ID and DATABRICKS_CLIENT_SECRET). Inside a Databricks notebook this "
                "works by itself.")
        return factory, how

    def _credentials_for_app(self, url: str) -> Credentials:
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


class Call:
    """One call: iterate it for the answer's text as it arrives, or `wait` for the whole answer.

    It always ends in a `Completion` (``call.completion``), also when it does not end normally: a
    partial one has ``finish_reason`` ``cut`` (the connection or stream broke: the iteration raises
    `AnswerCut`/`StreamInterrupted`, whose ``.completion`` it is), ``stopped`` (`cancel` from any
    thread: the iteration ends quietly) or ``interrupted`` (Ctrl-C, or ``cancel("interrupted")``).
    A call that got no answer at all (an error status, no connection) raises, ``call.error`` is the
    error, and ``completion`` stays None. ``text`` is everything that arrived so far.

    A call may take more than one round trip: an answer that does not fit the ``schema`` is asked
    for again (``schema_retries``), and with ``run_tools`` the tools it asks for run and their
    results go back (at most ``max_steps`` requests). ``steps`` lists the round trips done,
    ``step`` counts them, ``sending`` is the request of the current one, and ``text`` is the
    current one's answer. An answer that never fits raises `SchemaError` (its Completion kept).

    Made by `Client.call` (and `Client.stream`, which is one already started).
    """

    def __init__(self, client: Client, prepared: PreparedRequest, transform_output: Transform | None,
                 timeout: float | None, retry: RetryPolicy | None, tags: dict[str, Any]):
        self.prepared = prepared
        self.sending = prepared
        self.tags = tags
        self._cache_mode = _ledger.CACHE_MODE.get()  # the cell's --cache, read in the thread that made the call
        self._parts: list[str] = []  # the answer's text so far, in pieces (joined when read: linear time)
        self._scrubber: StreamScrubber | None = None  # a streamed answer's pieces, secrets taken out
        self.secret_split = False  # a secret came split across streamed events (and was taken out)
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self.response: Response | None = None
        self.cancelled = False
        self.steps: list[Step] = []
        self.step = 0
        self.round_usage = Usage()  # the usage of the last round trip alone
        self.tool_runs = 0  # tool calls run so far (at most the request's max_tool_runs)
        self.stopped_by: str | None = None  # the limit that left tool calls shown, not run (--max-steps N)
        self._client = client
        self._transform_output = transform_output
        self._timeout = timeout
        self._deadline: float | None = None  # time.monotonic() by which the whole call ends (its timeout)
        self._retry = retry
        self._why = "stopped"
        self._started = 0.0
        self._ended = False
        self._first: float | None = None
        self._pieces: Iterator[str] | None = None
        self._answer: tuple[_wire.Parsed, Any] | None = None
        self._retries_left = prepared.schema_retries

    @property
    def text(self) -> str:
        """Everything that arrived of the current round trip's answer so far (secrets taken out)."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @text.setter
    def text(self, value: str) -> None:
        self._parts = [value] if value else []

    def __repr__(self) -> str:
        state = ("cancelled" if self.cancelled else "answered" if self.completion is not None
                 else "failed" if self.error is not None else "open" if self.response is not None else "not sent")
        return f"Call({self.prepared.target}, {state}, {len(self.text)} characters)"

    # -- what a caller uses ------------------------------------------------------------------

    def __iter__(self) -> Iterator[str]:
        if self._pieces is None:
            self._pieces = self._read()
        return self._pieces

    def __next__(self) -> str:
        return next(iter(self))

    def start(self) -> Call:
        """Send the request now and wait for the answer's headers (an error answer raises here)."""
        if self.response is None and not self._ended:
            try:
                if not self._from_cache():
                    self._open()
            except BaseException as exc:
                raise self._ended_by(exc)  # noqa: B904 (the same error, recorded: its own cause stays)
        return self

    def wait(self) -> Completion:
        """Read the answer to its end and return its `Completion` (partial when stopped or
        interrupted); raises what ended it otherwise (a cut answer's error carries ``.completion``)."""
        for _ in self:
            pass
        if self.completion is None or self.error is not None:  # it had failed already: the same error
            raise self.error if self.error is not None else RuntimeError("the call ended without an outcome")
        return self.completion

    def outcome(self) -> Completion | DbMagicError:
        """The call's end without raising a dbmagic error: its `Completion` (whole, or partial: a cut
        one with its ``error``), or the error that left it without an answer (a `SchemaError` keeps
        the answer in ``.completion``). What a front end keeps per call (compare's columns, a
        batch's rows). Ctrl-C still raises."""
        try:
            return self.wait()
        except AnswerCut as exc:
            return exc.completion if exc.completion is not None else exc
        except DbMagicError as exc:
            return exc

    def cancel(self, why: str = "stopped") -> None:
        """Stop from another thread (a Stop button; ``why="interrupted"`` for a Ctrl-C): the
        iteration ends quietly, ``completion`` is the partial answer (``finish_reason == why``). A
        read blocked on a silent stream wakes at once; a request still waiting for its answer's
        headers ends when they come (the answer is then dropped), and no retry is sent after it."""
        self._why = why
        self.cancelled = True
        if self.response is not None:
            self.response.body.abort()

    def close(self) -> None:
        """Stop reading (from the thread that iterates); ``text`` keeps what arrived."""
        if self._pieces is not None:
            self._pieces.close()
        if self.response is not None:
            self.response.body.close()
        if not self._ended:
            self._end(self.partial("stopped"))

    def partial(self, why: str, error: BaseException | None = None) -> Completion:
        """A `Completion` of what arrived, for an answer that did not end normally (``why``:
        ``cut``, ``stopped`` or ``interrupted``)."""
        rest = self._flush_scrubber()
        if rest:
            self._parts.append(rest)
        prepared = self.sending
        return Completion(text=self.text, value=self.text, endpoint=prepared.name or prepared.target,
                          kind=prepared.kind, latency=time.perf_counter() - self._started if self._started else 0.0,
                          request=prepared.body, finish_reason=why,
                          attempts=self.response.attempts if self.response is not None else 1,
                          time_to_first_token=self._first, error=error, steps=list(self.steps),
                          usage=self._usage_so_far(), where=prepared.where)

    # -- the one path ------------------------------------------------------------------------

    def _open(self) -> None:
        client, prepared = self._client, self.sending
        if not self._started:
            self._started = time.perf_counter()
            if self._timeout is not None:  # a deadline for the whole call: every try, wait and byte
                self._deadline = time.monotonic() + self._timeout
        try:
            response = client.transport.request(
                client._credentials_for(prepared), "POST", prepared.path, target=prepared.target, json=prepared.body,
                stream=prepared.stream, timeout=self._timeout, retry=self._retry, cancelled=lambda: self.cancelled,
                deadline=self._deadline)
        except RequestError as exc:
            if prepared.where == _wire.APP:
                _hint_for_app(exc, prepared)
            raise
        self.response = response
        if client.hooks:
            client.hooks.fire("on_response", self, response)

    def _read(self) -> Iterator[str]:
        try:
            while True:
                if self.response is None and not self._ended:
                    if self.cancelled:  # stopped before it was sent
                        self._end(self.partial(self._why))
                        return
                    if self._from_cache():
                        break
                    self._open()
                if self._ended:
                    break
                self._answer = None
                streamed = self.sending.stream and "text/event-stream" in self.response.headers.get("Content-Type", "")
                yield from (self._events() if streamed else self._whole())
                if self._answer is None:  # cancelled
                    if not self._ended:
                        self._end(self.partial(self._why))
                    return
                completion, refused = self._completion(*self._answer)
                following = self._following(completion, refused)
                if following is None:
                    self._end(completion)
                    if refused is not None:
                        raise refused
                    return
                self._go_on(*following)
            if self.completion is not None and self.completion.cached and not self.text and self.completion.text:
                yield self._piece(self.completion.text)  # an answer from the cache comes whole, once
        except GeneratorExit:  # the reader stopped early (close())
            if not self._ended:
                self._end(self.completion or self.partial("stopped"))
            raise
        except BaseException as exc:
            raise self._ended_by(exc)  # noqa: B904 (the same error, recorded: its own cause stays)
        finally:
            if self.response is not None:
                self.response.body.close()

    def _following(self, completion: Completion, refused: SchemaError | None) -> tuple[Any, ...] | None:
        """How the call goes on after this answer, ``(why, next body, completion, error)``, or None
        when this answer ends it."""
        sending, parsed = self.sending, self._answer[0] if self._answer else None
        reply = parsed.reply if parsed is not None and parsed.reply is not None else (
            {"role": "assistant", "content": completion.text} if sending.kind in (_wire.CHAT, _wire.CHAT_AGENT)
            else completion.text)
        if refused is not None:
            if self._retries_left <= 0:
                return None
            from .call.schema import retry_note

            note = retry_note(refused)
            body = _wire.follow_up(sending.kind, sending.body, reply, [{"role": "user", "content": note}])
            if body is None:  # a transform_input reshaped the body: there is no prompt to extend
                return None
            self._retries_left -= 1
            return "retry", body, completion, refused
        pending = completion.pending_tool_calls
        if not pending or not sending.run_tools or sending.tools is None:
            return None
        if self.step + 1 >= sending.max_steps:  # the last request allowed: the calls are shown, not run
            self.stopped_by = f"--max-steps {sending.max_steps}"
            return None
        if self.tool_runs + len(pending) > sending.max_tool_runs:  # however many an answer asks for
            self.stopped_by = f"--max-tool-runs {sending.max_tool_runs}"
            return None
        self.tool_runs += len(pending)
        for tool_call in pending:
            if self.cancelled:
                return None
            sending.tools.run(tool_call)
        body = _wire.follow_up(sending.kind, sending.body, reply, _wire.tool_results(sending.kind, pending))
        return ("tools", body, completion, None) if body is not None else None

    def _go_on(self, why: str, body: dict[str, Any], completion: Completion, error: SchemaError | None) -> None:
        """Record this round trip and make the next request the one to send."""
        step = Step(why, self.sending.body, completion, error, list(completion.pending_tool_calls
                                                                   if why != "tools" else completion.tool_calls),
                    self.round_usage)
        self.steps.append(step)
        if self.response is not None:
            self.response.body.close()
        if self.cancelled:  # stopped between two round trips: this answer is what arrived
            self._end(self.partial(self._why))
            return
        body = _wire.databricks_quirks(self.sending.kind, body, self.sending.model)
        _check_json(body)
        self.sending = replace(self.sending, body=body)
        self.response, self.text, self.step, self.round_usage = None, "", self.step + 1, Usage()
        if self._client.hooks:
            self._client.hooks.fire("on_step", self, step)

    def _ended_by(self, exc: BaseException) -> BaseException:
        """Record how an exception ended the call, and return what to raise."""
        if self._ended:
            if isinstance(exc, SchemaError):
                self.error = exc
            return exc
        if isinstance(exc, KeyboardInterrupt):
            self._end(self.partial("interrupted"))
            return exc
        if isinstance(exc, AnswerCut):
            exc.partial = self.text
            exc.completion = self.partial("cut", exc)
            self._end(exc.completion)
            return exc
        self.error = exc
        self._ended = True
        if self._client.hooks:
            self._client.hooks.fire("on_failed", self, exc)
        return exc

    def _end(self, completion: Completion) -> None:
        self.completion, self._ended = completion, True
        store = _ledger.cache()
        if store is not None and not completion.is_partial and completion.error is None and not self.steps:
            store.record(self.prepared, completion, self._client.signer(), self._cache_mode)
        if self._client.hooks:
            self._client.hooks.fire("on_done", self, completion)

    def _from_cache(self) -> bool:
        """With the kernel's cache on (`dbmagic.ledger.use_cache`), end the call with the answer it
        holds for this very request, sending nothing; False when it holds none."""
        store = _ledger.cache()
        if store is None or self.step:
            return False
        found = store.lookup(self.prepared, self._client.signer(), self._transform_output, self._cache_mode)
        if found is None:
            return False
        if isinstance(found, SchemaError):  # an answer that did not fit when it came: it still does not
            self.completion = found.completion
            raise found
        self._end(found)
        return True

    def _piece(self, piece: str) -> str:
        if self._first is None:
            self._first = time.perf_counter() - self._started
        self._parts.append(piece)
        if self._client.hooks:
            self._client.hooks.fire("on_piece", self, piece)
        return piece

    def _secrets(self) -> Sequence[Secret]:
        return self._client._credentials_for(self.sending).secrets()

    def _usage_so_far(self, last: Usage | None = None) -> Usage:
        total = Usage()
        for step in self.steps:
            total += step.usage
        return total + last if last is not None else total

    def _whole(self) -> Iterator[str]:
        response, prepared = self.response, self.prepared
        try:
            content = response.body.read_all(prepared.max_answer_bytes, self._deadline)
        except TimeoutError:
            raise RequestTimeout(f"{prepared.target} sent no whole answer within the call's timeout of "
                                 f"{self._timeout:g} s", target=prepared.target) from None
        except BodyTooLarge:
            response.body.close()
            raise BadResponse(f"{prepared.target} sent an answer larger than {_megabytes(prepared.max_answer_bytes)}, "
                              "so it was not read to its end", target=prepared.target,
                              next_step="Ask for a shorter answer (--max-tokens), or raise --max-answer-mb "
                                        "(max_answer_mb=).") from None
        except ConnectionError as exc:
            if self.cancelled:
                return
            raise AnswerCut(f"The answer from {prepared.target} was cut: {exc}; the request ran, so it was "
                            "not sent again", target=prepared.target) from None
        if self.cancelled:
            return
        secrets = self._secrets()
        # the answer is server text: a proxy or app that echoes headers must not put the token in the
        # cell, the ledger, a trace or a judge's input
        data = scrub_value(_json(content, self.prepared.target, response.status, secrets), secrets)
        parsed = _parse(self.sending, data, secrets)
        if parsed.text:
            yield self._piece(parsed.text)
        self._answer = parsed, data

    def _events(self) -> Iterator[str]:
        body = self.response.body
        secrets = self._secrets()
        scrubber = self._scrubber = StreamScrubber(secrets)
        decoder = _wire.SSEDecoder()
        reader = _wire.ChunkReader()
        usage = Usage()
        finish: str | None = None
        model: str | None = None
        last: Any = None  # the last event, kept as the completion's raw (its usage, finish reason, ids)
        done = False
        size, cap = 0, self.sending.max_answer_bytes
        while True:
            if self.cancelled:
                return
            try:
                chunk = body.read(65536, self._deadline)
            except TimeoutError:
                if done:
                    break
                raise self._cut(f"the call's timeout of {self._timeout:g} s passed") from None
            except ConnectionError as exc:
                if self.cancelled:
                    return
                if done:
                    break
                raise self._cut(f"the connection broke ({exc})") from None
            if done:  # read the body to its end so the connection goes back to the pool
                if not chunk:
                    break
                continue
            size += len(chunk)
            if size > cap:
                body.abort()
                raise self._cut(f"the answer passed --max-answer-mb ({_megabytes(cap)})")
            events = list(decoder.feed(chunk)) if chunk else decoder.close()
            for event in events:
                if event.strip() == "[DONE]":
                    done = True
                    break
                try:
                    data = json.loads(event)
                except ValueError:
                    raise self._cut("an event that is not JSON") from None
                except RecursionError:
                    raise self._cut("an event nested too deeply") from None
                if not isinstance(data, dict):
                    raise self._cut("an event that is not a JSON object")
                if "error_code" in data or "error" in data or data.get("type") == "error":
                    code, message = parse_error_body(event, secrets)
                    raise self._cut(f"an error mid-stream: {message or code}")
                data = scrub_value(data, secrets)
                if self._client.hooks:
                    self._client.hooks.fire("on_event", self, data)
                piece, chunk_usage, chunk_finish = reader.read(data)
                last = data
                usage = chunk_usage or usage
                finish = chunk_finish or finish
                model = data.get("model") or model
                shown = scrubber.feed(piece) if piece else ""
                if shown:
                    yield self._piece(shown)
                    if self.cancelled:  # a Stop between two events of one read
                        return
            if not chunk:
                if self.cancelled:
                    return
                if not done and (decoder.truncated or finish is None):
                    raise self._cut("the connection closed before the end of the answer")
                break
        rest = self._flush_scrubber()
        if rest:
            yield self._piece(rest)
        kind = self.sending.kind
        calls = [_wire.ToolCall.read(c.id, scrub(c.name, secrets), scrub(c.raw_arguments, secrets))
                 for c in reader.tool_calls()]  # their arguments came in pieces too
        reply = scrub_value(reader.reply(kind, self.text), secrets) if kind in _wire.CONVERSATIONAL else None
        choices = [scrub(c, secrets) for c in reader.choices(self.text)]
        self._answer = (_wire.Parsed(self.text, self.text, usage, model, finish, calls, reply, choices), last)

    def _flush_scrubber(self) -> str:
        """What the stream scrubber held back (the stream ended, was cut or stopped), secrets masked."""
        scrubber, self._scrubber = self._scrubber, None
        if scrubber is None:
            return ""
        rest = scrubber.close()
        self.secret_split = self.secret_split or scrubber.hits > 0
        return rest

    def _completion(self, parsed: _wire.Parsed, data: Any) -> tuple[Completion, SchemaError | None]:
        """This round trip's `Completion`, its value read by the schema (and ``transform_output``),
        and the `SchemaError` of an answer that does not fit."""
        secrets = self._secrets()
        prepared, response = self.sending, self.response
        self.round_usage = parsed.usage
        value, refused = parsed.value, None
        calls = parsed.tool_calls
        if prepared.schema is not None and not any(not c.ran for c in calls):
            try:
                value = prepared.schema.parse(parsed.text, target=prepared.target)
            except SchemaError as exc:  # its message quotes the answer: scrubbed as any server text
                exc.args, exc.problem = (scrub(str(exc), secrets),), scrub(exc.problem, secrets)
                value, refused = None, exc
                exc.attempts = len([s for s in self.steps if s.why == "retry"]) + 1
        if self._transform_output is not None and refused is None:
            value = _apply_output_transform(self._transform_output, value)
        latency = time.perf_counter() - self._started
        completion = Completion(
            text=value if isinstance(value, str) else parsed.text,
            value=value,
            endpoint=prepared.name or prepared.target,
            kind=prepared.kind,
            raw=data,
            usage=self._usage_so_far(parsed.usage),
            latency=latency,
            request=prepared.body,
            request_id=_server_text(response.headers.get("x-request-id"), secrets),
            served_model=_server_text(parsed.served_model or response.headers.get("served-model-name"), secrets),
            finish_reason=parsed.finish_reason,
            time_to_first_token=self._first if self._first is not None else latency,
            attempts=response.attempts,
            error=refused,
            tool_calls=list(calls),
            steps=list(self.steps),
            schema=prepared.schema,
            where=prepared.where,
            natural=parsed.value,
            choices=list(parsed.choices),
        )
        if refused is not None:
            refused.completion = completion
        return completion, refused

    def _cut(self, why: str) -> StreamInterrupted:
        rest = self._flush_scrubber()
        if rest:
            self._parts.append(rest)
        return StreamInterrupted(
            f"The stream from {self.prepared.target} was cut: {why}; {len(self.text)} characters arrived",
            partial=self.text,
            target=self.prepared.target,
        )


Stream = Call  # the name `Client.stream` returned before every call was a `Call`


def _llm_of(where: str, name: str, info: EndpointInfo | None) -> tuple[str, str] | None:
    """``(model, provider)`` as MLflow's trace UI prices and groups a call (``mlflow.llm.model``,
    ``mlflow.llm.provider``): an external model's own name and provider; otherwise the target's
    name with provider ``databricks`` (MLflow prices ``databricks-*`` endpoint names from its
    Databricks catalog). None for a driver-proxy app, which names no model."""
    if where == _wire.DRIVER_PROXY:
        return None
    external = info.external_model if info is not None else None
    return external if external is not None else (name, "databricks")


def _hint_for_app(error: RequestError, prepared: PreparedRequest) -> None:
    """What an app's failure usually means (as databricks_openai hints it), added to the message."""
    status = getattr(error, "status", None)
    name = prepared.name.removeprefix(_wire.APPS_PREFIX)
    if status in (404, 405):
        hint = (f"App {name!r} does not answer POST /responses: it must serve the OpenAI Responses API (as an MLflow "
                "AgentServer does).")
    elif status == 403:
        hint = f"You need the CAN USE permission on app {name!r}: ask its owner."
    elif status == 401:
        hint = "The app refused the token: Databricks Apps accept OAuth tokens only; sign in again with OAuth."
    elif isinstance(error, ConnectionFailed):  # refused, DNS: nothing listens at its URL
        hint = (f"App {name!r} did not answer: it may be stopped or starting. Check its state (`%dbllm endpoints`) "
                "and start it in the workspace.")
    elif status is not None and status >= 500:
        hint = f"App {name!r} failed: see its logs in the workspace."
    else:
        return
    error.next_step = hint
    error.args = (error._compose(),)


# where Databricks serves apps (AWS, Azure, GCP): a token goes to an app only at a URL on one of them
APPS_DOMAINS = ("databricksapps.com",)


def _app_url_or_none(raw: Any, workspace_host: str) -> str | None:
    """The app URL the Apps API gave, normalized, when a token may go there: https on a Databricks
    Apps domain; plain http on loopback only when the workspace itself is on loopback (the local
    workspace). None otherwise."""
    from urllib3.util import parse_url

    from .transport.credentials import normalize_host

    if not isinstance(raw, str):
        return None
    try:
        url = normalize_host(raw.rstrip("/"))
        host = parse_url(url).host or ""
    except (ConfigurationError, ValueError):
        return None
    # an app's own name under the domain (NAME.aws.databricksapps.com), never the bare domain itself
    if url.startswith("https://") and any(host.endswith("." + d) for d in APPS_DOMAINS):
        return url
    local = parse_url(workspace_host).host or ""
    if url.startswith("http://") and _loopback(host) and _loopback(local):
        return url
    return None


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_NOTEBOOK_LOGINS = ("notebook token", "runtime")  # the notebook's own short-lived token (context or SDK runtime)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _apps_login(base: Credentials) -> tuple[Callable[[], Mapping[str, str]] | None, str]:
    """How a login reaches Databricks Apps, which accept OAuth tokens only: ``(header factory, how)``,
    or ``(None, what the login is)`` when it gives no OAuth token (databricks_openai's check too:
    the SDK's ``oauth_token()`` must give one). In a notebook, the notebook token is exchanged."""
    if base.auth_type in _NOTEBOOK_LOGINS:  # exchanged for an OAuth token, as the SDK's runtime-oauth does
        return _token_exchange(base), "the notebook token exchanged for OAuth"
    if base.auth_type == "pat":
        if _JWT.fullmatch(base.token.reveal()):  # an OAuth access token given as the token (`databricks auth token`)
            return base.headers, "the OAuth access token given as the token"
        return None, "a personal access token"
    if base.auth_type == "metadata-service" and _JWT.fullmatch(base.token.reveal()):
        # the VS Code extension's metadata service hands out the OAuth access token of its own login
        # (databricks-sdk's oauth_token() does not ask it), a JWT, which an app takes as it is
        return base.headers, "the VS Code extension's OAuth token"
    if base._oauth_token is None:
        return None, f"a {base.auth_type} login"
    try:
        base._oauth_token()  # databricks-sdk raises for a login that is not OAuth (basic, Azure CLI, ...)
    except Exception:  # what it says may quote a secret: the auth type says enough
        return None, f"a {base.auth_type} login, which gives no OAuth token"
    return base.headers, f"its {base.auth_type} OAuth token"


def _token_exchange(base: Credentials) -> Callable[[], dict[str, str]]:
    """Headers with an OAuth token for Databricks Apps, exchanged for the notebook's own token
    (RFC 8693 at ``{host}/oidc/v1/token``, databricks-sdk's ``PATOAuthTokenExchange``: what its
    ``runtime-oauth`` strategy does), refreshed before it expires."""
    from databricks.sdk.oauth import PATOAuthTokenExchange

    exchange = PATOAuthTokenExchange(get_original_token=lambda: base.token.reveal(), host=base.host, scopes="all-apis")
    return lambda: {"Authorization": "Bearer " + exchange.token().access_token}


def _answer_shape(options: Mapping[str, Any], kind: str, target: str) -> tuple[Any, Any]:
    """The call's `Schema` and `Toolbox` (None when not asked for), refused for a kind that cannot
    use them, before anything is sent."""
    from .call.schema import schema_of

    schema = schema_of(options["schema"]) if options["schema"] is not None else None
    toolbox = None
    if options["tools"] is not None:
        from .call.tools import toolbox_of

        toolbox = toolbox_of(options["tools"])
    if schema is not None and kind == _wire.EMBEDDINGS:
        raise ConfigurationError(f"--schema asks for an answer as data, and {target} answers embeddings (vectors). "
                                 "Drop --schema, or use a chat endpoint.")
    if toolbox is not None and kind not in _wire.TOOL_KINDS:
        raise ConfigurationError(f"--tools needs a chat endpoint or a Responses agent, and {target} takes {kind} "
                                 "requests. Drop --tools, or use a chat endpoint.")
    if options["run_tools"] and toolbox is None:
        raise ConfigurationError("--run-tools runs the functions named in --tools (tools=): name them, e.g. "
                                 "--tools weather,lookup.")
    return schema, toolbox


def _apply_input_transform(transform: Transform, request: dict[str, Any]) -> dict[str, Any]:
    name = _name(transform)
    try:
        result = transform(**request)
    except Exception as exc:
        raise TransformError(
            f"transform_input {name!r} raised {exc.__class__.__name__}: {exc}. "
            "Fix the function (its traceback is shown with this message) or run without it.",
            transform=name,
        ) from exc
    if not isinstance(result, dict):
        raise TransformError(
            f"transform_input {name!r} returned {type(result).__name__}, not a dict. "
            "It must return the request, e.g. `def f(**request): ...; return request`.",
            transform=name,
        )
    return result


def _apply_output_transform(transform: Transform, value: Any) -> Any:
    name = _name(transform)
    try:
        return transform(value)
    except Exception as exc:
        raise TransformError(
            f"transform_output {name!r} raised {exc.__class__.__name__}: {exc}. "
            "Fix the function (its traceback is shown with this message) or run without it.",
            transform=name,
        ) from exc


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _parse(prepared: PreparedRequest, data: Any, secrets: Sequence[Secret] = ()) -> _wire.Parsed:
    try:
        return _wire.parse_response(prepared.kind, data)
    except _wire.WireError as exc:  # it may quote the answer: scrubbed as any server text
        raise BadResponse(f"{prepared.target} sent {exc}", target=prepared.target, secrets=secrets) from None


def _json(content: bytes, target: str, status: int | None = None, secrets: Sequence[Secret] = ()) -> Any:
    try:
        return json.loads(content)
    except RecursionError:
        raise BadResponse(f"{target} sent an answer nested too deeply to read", target=target, status=status,
                          secrets=secrets) from None
    except ValueError:  # scrubbed whole, then cut: no part of a secret survives the cut
        snippet = scrub(content.decode("utf-8", "replace"), secrets)[:200]
        raise BadResponse(f"{target} sent an answer that is not JSON: {snippet!r}", target=target,
                          status=status, secrets=secrets) from None


def _server_text(value: Any, secrets: Sequence[Secret]) -> str | None:
    """A short field from the server (a request id, a model name), scrubbed and bounded."""
    return scrub(str(value), secrets)[:200] if value else None


_WORKSPACE_ANSWER_LIMIT = 64 << 20  # bytes of a workspace API's answer (an endpoint list, an app)


def _megabytes(size: int) -> str:
    return f"{size / (1 << 20):g} MB"


def _timeout(timeout: float | None) -> float | None:
    return None if timeout is None else settings.coerce("timeout", timeout)


def _check_json(body: Any) -> None:
    """Refuse, before sending, a request JSON cannot carry, naming the field (a transform that adds
    bytes, a set or an object; NaN)."""
    try:
        problem = _wire.json_problem(body)
    except RecursionError:
        problem = "the request is nested too deeply"
    if problem:
        raise ConfigurationError(f"Cannot send: {problem}, which JSON cannot carry. Fix the transform_input "
                                 "or the -p value that put it there.")


_default: Client | None = None
_default_lock = threading.Lock()


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
