"""MLflow traces of every call, and prompts from the MLflow Prompt Registry (``pip install 'dbmagic[mlflow]'``).

>>> import dbmagic, mlflow
>>> mlflow.set_experiment("/Users/me/support-bot")
>>> dbmagic.autolog()                       # or %config DbLLM.trace = True, or %dbllm trace on

Then every call (``%%dbllm``, the panel, `dbmagic.batch`, the Python API) records a span through
MLflow's public tracing API: type ``CHAT_MODEL`` (chat and agents), ``LLM`` (completions, custom
models, proxy apps) or ``EMBEDDING``; the request as sent (after ``transform_input``) as its
inputs, the endpoint's answer as outputs; attributes for the endpoint, task, parameters, host, the
transformed output, usage (``mlflow.chat.tokenUsage``), latency, attempts, request id and served
model. A failed call is an error span; a cut or stopped stream keeps its partial text. A batch is
one span with a child per row. Traces go to the active experiment; in a Databricks notebook MLflow
shows them under the cell. No token, secret or Authorization header is ever put in a trace.

Prompts: ``%%dbllm --prompt prompts:/NAME/VERSION`` (or ``prompts:/NAME@alias``) uses a registered
template, `register_prompt` adds one, ``%dbllm prompts`` lists them.

MLflow is imported only when tracing is on or the registry is used: this module itself is light.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from . import _wire, hooks
from .errors import ConfigurationError, first_line

if TYPE_CHECKING:
    from .client import Call, Completion, PreparedRequest

__all__ = ["autolog", "enabled", "register_prompt", "load_prompt", "list_prompts"]

_INSTALL = "Tracing and the prompt registry need MLflow: pip install 'dbmagic[mlflow]' (or mlflow-skinny)."
_SPAN_TYPES = {_wire.CHAT: "CHAT_MODEL", _wire.RESPONSES: "CHAT_MODEL", _wire.CHAT_AGENT: "CHAT_MODEL",
               _wire.EMBEDDINGS: "EMBEDDING"}
_PARAMS = ("temperature", "max_tokens", "stop", "n")


def autolog(disable: bool = False) -> None:
    """Trace every dbmagic call to MLflow (``disable=True`` stops). Fails at once, naming the
    package to install, when MLflow is missing. Tracing is a subscriber of every client's calls
    (`dbmagic.hooks`): the client itself knows nothing of MLflow."""
    if not disable:
        _mlflow()
        hooks.GLOBAL.add(_TRACER)
    else:
        hooks.GLOBAL.remove(_TRACER)


def enabled() -> bool:
    """Whether every call is traced: the tracing subscriber is subscribed."""
    return _TRACER in hooks.GLOBAL.all()


def describe() -> str:
    """Whether tracing is on, and where the traces go."""
    if not enabled():
        return "Tracing is off. `%dbllm trace on` (or dbmagic.autolog()) records every call to MLflow."
    mlflow = _mlflow()
    where = mlflow.get_tracking_uri()
    try:  # MLflow has no public name for the active experiment; say less rather than fail
        from mlflow.tracking.fluent import _get_experiment_id

        where = f"experiment {mlflow.get_experiment(_get_experiment_id()).name!r} ({where})"
    except Exception:
        pass
    return f"Tracing every dbmagic call to MLflow, {where}. `%dbllm trace off` stops."


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise ConfigurationError(_INSTALL) from None
    return mlflow


# -- spans --------------------------------------------------------------------------------------

class CallSpan:
    """The span of one call: opened before the request, closed with its outcome."""

    def __init__(self, prepared: PreparedRequest):
        mlflow = _mlflow()
        self.prepared = prepared
        body = prepared.body
        params = {k: body[k] for k in _PARAMS if k in body}
        self.span = mlflow.start_span_no_context(
            name=prepared.target, span_type=_SPAN_TYPES.get(prepared.kind, "LLM"),
            parent_span=mlflow.get_current_active_span(), inputs=body,
            attributes={"dbmagic.endpoint": prepared.name or prepared.target, "dbmagic.task": prepared.kind,
                        "dbmagic.host": prepared.host, "dbmagic.params": params, "dbmagic.stream": prepared.stream},
        )
        self.children: list[Any] = []

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
        mlflow = _mlflow()
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


def _outputs(completion: Completion, streamed: bool) -> Any:
    # a whole answer's JSON; for a stream the text it made (its raw is only the last event)
    return completion.raw if completion.raw is not None and not streamed else completion.text


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
        with self._lock:
            self._spans[call] = span

    def _span(self, call: Call) -> CallSpan | None:
        with self._lock:
            return self._spans.pop(call, None)

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
        if completion.is_partial:
            span.partial(completion, completion.error)
        else:
            span.ok(completion)

    def on_failed(self, call: Call, error: BaseException) -> None:
        span = self._span(call)
        if span is not None:
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
    mlflow = _mlflow()
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


@contextlib.contextmanager
def batch_span(template: str, rows: int, endpoint: str | None) -> Iterator[Any]:
    """The parent span of a batch (rows run in threads that copy its context)."""
    if not enabled():
        yield None
        return
    mlflow = _mlflow()
    with mlflow.start_span(name="dbmagic.batch", span_type="CHAIN") as span:
        span.set_inputs({"template": template, "rows": rows, "endpoint": endpoint})
        yield span


@contextlib.contextmanager
def prompt_span(uri: str) -> Iterator[None]:
    """With tracing on, a span around a cell that uses a registered prompt, linked to its version."""
    if not enabled():
        yield
        return
    mlflow = _mlflow()
    with mlflow.start_span(name=f"dbmagic {uri}", span_type="CHAIN") as span:
        span.set_inputs({"prompt": uri})
        mlflow.genai.load_prompt(uri)  # loading inside the trace links the prompt version to it
        yield


# -- the prompt registry ------------------------------------------------------------------------------

def load_prompt(uri: str) -> Any:
    """The registered prompt version at ``uri`` (``prompts:/NAME/VERSION`` or ``prompts:/NAME@alias``)."""
    if not uri.startswith("prompts:/") or len(uri) <= len("prompts:/"):
        raise ConfigurationError(f"--prompt {uri!r} is not a prompt URI: use prompts:/NAME/VERSION or prompts:/NAME@alias.")
    mlflow = _mlflow()
    try:
        return mlflow.genai.load_prompt(uri)
    except Exception as exc:
        raise ConfigurationError(
            f"Could not load {uri} from the MLflow Prompt Registry ({first_line(exc)}). "
            "`%dbllm prompts` lists the registered prompts (mlflow.genai.search_prompts())."
        ) from None


def register_prompt(name: str, template: str, commit_message: str | None = None,
                    tags: dict[str, str] | None = None) -> Any:
    """Register ``template`` (``{{ name }}`` variables) as the next version of prompt ``name``;
    returns the `PromptVersion` (its ``uri`` is what ``--prompt`` takes)."""
    mlflow = _mlflow()
    try:
        return mlflow.genai.register_prompt(name=name, template=template, commit_message=commit_message, tags=tags)
    except Exception as exc:
        raise ConfigurationError(f"Could not register prompt {name!r} ({first_line(exc)}).") from None


def list_prompts() -> list[tuple[str, str, str]]:
    """``(name, latest version, its URI)`` of each registered prompt."""
    mlflow = _mlflow()
    rows = []
    try:
        for prompt in mlflow.genai.search_prompts():
            latest = mlflow.genai.load_prompt(f"prompts:/{prompt.name}@latest")
            rows.append((prompt.name, str(latest.version), latest.uri))
    except Exception as exc:
        raise ConfigurationError(f"Could not list the MLflow prompts ({first_line(exc)}).") from None
    return rows
