"""MLflow traces of every call, and prompts from the MLflow Prompt Registry (``pip install 'dbmagic[mlflow]'``).

>>> import dbmagic, mlflow
>>> mlflow.set_experiment("/Users/me/support-bot")
>>> dbmagic.autolog()                       # or %config DbLLM.trace = True, or %dbllm trace on

Then every call (``%%dbllm``, the panel, `dbmagic.batch`, the Python API) records a span through
MLflow's public tracing API: type ``CHAT_MODEL`` (chat and agents), ``LLM`` (completions, custom
models, proxy apps) or ``EMBEDDING``; the request as sent (after ``transform_input``) as its
inputs, the endpoint's answer as outputs (for a stream, the whole answer put together, with a
``mlflow.chunk.item.N`` event per streamed event, as MLflow's OpenAI autologger records it);
attributes for the endpoint, task, parameters, host, the transformed output, usage
(``mlflow.chat.tokenUsage``), latency, attempts, request id and served model, and those MLflow's UI
reads from its own autologgers (``mlflow.llm.model`` and ``mlflow.llm.provider``, which it prices,
``mlflow.message.format``, ``mlflow.chat.tools``). A failed call is an error span; a cut or stopped
stream keeps its partial text. A batch is a trace per row tied by a tag (`BatchSpan`). Traces go to
the active experiment; in a Databricks notebook MLflow shows them under the cell. No token, secret
or Authorization header is ever put in a trace.

Prompts: ``%%dbllm --prompt prompts:/NAME/VERSION`` (or ``prompts:/NAME@alias``) uses a registered
template, `register_prompt` adds one, ``%dbllm prompts`` lists them.

MLflow is imported only when tracing is on or the registry is used: this module itself is light.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..call import hooks
from ..call import wire as _wire
from ..errors import ConfigurationError, first_line

if TYPE_CHECKING:
    from ..client import Call, Completion, PreparedRequest

__all__ = ["autolog", "enabled", "flush", "register_prompt", "load_prompt", "list_prompts", "prompt_settings", "rows_of"]

log = logging.getLogger("dbmagic")
_INSTALL = "Tracing and the prompt registry need MLflow: pip install 'dbmagic[mlflow]' (or mlflow-skinny)."
_SPAN_TYPES = {_wire.CHAT: "CHAT_MODEL", _wire.RESPONSES: "CHAT_MODEL", _wire.CHAT_AGENT: "CHAT_MODEL",
               _wire.EMBEDDINGS: "EMBEDDING"}
_PARAMS = ("temperature", "max_tokens", "stop", "n", "service_tier")
_OPENAI_SHAPES = (_wire.CHAT, _wire.COMPLETIONS, _wire.RESPONSES)  # what mlflow.message.format "openai" parses
_CHUNK_NAME, _CHUNK_VALUE = "mlflow.chunk.item.{index}", "mlflow.chunk.value"  # mlflow.tracing.constant's names


def autolog(disable: bool = False) -> None:
    """Trace every dbmagic call to MLflow (``disable=True`` stops). Fails at once, naming the
    package to install, when MLflow is missing. Tracing is a subscriber of every client's calls
    (`dbmagic.hooks`): the client itself knows nothing of MLflow."""
    if not disable:
        mlflow_module()
        hooks.GLOBAL.add(_TRACER)
    else:
        hooks.GLOBAL.remove(_TRACER)


def enabled() -> bool:
    """Whether every call is traced: the tracing subscriber is subscribed."""
    return _TRACER in hooks.GLOBAL.all()


def flush() -> None:
    """Write now what MLflow writes in the background (`mlflow.flush_trace_async_logging`), so the
    traces of a cell or a batch that just ended are readable at once (``mlflow.search_traces``);
    nothing when tracing is off."""
    if not enabled():
        return
    try:
        mlflow_module().flush_trace_async_logging()
    except Exception as exc:  # the traces are MLflow's to keep; a failure to flush them never fails a cell
        log.warning("dbmagic could not flush MLflow's traces: %s", first_line(exc))


def describe() -> str:
    """Whether tracing is on, and where the traces go."""
    if not enabled():
        return "Tracing is off. `%dbllm trace on` (or dbmagic.autolog()) records every call to MLflow."
    mlflow = mlflow_module()
    where = mlflow.get_tracking_uri()
    try:  # MLflow has no public name for the active experiment; say less rather than fail
        from mlflow.tracking.fluent import _get_experiment_id

        where = f"experiment {mlflow.get_experiment(_get_experiment_id()).name!r} ({where})"
    except Exception:
        pass
    return f"Tracing every dbmagic call to MLflow, {where}. `%dbllm trace off` stops."


def mlflow_module() -> Any:
    """MLflow, imported when tracing or judging first needs it; a dbmagic error saying what to install
    when it is missing."""
    try:
        import mlflow
    except ImportError:
        raise ConfigurationError(_INSTALL) from None
    return mlflow


# -- spans --------------------------------------------------------------------------------------

class CallSpan:
    """The span of one call: opened before the request, closed with its outcome."""

    def __init__(self, prepared: PreparedRequest):
        mlflow = mlflow_module()
        self.prepared = prepared
        body = prepared.body
        params = {k: body[k] for k in _PARAMS if k in body}
        self.span = mlflow.start_span_no_context(
            name=prepared.target, span_type=_SPAN_TYPES.get(prepared.kind, "LLM"),
            parent_span=mlflow.get_current_active_span(), inputs=body,
            attributes={**_as_autolog(prepared),
                        "dbmagic.endpoint": prepared.name or prepared.target, "dbmagic.task": prepared.kind,
                        "dbmagic.host": prepared.host, "dbmagic.params": params, "dbmagic.stream": prepared.stream},
        )
        self.children: list[Any] = []
        self.chunks: list[dict[str, Any]] = []

    def chunk(self, event: dict[str, Any]) -> None:
        """One streamed event (secrets already taken out of it), kept until the call ends."""
        self.chunks.append(event)

    def record_chunks(self, secret_split: bool) -> None:
        """The streamed events, as MLflow's OpenAI autologger records each chunk (a span event).
        When a secret came split across two events (each clean alone), the events are left out and
        an event says so: the answer itself (the outputs) has the secret taken out."""
        from mlflow.entities import SpanEvent

        chunks, self.chunks = self.chunks, []
        if secret_split:
            self.span.add_event(SpanEvent(name="dbmagic.scrubbed", attributes={
                "dbmagic.note": "a secret came split across streamed events: the events are not recorded"}))
            return
        for index, event in enumerate(chunks):
            self.span.add_event(SpanEvent(name=_CHUNK_NAME.format(index=index),
                                          attributes={_CHUNK_VALUE: json.dumps(event, default=str)}))

    def ok(self, completion: Completion) -> None:
        attributes = _outcome(completion)
        outputs = _outputs(completion, self.prepared.stream)
        if completion.error is not None:  # an answer that did not fit the schema
            self.span.add_event(_exception_event(completion.error))
            self.span.end(outputs=outputs, attributes=attributes, status=_error_status(completion.error))
            return
        self.span.end(outputs=outputs, attributes=attributes, status="OK")

    def step(self, request: dict[str, Any], completion: Completion, error: BaseException | None,
             tool_calls: list[Any] = (), usage: Any = None) -> None:
        """One round trip of a call that went on: a child span with what was sent and what came
        back (an error span for an answer that did not fit the schema), and a TOOL span per tool run."""
        mlflow = mlflow_module()
        child = mlflow.start_span_no_context(
            name=f"{self.prepared.target} · step {len(self.children) + 1}",
            span_type=_SPAN_TYPES.get(self.prepared.kind, "LLM"), parent_span=self.span, inputs=request,
            attributes={"dbmagic.endpoint": self.prepared.name or self.prepared.target, "dbmagic.task": self.prepared.kind})
        self.children.append(child)
        attributes = _outcome(completion, usage)
        if error is not None:
            child.add_event(_exception_event(error))
        child.end(outputs=_outputs(completion, self.prepared.stream), attributes=attributes,
                  status=_error_status(error) if error is not None else "OK")
        for call in tool_calls:
            tool = mlflow.start_span_no_context(name=call.name, span_type="TOOL", parent_span=self.span,
                                                inputs=call.arguments if call.arguments is not None else
                                                {"arguments": call.raw_arguments},
                                                attributes={"dbmagic.tool_call_id": call.id})
            if call.error:
                tool.end(outputs=call.output, attributes={"dbmagic.error": call.error},
                         status=_error_status(call.error))
            else:
                tool.end(outputs=call.output, status="OK")

    def partial(self, completion: Completion, error: BaseException | None = None) -> None:
        """A stream that was cut or stopped: what arrived; an error span when cut."""
        if error is not None:
            self.span.add_event(_exception_event(error))
        self.span.end(outputs=completion.text, attributes=_outcome(completion),
                      status="ERROR" if error is not None else "OK")

    def failed(self, error: BaseException) -> None:
        _end_failed(self.span, error)


def _as_autolog(prepared: PreparedRequest) -> dict[str, Any]:
    """The attributes MLflow's own autologgers set on an LLM span and its UI reads (names from
    ``mlflow.tracing.constant.SpanAttributeKey``): the model and provider it prices and groups
    usage by, the message format its chat view parses (``openai`` for the OpenAI shapes, as the
    OpenAI autologger writes), the request's parameters as top-level attributes, and the tools
    offered (``mlflow.chat.tools``, for chat)."""
    body = prepared.body
    attributes: dict[str, Any] = {k: body[k] for k in _PARAMS if k in body}
    if prepared.llm is not None:
        attributes["mlflow.llm.model"], attributes["mlflow.llm.provider"] = prepared.llm
    if prepared.kind in _OPENAI_SHAPES:
        attributes["mlflow.message.format"] = "openai"
    if prepared.kind == _wire.CHAT and isinstance(body.get("tools"), list):
        attributes["mlflow.chat.tools"] = body["tools"]
    return attributes


def _outputs(completion: Completion, streamed: bool) -> Any:
    """A whole answer's JSON; for a stream, the whole answer put together from its events, as
    MLflow's OpenAI autologger records one (a chat completion, the Responses API's completed
    response; the text for the legacy completions and the other kinds)."""
    if not streamed:
        return completion.raw if completion.raw is not None else completion.text
    return _whole_answer(completion)


def _whole_answer(completion: Completion) -> Any:
    raw = completion.raw if isinstance(completion.raw, dict) else {}
    if completion.kind == _wire.RESPONSES and raw.get("type") == "response.completed" and isinstance(
            raw.get("response"), dict):
        return raw["response"]
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.raw_arguments}}
             for c in completion.tool_calls if not c.ran]
    usage = {k: v for k, v in (("prompt_tokens", completion.usage.input), ("completion_tokens", completion.usage.output),
                                ("total_tokens", completion.usage.total)) if v is not None}
    if completion.kind == _wire.CHAT:
        message: dict[str, Any] = {"role": "assistant", "content": None if calls and not completion.text
                                   else completion.text}
        if calls:
            message["tool_calls"] = calls
        answer = {"object": "chat.completion", "id": raw.get("id"), "model": completion.served_model,
                  "choices": [{"index": 0, "message": message, "finish_reason": completion.finish_reason or "stop"}]}
        return {**answer, "usage": usage} if usage else answer
    if completion.kind == _wire.RESPONSES:
        output: list[dict[str, Any]] = [{"type": "message", "role": "assistant", "status": "completed",
                                         "content": [{"type": "output_text", "text": completion.text}]}]
        output += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                    "arguments": c["function"]["arguments"]} for c in calls]
        return {"object": "response", "status": "completed", "model": completion.served_model, "output": output,
                **({"usage": {"input_tokens": completion.usage.input, "output_tokens": completion.usage.output,
                              "total_tokens": completion.usage.total}} if usage else {})}
    return completion.text


def _error_status(error: Any) -> Any:
    from mlflow.entities import SpanStatus

    described = f"{error.__class__.__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return SpanStatus("ERROR", description=described[:1000])


def _end_failed(span: Any, error: BaseException) -> None:
    from mlflow.entities import SpanStatus

    span.add_event(_exception_event(error))
    span.end(attributes={"dbmagic.error": str(error)},
             status=SpanStatus("ERROR", description=f"{error.__class__.__name__}: {error}"[:1000]))


class _Tracer(hooks.Subscriber):
    """The subscriber `autolog` registers: a span opens with each call's request and closes with
    its end (an error span for a failed call, the partial text for a cut or stopped one)."""

    def __init__(self) -> None:
        self._spans: weakref.WeakKeyDictionary[Call, CallSpan] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def on_request(self, call: Call) -> None:
        span = CallSpan(call.prepared)
        if "batch" in call.tags and span.span.parent_id is None:  # a batch's row: a trace of its own, tagged
            _tag(span.span, {"dbmagic.batch": str(call.tags["batch"]), "dbmagic.row": str(call.tags.get("row"))})
        with self._lock:
            self._spans[call] = span

    def _span(self, call: Call) -> CallSpan | None:
        with self._lock:
            return self._spans.pop(call, None)

    def on_event(self, call: Call, event: dict[str, Any]) -> None:
        with self._lock:
            span = self._spans.get(call)
        if span is not None:
            span.chunk(event)

    def on_step(self, call: Call, step: Any) -> None:
        with self._lock:
            span = self._spans.get(call)
        if span is not None:
            span.step(step.request, step.completion, step.error, step.tool_calls if step.why == "tools" else [],
                      step.usage)

    def on_done(self, call: Call, completion: Completion) -> None:
        span = self._span(call)
        if span is None:
            return
        if call.steps:  # the last round trip is a step too, beside the earlier ones
            span.step(call.sending.body, completion, completion.error if not completion.is_partial else None,
                      usage=call.round_usage)
        span.record_chunks(call.secret_split)
        if completion.is_partial:
            span.partial(completion, completion.error)
        else:
            span.ok(completion)

    def on_failed(self, call: Call, error: BaseException) -> None:
        span = self._span(call)
        if span is not None:
            span.record_chunks(call.secret_split)
            span.failed(error)

    def on_refused(self, endpoint: str | None, prompt: Any, error: BaseException) -> None:
        failed_before_request(endpoint, prompt, error)


_TRACER = _Tracer()


_dry = contextvars.ContextVar("dbmagic_dry_run", default=False)


@contextlib.contextmanager
def dry_run() -> Iterator[None]:
    """Within it, a request that cannot be built is not a failed call (``--dry-run`` sends nothing)."""
    token = _dry.set(True)
    try:
        yield
    finally:
        _dry.reset(token)


def failed_before_request(endpoint: str | None, prompt: Any, error: BaseException) -> None:
    """With tracing on, the error span of a call that failed before its request was built (the
    endpoint not found, an option its kind cannot use): every failed call leaves a trace."""
    if not enabled() or _dry.get():
        return
    mlflow = mlflow_module()
    span = mlflow.start_span_no_context(
        name=f"endpoint {endpoint!r}" if endpoint else "dbmagic call", span_type="LLM",
        parent_span=mlflow.get_current_active_span(), inputs={"prompt": prompt if isinstance(prompt, str) else str(prompt)},
        attributes={"dbmagic.endpoint": endpoint})
    _end_failed(span, error)


def _outcome(completion: Completion, usage: Any = None) -> dict[str, Any]:
    value = completion.value
    if hasattr(value, "model_dump"):  # a schema's pydantic value
        value = value.model_dump(mode="json")
    attributes = {
        "dbmagic.output": value if isinstance(value, (str, int, float, bool, list, dict)) or value is None else str(value),
        "dbmagic.latency_ms": round(completion.latency * 1000, 3),
        "dbmagic.attempts": completion.attempts,
        "dbmagic.request_id": completion.request_id,
        "dbmagic.served_model": completion.served_model,
        "dbmagic.finish_reason": completion.finish_reason,
    }
    if completion.cached:  # answered by the cache (dbmagic.ledger): nothing was sent
        attributes["dbmagic.cached"] = True
    usage = completion.usage if usage is None else usage
    tokens = {"input_tokens": usage.input, "output_tokens": usage.output, "total_tokens": usage.total,
              "cache_read_input_tokens": usage.cache_read, "cache_creation_input_tokens": usage.cache_creation}
    if usage:
        attributes["mlflow.chat.tokenUsage"] = {k: v for k, v in tokens.items() if v is not None}
    if completion.tool_calls:
        attributes["dbmagic.tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in
                                            completion.tool_calls]
    return attributes


def _exception_event(error: BaseException) -> Any:
    from mlflow.entities import SpanEvent

    # the message only: dbmagic's errors are scrubbed of secrets; a traceback's frames are not needed
    return SpanEvent(name="exception", timestamp=time.time_ns(),
                     attributes={"exception.type": error.__class__.__name__, "exception.message": str(error)[:2000]})


class BatchSpan:
    """A batch's own trace: one ``dbmagic.batch`` span with the template, the row count and the
    outcome, tagged ``dbmagic.batch=<id>``. Each row is a trace of its own with the same tag and
    ``dbmagic.row=<index>`` (not a child of this span): MLflow exports a trace when its root span
    ends and keeps it whole in memory until then, and its trace view draws every span, so 10,000
    rows under one parent would be one unreadable trace lost whole if the kernel died. One trace a
    row is what ``mlflow.genai.evaluate`` and the trace list page through, and a row's trace is
    saved the moment it ends. Find a batch's rows with
    ``mlflow.search_traces(filter_string="tags.`dbmagic.batch` = '<id>'")`` (`rows_of`)."""

    def __init__(self, template: str, rows: int, endpoint: str | None):
        mlflow = mlflow_module()
        self.batch_id = uuid.uuid4().hex[:16]
        self.span = mlflow.start_span_no_context(
            name="dbmagic.batch", span_type="CHAIN", parent_span=mlflow.get_current_active_span(),
            inputs={"template": template, "rows": rows, "endpoint": endpoint}, attributes={"dbmagic.batch": self.batch_id})
        _tag(self.span, {"dbmagic.batch": self.batch_id})
        self.outputs: Any = None

    def set_outputs(self, outputs: Any) -> None:
        self.outputs = outputs


@contextlib.contextmanager
def batch_span(template: str, rows: int, endpoint: str | None) -> Iterator[BatchSpan | None]:
    """The batch's own trace (`BatchSpan`), or None with tracing off."""
    if not enabled():
        yield None
        return
    batch = BatchSpan(template, rows, endpoint)
    try:
        yield batch
    except BaseException as exc:
        _end_failed(batch.span, exc)
        raise
    batch.span.end(outputs=batch.outputs, status="OK")


def rows_of(batch_id: str, **search: Any) -> list[Any]:
    """The traces of a batch's rows (``dbmagic.batch`` tag), in row order."""
    mlflow = mlflow_module()
    found = mlflow.search_traces(filter_string=f"tags.`dbmagic.batch` = '{batch_id}'", return_type="list", **search)
    rows = [t for t in found if "dbmagic.row" in t.info.tags]
    return sorted(rows, key=lambda t: int(t.info.tags["dbmagic.row"]))


def _tag(span: Any, tags: dict[str, str]) -> None:
    """Tag the trace of ``span``, a root span not in the context (MLflow tags the current trace)."""
    mlflow = mlflow_module()
    try:
        from mlflow.tracing.provider import detach_span_from_context, set_span_in_context

        token = set_span_in_context(span)
        try:
            mlflow.update_current_trace(tags=tags)
        finally:
            detach_span_from_context(token)
    except Exception as exc:  # an MLflow without these: the trace stays untagged, the call goes on
        log.debug("could not tag the trace: %s", exc)


@contextlib.contextmanager
def prompt_span(version: Any) -> Iterator[None]:
    """With tracing on, a span around a cell that uses a registered prompt, linked to the very
    version the cell renders (an alias is resolved once, by `load_prompt`: one that moves while
    the cell runs does not change what the trace links)."""
    if not enabled():
        yield
        return
    mlflow = mlflow_module()
    uri = version_uri(version)
    with mlflow.start_span(name=f"dbmagic {uri}", span_type="CHAIN") as span:
        span.set_inputs({"prompt": uri})
        mlflow.genai.load_prompt(uri)  # loading inside the trace links the prompt version to it
        yield


def version_uri(version: Any) -> str:
    """``prompts:/NAME/VERSION`` of a loaded prompt version (whatever alias found it)."""
    return f"prompts:/{version.name}/{version.version}"


# a registry prompt's model_config -> dbmagic's settings (model_name and provider are the cell's -e)
_MODEL_CONFIG = {"temperature": "temperature", "max_tokens": "max_tokens", "stop_sequences": "stop"}
_EXTRA_FIELDS = ("top_p", "top_k", "frequency_penalty", "presence_penalty")


def prompt_settings(version: Any) -> dict[str, Any]:
    """The settings a prompt version brings, checked as the cell's own would be: its
    ``model_config`` (temperature, max_tokens, stop sequences; top_p, top_k and the penalties and
    its ``extra_params`` as request fields) and its ``response_format`` (the call's schema). The
    cell's own flags win over them, and they over the ``%config`` defaults."""
    from .. import settings

    config = getattr(version, "model_config", None) or {}
    found: dict[str, Any] = {}
    uri = version_uri(version)
    try:
        for key, name in _MODEL_CONFIG.items():
            if config.get(key) is not None:
                found[name] = settings.coerce(name, config[key])
        extra = {k: config[k] for k in _EXTRA_FIELDS if config.get(k) is not None}
        extra.update(config.get("extra_params") or {})
        if extra:
            found["extra_params"] = settings.coerce("extra_params", extra)
        response_format = getattr(version, "response_format", None)
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            response_format = response_format.get("json_schema") or response_format  # OpenAI's own wrapping
        if response_format:
            found["schema"] = settings.coerce("schema", json.dumps(response_format))
    except ConfigurationError as exc:
        raise ConfigurationError(f"The registry prompt {uri} has a model_config or response_format dbmagic cannot "
                                 f"use: {exc}") from None
    return found


# -- the prompt registry ------------------------------------------------------------------------------

def load_prompt(uri: str) -> Any:
    """The registered prompt version at ``uri`` (``prompts:/NAME/VERSION`` or ``prompts:/NAME@alias``)."""
    if not uri.startswith("prompts:/") or len(uri) <= len("prompts:/"):
        raise ConfigurationError(f"--prompt {uri!r} is not a prompt URI: use prompts:/NAME/VERSION or prompts:/NAME@alias.")
    mlflow = mlflow_module()
    try:
        return mlflow.genai.load_prompt(uri)
    except Exception as exc:
        raise ConfigurationError(
            f"Could not load {uri} from the MLflow Prompt Registry ({first_line(exc)}). "
            "`%dbllm prompts` lists the registered prompts (mlflow.genai.search_prompts())."
        ) from None


def register_prompt(name: str, template: str | list[dict[str, str]], commit_message: str | None = None,
                    tags: dict[str, str] | None = None, **options: Any) -> Any:
    """Register ``template`` (text with ``{{ name }}`` variables, or a chat prompt: a list of
    ``{"role", "content"}`` messages) as the next version of prompt ``name`` (in Unity Catalog,
    ``catalog.schema.name``); returns the `PromptVersion` (its ``uri`` is what ``--prompt``
    takes). ``options`` go to ``mlflow.genai.register_prompt`` as they are (``response_format``,
    ``model_config``)."""
    mlflow = mlflow_module()
    try:
        return mlflow.genai.register_prompt(name=name, template=template, commit_message=commit_message, tags=tags,
                                            **options)
    except Exception as exc:
        raise ConfigurationError(f"Could not register prompt {name!r} ({first_line(exc)}).") from None


def list_prompts() -> list[tuple[str, str, str]]:
    """``(name, latest version, its URI)`` of each registered prompt."""
    mlflow = mlflow_module()
    rows = []
    try:
        for prompt in mlflow.genai.search_prompts():
            latest = mlflow.genai.load_prompt(f"prompts:/{prompt.name}@latest")
            rows.append((prompt.name, str(latest.version), latest.uri))
    except Exception as exc:
        raise ConfigurationError(f"Could not list the MLflow prompts ({first_line(exc)}).") from None
    return rows
