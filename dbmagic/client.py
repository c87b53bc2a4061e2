"""The dbmagic client: one per kernel, shared by the magic, the panel and your own code.

>>> import dbmagic
>>> client = dbmagic.get_client()            # finds the workspace by itself
>>> client.complete("How are you?", endpoint="databricks-meta-llama-3-3-70b-instruct").text
>>> for piece in client.stream("Tell me a story", endpoint="databricks-meta-llama-3-3-70b-instruct"):
...     print(piece, end="")

A call goes: prompt + parameters -> the seed-shaped request ``{"prompt", "temperature", "stop", ...}``
-> ``transform_input(**request)`` -> the wire body of the endpoint's kind -> one HTTP request (with
bounded retries) -> the parsed answer -> ``transform_output(value)`` -> a `Completion`.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import quote

import requests

from . import _wire, settings, tracing
from ._credentials import Credentials, org_id_from_host, resolve_credentials
from ._http import Body, Clock, RetryPolicy, Timeouts, Transport
from ._secret import Secret
from .errors import (
    BadResponse,
    ConfigurationError,
    DbMagicError,
    RequestError,
    SettingError,
    StreamInterrupted,
    TransformError,
    parse_error_body,
    scrub,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Client", "CallOptions", "Conversations", "Completion", "Stream", "PreparedRequest", "EndpointInfo",
           "get_client", "configure"]

Transform = Callable[..., Any]


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
    - ``transform_input``: ``f(**request) -> request``, applied before the endpoint's body is built.

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


def refuse_unknown_options(options: Mapping[str, Any], called: str) -> None:
    """An unknown keyword is a TypeError, as for any Python call, naming what the user called."""
    unknown = sorted(set(options) - set(CallOptions.__annotations__))
    if unknown:
        raise TypeError(f"{called}() got an unexpected keyword argument {unknown[0]!r}; its options are "
                        + ", ".join(CallOptions.__annotations__) + " (request fields go in extra_params=).")


def _checked_options(options: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Every `CallOptions` key, with the given values checked (see `refuse_unknown_options`)."""
    refuse_unknown_options(options, f"Client.{method}")
    checked: dict[str, Any] = {name: None for name in CallOptions.__annotations__}
    for name, value in options.items():
        if name in settings.CLIENT_OPTIONS and value is not None:
            typed = settings.BY_NAME[name].type
            numeric_text = isinstance(value, str) and typed in (int, float)  # port="7777" from Python
            value = settings.from_text(name, value) if numeric_text else settings.coerce(name, value)
        checked[name] = value
    n = checked["n"]
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise SettingError(f"n must be a whole number of at least 1; got {n!r}.")
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

    ``value`` is what ``transform_output`` returned (else the natural value: the text for chat and
    completions, the vectors for embeddings, ``predictions[0]`` for custom models, the JSON value for
    proxy apps); ``text`` is the answer as text; ``raw`` the parsed JSON the server sent (for a
    streamed answer, the last event that carried data). ``endpoint`` is the endpoint's name
    (``CLUSTER:PORT`` for a driver-proxy app) and ``kind`` its request kind. ``latency`` and
    ``time_to_first_token`` are in **seconds** (what is shown is in ms: ``latency_ms``).
    ``finish_reason`` is ``length`` when ``max_tokens`` cut the answer.
    """

    text: str
    value: Any
    endpoint: str
    kind: str
    raw: Any = field(default=None, repr=False)
    usage: dict[str, Any] = field(default_factory=dict)
    latency: float = 0.0
    request: dict[str, Any] = field(default_factory=dict, repr=False)
    request_id: str | None = None
    served_model: str | None = None
    finish_reason: str | None = None
    time_to_first_token: float | None = None
    attempts: int = 1

    def __str__(self) -> str:
        return self.text


class Conversations:
    """Chat turns per endpoint, kept for the kernel's life: ``%%dbllm --chat`` and the panel share them."""

    def __init__(self) -> None:
        self._turns: dict[str, list[dict[str, str]]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> list[dict[str, str]]:
        """The conversation with ``key`` (an endpoint name, or ``cluster:port``), oldest first."""
        with self._lock:
            return list(self._turns.get(key, ()))

    def add(self, key: str, user: str, assistant: str) -> None:
        with self._lock:
            self._turns.setdefault(key, []).extend(
                [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    def reset(self, key: str | None = None) -> None:
        """Forget one conversation, or all of them."""
        with self._lock:
            if key is None:
                self._turns.clear()
            else:
                self._turns.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            return [k for k, v in self._turns.items() if v]


class Client:
    """Talks to Databricks Model Serving endpoints and cluster driver-proxy apps.

    Credentials are found in this order: ``host=``/``token=`` (or ``profile=``), the Databricks
    notebook context, ``DATABRICKS_HOST``/``DATABRICKS_TOKEN``, then ``~/.databrickscfg``. They are
    resolved on first use; ``client.credentials.source`` says which one was used.

    ``timeouts``, ``retry``, ``clock`` and ``session`` are seams for tuning and for tests.
    """

    def __init__(
        self,
        host: str | None = None,
        token: str | None = None,
        *,
        profile: str | None = None,
        credentials: Credentials | None = None,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        clock: Clock | None = None,
        session: requests.Session | None = None,
        pool_size: int = 16,
    ):
        token = Secret(token) if token else None  # from here on no frame holds it as a plain str
        self._explicit = (host, token, profile)
        self._credentials = credentials
        self._lock = threading.Lock()
        self._endpoints: dict[str, EndpointInfo] = {}
        self._lookups: dict[str, threading.Lock] = {}  # one look-up of an endpoint at a time
        self.conversations = Conversations()
        self.transport = Transport(timeouts=timeouts, retry=retry, clock=clock, session=session, pool_size=pool_size)

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
                    self._credentials = resolve_credentials(host, token, profile)
        return self._credentials

    def whoami(self) -> dict[str, str]:
        """Host, credential source and ``token: ***``."""
        return self.credentials.describe()

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
                self._endpoints[name] = EndpointInfo.from_json(data)
            return self._endpoints[name]

    def _org_id(self) -> str:
        """The workspace's org id, for driver-proxy URLs: from the ``x-databricks-org-id`` header of
        an answer already received, else asked of ``/.well-known/databricks-config`` once; ``0``
        (what LangChain sends) if the workspace does not say."""
        if self.transport.org_id is None:
            try:
                data = self._get("/.well-known/databricks-config", "the workspace's configuration")
            except RequestError:
                data = None
            if self.transport.org_id is None:
                found = data.get("workspace_id") if isinstance(data, dict) else None
                self.transport.org_id = str(found) if found else "0"
        return self.transport.org_id

    def _get(self, path: str, target: str) -> Any:
        response = self.transport.request(self.credentials, "GET", path, target=target)
        return _json(response.content, target, response.status_code)

    # -- calls ---------------------------------------------------------------------------------

    @_with_call_options
    def prepare(self, prompt: Any, endpoint: str | None = None, *, stream: bool = False,
                **options: Unpack[CallOptions]) -> PreparedRequest:
        """Build the request a call would send, without sending it (the dry run). See `CallOptions`.
        A request that cannot be built is, with tracing on, an error span (see `tracing`)."""
        try:
            return self._prepare(prompt, endpoint, stream, options)
        except DbMagicError as exc:
            tracing.failed_before_request(endpoint if isinstance(endpoint, str) else None, prompt, exc)
            raise

    def _prepare(self, prompt: Any, endpoint: str | None, stream: bool, options: Mapping[str, Any]) -> PreparedRequest:
        o = _checked_options(options, "prepare")
        if endpoint is not None:
            endpoint = settings.coerce("endpoint", endpoint)
        kind, path, target, name = self._target(endpoint, o["cluster_id"], o["port"], o["org_id"], o["task"])
        request = _wire.seed_request(
            prompt,
            {"temperature": o["temperature"], "max_tokens": o["max_tokens"], "stop": o["stop"] or None, "n": o["n"],
             **(o["extra_params"] or {})},
        )
        if o["transform_input"] is not None:
            request = _apply_input_transform(o["transform_input"], request)
        problem = _wire.not_for_kind("--system", kind, target) if o["system"] else None
        if problem:  # never silently dropped
            raise ConfigurationError(problem)
        body = _wire.build_body(kind, request, system=o["system"], history=o["history"] or (), stream=stream)
        _check_json(body)
        return PreparedRequest(kind, target, path, body, self.credentials.host,
                               stream=stream and kind in _wire.STREAMING_KINDS, name=name)

    @_with_call_options
    def complete(self, prompt: Any, endpoint: str | None = None, *, transform_output: Transform | None = None,
                 timeout: float | None = None, **options: Unpack[CallOptions]) -> Completion:
        """Send one prompt and wait for the whole answer.

        ``endpoint`` names a serving endpoint; or give ``cluster_id`` and ``port`` for a driver-proxy
        app. ``transform_output(value) -> value`` reads the answer; ``timeout`` bounds the wait (seconds).
        The other options are `CallOptions`.
        """
        refuse_unknown_options(options, "Client.complete")
        prepared = self.prepare(prompt, endpoint, **options)
        return self.send(prepared, transform_output=transform_output, timeout=timeout)

    def send(self, prepared: PreparedRequest, *, transform_output: Transform | None = None,
             timeout: float | None = None, retry: RetryPolicy | None = None) -> Completion:
        """Send a `PreparedRequest` and wait for the whole answer (``retry`` overrides the client's
        retry policy for this call)."""
        timeout = _timeout(timeout)
        span = tracing.call_span(prepared)
        started = time.perf_counter()
        try:
            response = self.transport.request(
                self.credentials, "POST", prepared.path, target=prepared.target, json=prepared.body, timeout=timeout,
                retry=retry,
            )
            # keep what is needed, not the response: an error's traceback keeps this frame alive
            content, status, headers, attempts = response.content, response.status_code, response.headers, _attempts(
                response)
            response.close()
            del response
            secrets = self.credentials.secrets()
            data = _json(content, prepared.target, status, secrets)
            latency = time.perf_counter() - started
            completion = _completion(prepared, _parse(prepared, data, secrets), data, headers, latency, transform_output,
                                     attempts=attempts, secrets=secrets)
        except BaseException as exc:
            if span is not None:
                span.failed(exc)
            raise
        if span is not None:
            span.ok(completion)
        return completion

    @_with_call_options
    def stream(self, prompt: Any, endpoint: str | None = None, *, transform_output: Transform | None = None,
               timeout: float | None = None, **options: Unpack[CallOptions]) -> Stream:
        """Send one prompt and iterate over the answer's text as it arrives (options as `complete`).

        Endpoints that do not stream (embeddings, custom models, proxy apps) give their whole text
        as one piece. After the loop, ``stream.completion`` holds the `Completion`. A cut stream
        raises `StreamInterrupted`, whose ``.partial`` (and ``stream.text``) keep what arrived.
        """
        refuse_unknown_options(options, "Client.stream")
        prepared = self.prepare(prompt, endpoint, stream=True, **options)
        return self.open_stream(prepared, transform_output=transform_output, timeout=timeout)

    def open_stream(self, prepared: PreparedRequest, *, transform_output: Transform | None = None,
                    timeout: float | None = None) -> Stream:
        """Send a `PreparedRequest` (built with ``stream=True``) and return its `Stream`."""
        timeout = _timeout(timeout)
        span = tracing.call_span(prepared)
        started = time.perf_counter()
        try:
            response = self.transport.request(
                self.credentials, "POST", prepared.path, target=prepared.target, json=prepared.body,
                stream=True, timeout=timeout,
            )
        except BaseException as exc:
            if span is not None:
                span.failed(exc)
            raise
        return Stream(prepared, Body(response), response.headers, started, transform_output, span=span,
                      attempts=_attempts(response), secrets=self.credentials.secrets())

    def _target(self, endpoint: str | None, cluster_id: Any, port: Any, org_id: Any, task: str | None):
        if endpoint and (cluster_id or port):
            raise ConfigurationError(
                "Give either an endpoint or a driver-proxy app (cluster id and port), not both."
            )
        if endpoint:
            kind = _wire.kind_for(task) if task else self.endpoint(endpoint).kind
            return (kind, f"/serving-endpoints/{quote(endpoint, safe='')}/invocations", f"endpoint {endpoint!r}",
                    endpoint)
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
            return _wire.PROXY, path, f"proxy app on cluster {cluster_id} port {port}", f"{cluster_id}:{port}"
        raise ConfigurationError(
            "No endpoint given: pass endpoint= (--endpoint NAME, or %config DbLLM.endpoint = NAME), "
            "or cluster_id= and port= for a driver-proxy app. `%dbllm endpoints` lists the endpoints."
        )

    def close(self) -> None:
        """Close the HTTP session (its pooled connections)."""
        self.transport.close()


class Stream:
    """An answer arriving piece by piece. Iterate for text chunks; then read ``.completion``.

    ``text`` is everything that has arrived so far, also after an error or ``close()``. ``body`` is
    the response body as the transport gives it (`dbmagic._http.Body`: ``read``, ``read_all``,
    ``abort``, ``close``), ``headers`` the response's headers.
    """

    def __init__(self, prepared: PreparedRequest, body: Body, headers: Mapping[str, str], started: float,
                 transform_output: Transform | None, *, span: tracing.CallSpan | None = None, attempts: int = 1,
                 secrets: Sequence[Secret] = ()):
        self.prepared = prepared
        self._secrets = secrets  # what an error event from the server is scrubbed of
        self._span = span
        self._attempts = attempts
        self.text = ""
        self.completion: Completion | None = None
        self.cancelled = False
        self._body = body
        self._headers = headers
        self._started = started
        self._transform_output = transform_output
        self._iterator = self._iterate()

    def __iter__(self) -> Iterator[str]:
        return self._iterator

    def __next__(self) -> str:
        return next(self._iterator)

    def close(self) -> None:
        """Stop reading (from the thread that iterates); ``text`` keeps what arrived."""
        self._iterator.close()
        self._body.close()

    def cancel(self) -> None:
        """Stop from another thread (a Stop button): the iteration ends quietly, ``completion``
        stays None and ``text`` keeps what arrived. A read blocked on a silent endpoint wakes at once."""
        self.cancelled = True
        self._body.abort()

    def _iterate(self) -> Iterator[str]:
        error: BaseException | None = None
        try:
            content_type = self._headers.get("Content-Type", "")
            if not self.prepared.stream or "text/event-stream" not in content_type:
                yield from self._whole_answer()
                return
            yield from self._events()
        except GeneratorExit:  # the reader stopped early (close())
            raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._body.close()
            if self._span is not None:
                self._end_span(error)

    def _end_span(self, error: BaseException | None) -> None:
        span, self._span = self._span, None
        if self.completion is not None:
            span.ok(self.completion)
        elif error is not None and not isinstance(error, StreamInterrupted):
            span.failed(error)
        else:  # cut (what arrived is kept), cancelled or closed early
            span.partial(self.partial("cut" if error is not None else "stopped"), error)

    def partial(self, why: str) -> Completion:
        """A `Completion` of what arrived, for an answer that did not end normally (``why``:
        ``cut``, ``stopped`` or ``interrupted``)."""
        return Completion(text=self.text, value=self.text, endpoint=self.prepared.name or self.prepared.target, kind=self.prepared.kind,
                          latency=time.perf_counter() - self._started, request=self.prepared.body,
                          finish_reason=why, attempts=self._attempts)

    def _whole_answer(self) -> Iterator[str]:
        try:
            content = self._body.read_all()
        except ConnectionError as exc:
            raise self._cut(f"the connection broke ({exc})") from None
        data = _json(content, self.prepared.target, secrets=self._secrets)
        latency = time.perf_counter() - self._started
        parsed = _parse(self.prepared, data, self._secrets)
        self.text = parsed.text
        if parsed.text:
            yield parsed.text
        self.completion = _completion(self.prepared, parsed, data, self._headers, latency,
                                      self._transform_output, time_to_first_token=latency, attempts=self._attempts,
                                      secrets=self._secrets)

    def _events(self) -> Iterator[str]:
        decoder = _wire.SSEDecoder()
        reader = _wire.ChunkReader()
        usage: dict[str, Any] = {}
        finish: str | None = None
        model: str | None = None
        first: float | None = None
        last: Any = None  # the last event, kept as the completion's raw (its usage, finish reason, ids)
        done = False
        while True:
            if self.cancelled:
                return
            try:
                chunk = self._body.read()
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
            events = list(decoder.feed(chunk)) if chunk else decoder.close()
            for event in events:
                if event.strip() == "[DONE]":
                    done = True
                    break
                try:
                    data = json.loads(event)
                except ValueError:
                    raise self._cut("an event that is not JSON") from None
                if not isinstance(data, dict):
                    raise self._cut("an event that is not a JSON object")
                if "error_code" in data or "error" in data or data.get("type") == "error":
                    code, message = parse_error_body(event, self._secrets)
                    raise self._cut(f"an error mid-stream: {message or code}")
                piece, chunk_usage, chunk_finish = reader.read(data)
                last = data
                usage = chunk_usage or usage
                finish = chunk_finish or finish
                model = data.get("model") or model
                if piece:
                    if first is None:
                        first = time.perf_counter() - self._started
                    self.text += piece
                    yield piece
            if not chunk:
                if self.cancelled:
                    return
                if not done and (decoder.truncated or finish is None):
                    raise self._cut("the connection closed before the end of the answer")
                break
        latency = time.perf_counter() - self._started
        parsed = _wire.Parsed(self.text, self.text, usage, model, finish)
        self.completion = _completion(self.prepared, parsed, last, self._headers, latency,
                                      self._transform_output, time_to_first_token=first, attempts=self._attempts,
                                      secrets=self._secrets)

    def _cut(self, why: str) -> StreamInterrupted:
        return StreamInterrupted(
            f"The stream from {self.prepared.target} was cut: {why}; {len(self.text)} characters arrived",
            partial=self.text,
            target=self.prepared.target,
        )


def _apply_input_transform(transform: Transform, request: dict[str, Any]) -> dict[str, Any]:
    name = _name(transform)
    try:
        result = transform(**request)
    except Exception as exc:
        raise TransformError(
            f"transform_input {name!r} raised {exc.__class__.__name__}: {exc}. "
            "Fix the function (its traceback is above) or run without it.",
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
            "Fix the function (its traceback is above) or run without it.",
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
    except ValueError:  # scrubbed whole, then cut: no part of a secret survives the cut
        snippet = scrub(content.decode("utf-8", "replace"), secrets)[:200]
        raise BadResponse(f"{target} sent an answer that is not JSON: {snippet!r}", target=target,
                          status=status, secrets=secrets) from None


def _server_text(value: Any, secrets: Sequence[Secret]) -> str | None:
    """A short field from the server (a request id, a model name), scrubbed and bounded."""
    return scrub(str(value), secrets)[:200] if value else None


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


def _attempts(response: requests.Response) -> int:
    return getattr(response, "dbmagic_attempts", 1)


def _completion(prepared: PreparedRequest, parsed: _wire.Parsed, data: Any, headers: Mapping[str, str],
                latency: float, transform_output: Transform | None, time_to_first_token: float | None = None,
                attempts: int = 1, secrets: Sequence[Secret] = ()) -> Completion:
    value = parsed.value
    if transform_output is not None:
        value = _apply_output_transform(transform_output, value)
    return Completion(
        text=value if isinstance(value, str) else parsed.text,
        value=value,
        endpoint=prepared.name or prepared.target,
        kind=prepared.kind,
        raw=data,
        usage=parsed.usage,
        latency=latency,
        request=prepared.body,
        request_id=_server_text(headers.get("x-request-id"), secrets),
        served_model=_server_text(parsed.served_model or headers.get("served-model-name"), secrets),
        finish_reason=parsed.finish_reason,
        time_to_first_token=time_to_first_token,
        attempts=attempts,
    )


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
    with _default_lock:
        old, _default = _default, Client(host, token, profile=profile, **client_options)
    if old is not None:
        old.close()
    return _default
