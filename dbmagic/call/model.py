"""What one call is, as data: its options (`CallOptions`, checked as ``%%dbllm`` checks them), the
request it sends (`PreparedRequest`), the target it goes to (`EndpointInfo`), and how it ended
(`Completion`, with the `Step` of each earlier round trip of a call that went on)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

from .. import settings
from . import answers, kinds
from .answers import Usage

__all__ = ["PARTIAL", "CallOptions", "refuse_unknown_options", "checked_options", "with_call_options", "EndpointInfo",
           "PreparedRequest", "Completion", "Step", "brief", "Transform"]

Transform = Callable[..., Any]

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
    - ``service_tier``: ``"priority"`` for Databricks' priority pay-per-token mode (a higher price
      per token), on pay-per-token chat, completions, embeddings and responses endpoints;
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
    service_tier: str | None
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


def checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every `CallOptions` key, with the given values checked (unknown keys were refused before)."""
    checked: dict[str, Any] = dict.fromkeys(CallOptions.__annotations__)
    for name, value in options.items():
        if name in settings.CLIENT_OPTIONS and value is not None:
            typed = settings.BY_NAME[name].type
            numeric_text = isinstance(value, str) and typed in (int, float)  # port="7777" from Python
            value = settings.from_text(name, value) if numeric_text else settings.coerce(name, value)
        checked[name] = value
    return checked


def with_call_options(method: Callable[..., Any]) -> Callable[..., Any]:
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
        """The request shape dbmagic uses for it (see `dbmagic.call.wire`): chat, completions, embeddings,
        responses, chat_agent or custom."""
        return kinds.kind_for(self.task)

    @property
    def where(self) -> str:
        """serving endpoint, model service or app (`dbmagic.call.kinds.target_of` of its name)."""
        return kinds.target_of(self.name)[0]

    @property
    def described(self) -> str:
        """What it is, in a word or two: its task for a serving endpoint, else what it is."""
        if self.where == kinds.SERVING:
            return self.task or "custom model"
        return "app (Responses API)" if self.where == kinds.APP else self.where

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
    where: str = kinds.SERVING  # serving endpoint, model service, app or driver-proxy app (`kinds.target_of`)
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
            "json": _shown(self.body),
        }


def _shown(value: Any) -> Any:
    """A body as a dry run shows it: each image or file's ``data:`` URL as what it holds
    (`dbmagic.prompts.attachments.described_url`), not thousands of base64 characters."""
    if isinstance(value, dict):
        return {k: _shown(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > 256:
        from ..prompts.attachments import described_url

        return described_url(value)
    return value


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
    (`dbmagic.call.answers.ToolCall`: id, name, arguments); ``steps`` the earlier round trips of a call
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
    where: str = kinds.SERVING  # serving endpoint, model service, app or driver-proxy app
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
        return "; ".join(f"ran {c.describe()} → " + (f"error: {c.error}" if c.error else brief(c.output))
                         for c in self.tool_calls)


def brief(value: Any, limit: int = 120) -> str:
    text = answers.as_text(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 1] + "…"
