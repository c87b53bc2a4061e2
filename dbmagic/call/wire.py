"""Building a request, per endpoint kind: the one place that decides every part of a body
(`build_request`: the seed-shaped request a ``transform_input`` sees, the kind's shape, the model
field, stream options, the schema on the wire or as an instruction, tools, Databricks' quirks), and
the body of a call that goes on (`follow_up_request`). Pure functions over dicts: no HTTP here."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError, with_article
from ..prompts.attachments import IMAGE_KINDS, MAX_REQUEST_BYTES, AttachmentError, Parts
from .answers import ToolCall, as_text, content_text
from .kinds import (
    APP,
    APPS_PREFIX,
    CHAT,
    CHAT_AGENT,
    COMPLETIONS,
    CONVERSATIONAL,
    CUSTOM,
    DRIVER_PROXY,
    EMBEDDINGS,
    KINDS,
    MODEL_SERVICE,
    MODEL_SERVICES_PATH,
    PROXY,
    RESPONSES,
    SCHEMA_ON_WIRE,
    SERVING,
    STREAMING_KINDS,
    TOOL_KINDS,
    is_url,
    kind_for,
    known_task,
    target_of,
)

__all__ = ["APP", "APPS_PREFIX", "CHAT", "CHAT_AGENT", "COMPLETIONS", "CONVERSATIONAL", "CUSTOM", "DRIVER_PROXY",
           "EMBEDDINGS", "KINDS", "MODEL_SERVICE", "MODEL_SERVICES_PATH", "PROXY", "RESPONSES", "SCHEMA_ON_WIRE",
           "SERVING", "STREAMING_KINDS", "TOOL_KINDS", "is_url", "kind_for", "known_task", "target_of", "Plan",
           "build_request", "follow_up_request", "chat_prompt_refusal", "not_for_kind", "json_problem", "user_turn",
           "tool_results", "is_messages"]

_CUSTOM_INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")

def is_messages(prompt: Any) -> bool:
    """A prompt that is a list of ``{"role", "content"}`` messages (a registry chat prompt)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


def seed_request(prompt: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The request LangChain's ``Databricks`` class hands to ``transform_input``:
    ``{"prompt": ..., "temperature": ..., "stop": [...], ...}`` (unset parameters left out); a
    list of messages (`is_messages`) goes as ``messages``, which conversational kinds send as they are."""
    request = {"messages": prompt} if is_messages(prompt) else {"prompt": prompt}
    request.update((k, v) for k, v in params.items() if v is not None)
    return request


# the options only conversational kinds can use, and what each does there
_CONVERSATIONAL_ONLY = {"--chat": "keeps a conversation", "--system": "sets the system prompt",
                        "A chat prompt": "is a list of messages, which go"}


def not_for_kind(option: str, kind: str, target: str) -> str | None:
    """The one rule for an option a kind cannot use (``--chat``, ``--system`` on an embeddings or
    completions endpoint): the message that refuses it before anything is sent, or None."""
    if kind in CONVERSATIONAL or option not in _CONVERSATIONAL_ONLY:
        return None
    fix = (f"Drop {option} (or its %config DbLLM default), or use" if option.startswith("--") else
           "Register a text prompt for it, or use")
    return (f"{option} {_CONVERSATIONAL_ONLY[option]} with a chat or agent endpoint, and {target} takes {kind} "
            f"requests. {fix} a chat or agent endpoint.")


_TIERED = frozenset({CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES})  # the pay-per-token APIs' request shapes


def no_service_tier(kind: str, where: str, target: str) -> str | None:
    """Why ``--service-tier`` cannot go to ``target``, or None: a tier is the Foundation Model APIs'
    pay-per-token mode, which an app, a driver-proxy app, an agent or a custom model has not."""
    if kind in _TIERED and where in (SERVING, MODEL_SERVICE):
        return None
    what = f"{target} is {with_article(where)}" if where not in (SERVING, MODEL_SERVICE) else \
        f"{target} takes {kind} requests"
    return (f"--service-tier picks a pay-per-token tier of Databricks' Foundation Model APIs (chat, completions, "
            f"embeddings, responses), and {what}. Drop --service-tier (or its %config DbLLM default).")


def build_body(
    kind: str,
    request: dict[str, Any],
    *,
    system: str | None = None,
    history: Sequence[dict[str, Any]] = (),
    stream: bool = False,
) -> dict[str, Any]:
    """The JSON body for ``kind`` from a (possibly transformed) seed-shaped request.

    A transform may return the endpoint's own shape (``messages`` for chat, ``input`` for a
    ResponsesAgent or embeddings, a ``dataframe_*`` key for a custom model): it is sent as it is.
    """
    body = dict(request)
    if kind in (CHAT, CHAT_AGENT, RESPONSES):
        field = "input" if kind == RESPONSES else "messages"
        turns = body.pop("messages", None) if kind == RESPONSES and "input" not in body else body.pop(field, None)
        prompt = body.pop("prompt", "")
        if turns is None:
            turns = [{"role": "system", "content": system}] if system else []
            turns += [dict(turn) for turn in history]
            turns.append({"role": "user", "content": content_of(kind, prompt)})
        body = {field: turns, **body}
    elif kind == EMBEDDINGS:
        if "input" not in body:
            body = {"input": body.pop("prompt", ""), **body}
        else:
            body.pop("prompt", None)
    elif kind == CUSTOM:
        if not any(k in body for k in _CUSTOM_INPUT_KEYS):
            body = {"dataframe_records": [body]}
    if stream and kind in STREAMING_KINDS:
        body["stream"] = True
    return body


def content_of(kind: str, prompt: Any) -> Any:
    """A user turn's content: the prompt's text, or for a prompt with attachments (`Parts`) the
    kind's content parts, in order: chat's ``text`` and ``image_url`` (a ``data:`` URL; a file as
    OpenAI's ``file`` part), the Responses API's ``input_text``, ``input_image`` and ``input_file``."""
    if not isinstance(prompt, Parts):
        return as_text(prompt)
    responses = kind == RESPONSES
    parts: list[dict[str, Any]] = []
    for item in prompt:
        if isinstance(item, str):
            parts.append({"type": "input_text" if responses else "text", "text": item})
        elif item.is_image:
            parts.append({"type": "input_image", "image_url": item.data_url()} if responses else
                         {"type": "image_url", "image_url": {"url": item.data_url()}})
        else:
            parts.append({"type": "input_file", "filename": item.filename, "file_data": item.data_url()} if responses
                         else {"type": "file", "file": {"filename": item.filename, "file_data": item.data_url()}})
    return parts


def attachments_in(body: Any) -> int:
    """How many images and files a request body's turns hold (chat's ``image_url`` and ``file`` parts,
    the Responses API's ``input_image`` and ``input_file``)."""
    turns = ((body.get("messages") or body.get("input")) if isinstance(body, dict) else None) or []
    return sum(1 for t in turns if isinstance(t, dict) and isinstance(t.get("content"), list)
               for p in t["content"] if isinstance(p, dict) and p.get("type") in _ATTACHED_PARTS)


_ATTACHED_PARTS = ("image_url", "input_image", "file", "input_file")


def attachments_refusal(kind: str, target: str, prompt: Any) -> str | None:
    """Why a prompt with images or documents cannot go to ``kind``, or None: only chat and the
    Responses API take content parts (an agent of those shapes too)."""
    if not isinstance(prompt, Parts) or kind in IMAGE_KINDS:
        return None
    return (f"{target} takes {kind} requests, which carry text only, so the prompt's images and documents cannot go "
            f"with it. Images and documents go to chat endpoints, model services and Responses API endpoints and apps; "
            f"use one of those, send a document as its text (document(x, as_=\"text\")), or turn the parts into "
            f"what the endpoint takes with transform_input.")


def user_turn(kind: str, body: dict[str, Any]) -> str:
    """The text of the last user turn of a body (what ``--chat`` keeps, what a judge reads), each
    picture or file in it as ``[image]`` or ``[file]``, or ``""``."""
    turns = body.get("input" if kind == RESPONSES else "messages")
    if kind in CONVERSATIONAL and isinstance(turns, list) and turns and isinstance(turns[-1], dict):
        content = turns[-1].get("content")
        if isinstance(content, list):  # a picture or a file as a word in its place (a judge, --chat's history)
            content = [{"text": "[image]" if p.get("type") in ("image_url", "input_image") else "[file]"}
                       if isinstance(p, dict) and p.get("type") in _ATTACHED_PARTS else p for p in content]
        return content_text(content)
    return as_text(body.get("prompt", ""))


# -- structured output and tools (`dbmagic.schema`, `dbmagic.tools`) -------------------------------

MAX_ITEM_ID = 64  # the Foundation Model APIs refuse a longer Responses input item id


def with_schema(kind: str, body: dict[str, Any], wire: dict[str, Any]) -> dict[str, Any]:
    """``body`` asking for an answer that fits ``wire`` (``{"name", "schema", "strict"}``): chat's
    ``response_format``, the Responses API's ``text.format``."""
    if kind == CHAT:
        return {**body, "response_format": {"type": "json_schema", "json_schema": wire}}
    if kind == RESPONSES:
        text = body.get("text") if isinstance(body.get("text"), dict) else {}
        return {**body, "text": {**text, "format": {"type": "json_schema", **wire}}}
    return body


def with_tools(kind: str, body: dict[str, Any], definitions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``body`` with tool definitions (``{"name", "description", "parameters"}``), in the kind's shape."""
    if kind == CHAT:
        tools = [{"type": "function", "function": dict(d)} for d in definitions]
    else:
        tools = [{"type": "function", **d} for d in definitions]
    return {**body, "tools": [*(body.get("tools") or ()), *tools]}


def databricks_quirks(kind: str, body: dict[str, Any], model: str) -> dict[str, Any]:
    """What Databricks refuses that the OpenAI API takes, fixed as databricks_openai fixes it
    (``model``: the endpoint and served model names, lower case): ``strict`` taken out of tool
    definitions unless the model is a GPT, an empty ``content`` of an assistant message with tool
    calls filled for Claude, Responses input item ids cut to 64 characters."""
    tools = body.get("tools")
    if isinstance(tools, list) and "gpt" not in model:
        fixed = []
        for tool in tools:
            if isinstance(tool, dict) and isinstance(tool.get("function"), dict) and "strict" in tool["function"]:
                tool = {**tool, "function": {k: v for k, v in tool["function"].items() if k != "strict"}}
            elif isinstance(tool, dict) and kind == RESPONSES and "strict" in tool:
                tool = {k: v for k, v in tool.items() if k != "strict"}
            fixed.append(tool)
        body = {**body, "tools": fixed}
    turns_key = "input" if kind == RESPONSES else "messages"
    turns = body.get(turns_key)
    if isinstance(turns, list):
        fixed_turns = []
        for turn in turns:
            if isinstance(turn, dict):
                if kind == RESPONSES and isinstance(turn.get("id"), str) and len(turn["id"]) > MAX_ITEM_ID:
                    turn = {**turn, "id": turn["id"][:MAX_ITEM_ID]}
                if ("claude" in model and turn.get("role") == "assistant" and turn.get("tool_calls")
                        and not content_text(turn.get("content")).strip()):
                    turn = {**turn, "content": " "}
            fixed_turns.append(turn)
        body = {**body, turns_key: fixed_turns}
    return body


def follow_up(kind: str, body: dict[str, Any], reply: Any, added: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The next request of a call that goes on (a tool's results, an answer asked again): ``body``'s
    turns, then the answer (``reply``, `Parsed.reply`), then ``added`` (tool results, or a user turn
    ``{"role": "user", "content": ...}``). For kinds without turns, a user turn's text goes after
    the prompt, with the answer before it; None when the body holds no prompt to extend (a
    ``transform_input`` that reshaped it)."""
    if kind in CONVERSATIONAL:
        key = "input" if kind == RESPONSES else "messages"
        turns = body.get(key)
        if not isinstance(turns, list):
            return None
        answer = list(reply) if kind == RESPONSES and isinstance(reply, list) else [reply] if reply else []
        return {**body, key: [*turns, *answer, *added]}
    note = "\n\n".join(str(a.get("content") or "") for a in added if a.get("role") == "user")
    said = reply if isinstance(reply, str) else ""
    extended = f"\n\nYour answer was:\n{said}\n\n{note}" if said else f"\n\n{note}"
    if isinstance(body.get("prompt"), str):
        return {**body, "prompt": body["prompt"] + extended}
    records = body.get("dataframe_records")
    if isinstance(records, list) and len(records) == 1 and isinstance(records[0], dict) \
            and isinstance(records[0].get("prompt"), str):
        return {**body, "dataframe_records": [{**records[0], "prompt": records[0]["prompt"] + extended}]}
    return None


def tool_results(kind: str, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """The turns that send the results of ``calls`` back (chat ``tool`` messages, Responses
    ``function_call_output`` items)."""
    if kind == RESPONSES:
        return [{"type": "function_call_output", "call_id": c.id, "output": as_text(c.output)} for c in calls]
    return [{"role": "tool", "tool_call_id": c.id, "content": as_text(c.output)} for c in calls]


def json_problem(value: Any, path: str = "the request") -> str | None:
    """Why JSON cannot carry ``value`` (naming the field: ``messages[0].content is a bytes``), or
    None. NaN and infinities are refused too, as ``json.dumps(allow_nan=False)`` refuses them."""
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if value == value and value not in (float("inf"), float("-inf")) else f"{path} is {value}"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a key {key!r} that is not text"
            found = json_problem(item, f"{path}.{key}" if path != "the request" else key)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = json_problem(item, f"{path}[{i}]")
            if found:
                return found
        return None
    return f"{path} is {with_article(type(value).__name__)}"


def check_sendable(body: Any) -> None:
    """Refuse, before sending, a request JSON cannot carry, naming the field (a transform that adds
    bytes, a set or an object; NaN)."""
    try:
        problem = json_problem(body)
    except RecursionError:
        problem = "the request is nested too deeply"
    if problem:
        raise ConfigurationError(f"Cannot send: {problem}, which JSON cannot carry. Fix the transform_input "
                                 "or the -p value that put it there.")


# -- the one request builder -------------------------------------------------------------------------

def chat_prompt_refusal(kind: str, target: str, *, system: Any = None, history: Any = (),
                        chat: bool = False) -> str | None:
    """The one rule for a chat prompt (a list of messages, from the Prompt Registry): it needs a
    kind that takes turns, and brings every turn itself, so ``--system``, earlier turns and
    ``--chat`` have nothing to add. The message that refuses it, or None."""
    problem = not_for_kind("A chat prompt", kind, target)
    if problem is None and (system or history or chat):
        problem = ("A chat prompt brings its own messages, so --system and --chat have nothing to add: drop them "
                   "(or their %config DbLLM defaults), or put the text in the prompt.")
    return problem


@dataclass(frozen=True)
class Plan:
    """What decides a request's body, besides its prompt: the target (its ``kind``, where it is,
    its ``name`` as ``-e`` gave it, its ``target`` label, whether it is an external model, its
    ``model`` names in lower case) and the call's options (``params``: temperature, max_tokens,
    stop, n and the extra fields; ``system``, ``history``, ``stream``, a `dbmagic.schema.Schema`,
    a `dbmagic.tools.Toolbox`, the user's ``transform`` and how to apply it)."""

    kind: str
    where: str
    name: str
    target: str
    params: dict[str, Any]
    external: bool = False
    model: str = ""
    system: str | None = None
    history: Sequence[dict[str, Any]] = ()
    stream: bool = False
    schema: Any = None
    tools: Any = None
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = field(default=None, compare=False)


def build_request(plan: Plan, prompt: Any) -> dict[str, Any]:
    """The JSON body of one request for ``prompt``, every part decided here, in this order:

    1. a chat prompt (a list of messages) goes as its messages, where the kind takes turns
       (`chat_prompt_refusal`); a kind that cannot take a schema on the wire reads it after the
       prompt as an instruction;
    2. the seed-shaped request LangChain's ``Databricks`` class hands to ``transform_input``
       (``{"prompt", "temperature", "stop", ...}``), then that transform;
    3. the kind's own shape (`build_body`: messages with the system prompt and earlier turns, input,
       dataframe_records; ``stream``);
    4. the model field: a model service and an app named ``apps/NAME`` are named in it (what
       databricks_openai sends);
    5. streamed usage: external models and model services send it only when asked (OpenAI's
       ``stream_options.include_usage``);
    6. the schema on the wire (chat's ``response_format``, the Responses API's ``text.format``) and
       the tool definitions, then Databricks' quirks (`databricks_quirks`);
    7. a last check that JSON can carry it (`check_sendable`).
    """
    kind = plan.kind
    if is_messages(prompt):
        problem = chat_prompt_refusal(kind, plan.target, system=plan.system, history=plan.history)
        if problem:
            raise ConfigurationError(problem)
        prompt = [{"role": str(m["role"]), "content": m.get("content")} for m in prompt]
    elif plan.schema is not None and kind not in SCHEMA_ON_WIRE:
        prompt = (Parts([*prompt, f"\n\n{plan.schema.instruction()}"]) if isinstance(prompt, Parts)
                  else f"{as_text(prompt)}\n\n{plan.schema.instruction()}")
    request = seed_request(prompt, plan.params)
    if plan.transform is not None:
        request = plan.transform(request)
    problem = attachments_refusal(kind, plan.target, request.get("prompt"))
    if problem:
        raise ConfigurationError(problem)
    body = build_body(kind, request, system=plan.system, history=plan.history, stream=plan.stream)
    if plan.where == MODEL_SERVICE or (plan.where == APP and not is_url(plan.name)):
        body = {"model": plan.name, **body}
    streams = plan.stream and kind in STREAMING_KINDS
    if streams and kind in (CHAT, COMPLETIONS) and (plan.where == MODEL_SERVICE or plan.external) \
            and "stream_options" not in body:
        body["stream_options"] = {"include_usage": True}
    if plan.schema is not None and kind in SCHEMA_ON_WIRE:
        body = with_schema(kind, body, plan.schema.wire())
    if plan.tools is not None:
        body = with_tools(kind, body, plan.tools.definitions())
    if "tools" in body:
        body = databricks_quirks(kind, body, plan.model)
    check_sendable(body)
    if isinstance(prompt, Parts):
        check_size(body, plan.target)
    return body


def check_size(body: dict[str, Any], target: str) -> None:
    """A request with attachments fits Databricks' 4 MB request limit, or is refused before it is sent."""
    size = len(json.dumps(body, ensure_ascii=False).encode())
    if size > MAX_REQUEST_BYTES:
        raise AttachmentError(
            f"The request to {target} would be {size / 1e6:.1f} MB, over Databricks' 4 MB request limit. Send fewer "
            f"or smaller images (image(x, max_side=1024)), or fewer pages (document(x, pages=\"1-3\")).")


def follow_up_request(kind: str, body: dict[str, Any], reply: Any, added: Sequence[dict[str, Any]],
                      model: str) -> dict[str, Any] | None:
    """The body of the next round trip of a call that goes on (`follow_up`: the answer, then tool
    results or the turn that asks again), with Databricks' quirks and the same last check; None
    when the body holds no prompt to extend."""
    following = follow_up(kind, body, reply, added)
    if following is None:
        return None
    following = databricks_quirks(kind, following, model)
    check_sendable(following)
    return following
