"""Request bodies and response parsing for each endpoint kind, and the SSE decoder.

Kinds: ``chat`` (``llm/v1/chat``, and the older ``agent/v1/chat`` agents), ``completions``
(``llm/v1/completions``), ``embeddings`` (``llm/v1/embeddings``), ``responses`` (ResponsesAgent,
``agent/v1/responses``), ``chat_agent`` (ChatAgent, ``agent/v2/chat``), ``custom`` (a custom MLflow
model) and ``proxy`` (a cluster driver-proxy app). Pure functions over dicts and bytes: no HTTP here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

CHAT, COMPLETIONS, EMBEDDINGS, CUSTOM, PROXY = "chat", "completions", "embeddings", "custom", "proxy"
RESPONSES, CHAT_AGENT = "responses", "chat_agent"
KINDS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, CHAT_AGENT, CUSTOM, PROXY)
STREAMING_KINDS = frozenset({CHAT, COMPLETIONS, RESPONSES, CHAT_AGENT})
# kinds that take a system prompt and earlier turns, so --system and --chat apply
CONVERSATIONAL = frozenset({CHAT, RESPONSES, CHAT_AGENT})
_CUSTOM_INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_TASKS = {"llm/v1/chat": CHAT, "llm/v1/completions": COMPLETIONS, "llm/v1/embeddings": EMBEDDINGS,
          "agent/v1/responses": RESPONSES, "agent/v2/chat": CHAT_AGENT, "agent/v1/chat": CHAT}


# where a call goes: the one rule that reads a target's name (`target_of`)
SERVING, MODEL_SERVICE, APP, DRIVER_PROXY = "serving endpoint", "model service", "app", "driver-proxy app"
APPS_PREFIX = "apps/"
MODEL_SERVICES_PATH = "/ai-gateway/mlflow/v1"


def target_of(name: str) -> tuple[str, str]:
    """What a name given as ``-e NAME`` means, and the bare name: ``apps/NAME`` is an agent on
    Databricks Apps (``("app", "NAME")``), and so is an app's own URL (``https://...``, taken only
    on the Databricks Apps domains); a three-part Unity Catalog name ``catalog.schema.name`` is a
    Unity AI Gateway model service; anything else is a Model Serving endpoint (their names have
    no dots)."""
    if is_url(name):
        return APP, name
    if name.startswith(APPS_PREFIX):
        return APP, name[len(APPS_PREFIX):]
    if name.count(".") == 2 and all(name.split(".")):
        return MODEL_SERVICE, name
    return SERVING, name


def is_url(name: str) -> bool:
    """An app given by its URL rather than by name."""
    return name.startswith(("https://", "http://"))


class WireError(ValueError):
    """An answer whose shape does not fit its endpoint kind (the client turns it into BadResponse)."""


def kind_for(task: str | None) -> str:
    """The request shape for an endpoint ``task`` (``llm/v1/chat``, ``chat``, ``agent/v1/responses`` ...)."""
    if not task:
        return CUSTOM
    if task in KINDS:
        return task
    if task in _TASKS:
        return _TASKS[task]
    if task.startswith("agent/") and "chat" in task:
        return CHAT
    return CUSTOM


def known_task(task: str) -> bool:
    """Whether ``task`` names a request shape dbmagic knows (for a user's explicit override)."""
    return task in KINDS or task in _TASKS or task.startswith("agent/")


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


def with_article(noun: str) -> str:
    """``a list``, ``an object``."""
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


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
            turns.append({"role": "user", "content": as_text(prompt)})
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


def user_turn(kind: str, body: dict[str, Any]) -> str:
    """The text of the last user turn of a body (what ``--chat`` keeps), or ``""``."""
    turns = body.get("input" if kind == RESPONSES else "messages")
    if kind in CONVERSATIONAL and isinstance(turns, list) and turns and isinstance(turns[-1], dict):
        return _content_text(turns[-1].get("content"))
    return as_text(body.get("prompt", ""))


# -- structured output and tools (`dbmagic.schema`, `dbmagic.tools`) -------------------------------

# the kinds that take a schema on the wire; the others get it as an instruction after the prompt
SCHEMA_ON_WIRE = frozenset({CHAT, RESPONSES})
# the kinds that take tool definitions and answer with tool calls
TOOL_KINDS = frozenset({CHAT, RESPONSES})
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
                        and not _content_text(turn.get("content")).strip()):
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


def _chat_tool_calls(calls: Any) -> list[ToolCall]:
    out = []
    for call in calls if isinstance(calls, list) else ():
        if isinstance(call, dict):
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            out.append(ToolCall.read(call.get("id"), function.get("name"), function.get("arguments")))
    return out


def responses_tool_calls(output: Any) -> list[ToolCall]:
    """The ``function_call`` items of a Responses output; a call whose ``function_call_output`` is
    in the output too (an agent that ran its own tool) carries that output, ``ran`` True."""
    items = [i for i in output if isinstance(i, dict)] if isinstance(output, list) else []
    outputs = {i.get("call_id"): i.get("output") for i in items if i.get("type") == "function_call_output"}
    calls = []
    for item in items:
        if item.get("type") == "function_call":
            call = ToolCall.read(item.get("call_id") or item.get("id"), item.get("name"), item.get("arguments"))
            if item.get("call_id") in outputs:
                call.output, call.ran = outputs[item.get("call_id")], True
            calls.append(call)
    return calls


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer (or a sum of answers), whatever shape the endpoint reported them
    in: ``input`` (prompt), ``output`` (completion), ``total``, and, when the endpoint says,
    ``cache_read`` (prompt tokens served from a cache) and ``cache_creation`` (written to one).
    A count the endpoint did not report is None; ``bool(usage)`` is False when none was reported.

    >>> Usage.from_wire({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11})
    Usage(input=5, output=6, total=11)
    """

    input: int | None = None
    output: int | None = None
    total: int | None = None
    cache_read: int | None = None
    cache_creation: int | None = None

    @classmethod
    def from_wire(cls, data: Any) -> Usage:
        """Read a ``usage`` object of any shape Databricks endpoints send: chat and completions
        (``prompt_tokens``/``completion_tokens``, ``prompt_tokens_details.cached_tokens``), the
        Responses API and agents (``input_tokens``/``output_tokens``,
        ``input_tokens_details.cached_tokens``) and Anthropic-style external models
        (``cache_read_input_tokens``, ``cache_creation_input_tokens``)."""
        if not isinstance(data, dict):
            return cls()
        details = data.get("prompt_tokens_details") or data.get("input_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        found = cls(
            input=_count(data.get("prompt_tokens", data.get("input_tokens"))),
            output=_count(data.get("completion_tokens", data.get("output_tokens"))),
            total=_count(data.get("total_tokens")),
            cache_read=_count(data.get("cache_read_input_tokens", cached)),
            cache_creation=_count(data.get("cache_creation_input_tokens")),
        )
        if found.total is None and found.input is not None and found.output is not None:
            return replace(found, total=found.input + found.output)
        return found

    def __bool__(self) -> bool:
        return any(v is not None for v in self.as_dict().values())

    def __add__(self, other: Usage) -> Usage:
        def plus(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else a + b

        return Usage(*(plus(getattr(self, f), getattr(other, f)) for f in _USAGE_FIELDS))

    def as_dict(self) -> dict[str, int]:
        """The reported counts, by name (``{"input": 5, "output": 6, "total": 11}``)."""
        return {f: getattr(self, f) for f in _USAGE_FIELDS if getattr(self, f) is not None}

    def __repr__(self) -> str:
        return "Usage(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"

    def describe(self) -> str:
        """``5 tokens in, 6 out`` (``?`` for a count not reported; ``""`` when none was), with the cache."""
        if not self:
            return ""
        text = f"{_shown(self.input)} tokens in, {_shown(self.output)} out"
        if self.cache_read:
            text += f" ({self.cache_read} from cache)"
        return text


_USAGE_FIELDS = ("input", "output", "total", "cache_read", "cache_creation")


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _shown(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


@dataclass
class ToolCall:
    """A call of a tool the model asked for: ``id``, ``name`` and ``arguments`` (parsed from the JSON
    the model wrote; None when it is not a JSON object, and ``problem`` says why). Once run (``--run-tools``),
    ``output`` is what the function returned (as sent back) and ``error`` what it raised, if it did.
    For an agent that runs its own tools, a call it already ran has its ``output`` from the answer."""

    id: str
    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str = ""
    problem: str | None = None
    output: Any = None
    error: str | None = None
    ran: bool = False

    @classmethod
    def read(cls, call_id: Any, name: Any, arguments: Any) -> ToolCall:
        raw = arguments if isinstance(arguments, str) else json.dumps(arguments) if arguments is not None else ""
        parsed: Any
        problem = None
        try:
            parsed = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            parsed, problem = None, f"the arguments are not JSON ({exc})"
        except RecursionError:
            parsed, problem = None, "the arguments are JSON nested too deeply"
        if parsed is not None and not isinstance(parsed, dict):
            parsed, problem = None, "the arguments are not a JSON object"
        return cls(str(call_id or ""), str(name or ""), parsed, raw, problem)

    def describe(self) -> str:
        """``name(city='Paris')``, as the cell shows it."""
        if self.arguments is None:
            return f"{self.name}({self.raw_arguments[:80]})"
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in self.arguments.items()) + ")"


@dataclass
class Parsed:
    """What one answer means: the natural value, its display text, usage and model; the tool calls
    it asks for, and ``reply``: the answer as the next turn's input takes it back (the assistant
    message of a chat answer, the output items of a Responses answer)."""

    value: Any
    text: str
    usage: Usage = field(default_factory=Usage)
    served_model: str | None = None
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    reply: Any = None
    choices: list[str] = field(default_factory=list)  # every answer's text, when ``n`` asked for several


def _choice_texts(kind: str, choices: Any) -> list[str]:
    """The text of each choice of a chat or completions answer, in ``index`` order."""
    found = [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    found.sort(key=lambda c: c.get("index") if isinstance(c.get("index"), int) else 0)
    if kind == CHAT:
        return [_content_text((c.get("message") or {}).get("content")) for c in found]
    return [str(c.get("text") or "") for c in found]


def parse_response(kind: str, data: Any) -> Parsed:
    """Read a whole (non-streamed) answer of ``kind``."""
    try:
        if kind in (CHAT, COMPLETIONS):
            choice = data["choices"][0]
            calls: list[ToolCall] = []
            reply = None
            if kind == CHAT:
                message = choice["message"]
                text = _content_text(message.get("content"))
                calls = _chat_tool_calls(message.get("tool_calls"))
                reply = {"role": "assistant", "content": message.get("content"),
                         **({"tool_calls": message["tool_calls"]} if calls else {})}
            else:
                text = choice.get("text") or ""
            texts = _choice_texts(kind, data["choices"])
            return Parsed(text, text, Usage.from_wire(data.get("usage")), data.get("model"), choice.get("finish_reason"),
                          calls, reply, texts if len(texts) > 1 else [])
        if kind == RESPONSES:
            output = data["output"]
            text = "".join(_output_text(item) for item in output)
            return Parsed(text, text, Usage.from_wire(data.get("usage")), data.get("model"), data.get("status") or "stop",
                          responses_tool_calls(output), [i for i in output if isinstance(i, dict)])
        if kind == CHAT_AGENT:
            answers = [m for m in data["messages"] if m.get("role") == "assistant"]
            if not answers:
                raise KeyError("no assistant message")
            text = _content_text(answers[-1].get("content"))
            return Parsed(text, text, Usage.from_wire(data.get("usage")), data.get("model"), "stop")
        if kind == EMBEDDINGS:
            vectors = [item["embedding"] for item in sorted(data["data"], key=lambda d: d.get("index", 0))]
            dim = len(vectors[0]) if vectors else 0
            text = f"{len(vectors)} embedding{'s' if len(vectors) != 1 else ''} of dimension {dim}"
            return Parsed(vectors, text, Usage.from_wire(data.get("usage")), data.get("model"))
        if kind == CUSTOM:
            if isinstance(data, dict):
                predictions = data["predictions"] if "predictions" in data else data["outputs"]
            else:
                predictions = data
            value = predictions[0] if isinstance(predictions, list) and predictions else predictions
            return Parsed(value, as_text(value))
        if kind == PROXY:
            return Parsed(data, as_text(data))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise WireError(f"a {kind} answer without the expected fields ({exc.__class__.__name__}: {exc})") from exc
    except RecursionError:
        raise WireError(f"a {kind} answer nested too deeply to read") from None
    raise WireError(f"unknown endpoint kind {kind!r}")


class ChunkReader:
    """Reads streamed events one by one: ``read(event) -> (text, Usage or None, finish_reason)``.

    Chat and completion chunks (``choices[0].delta`` / ``.text``), ChatAgent chunks
    (``{"delta": {...}}``), and ResponsesAgent events: ``response.output_text.delta`` carries a
    string ``delta``; ``response.output_item.done`` repeats the whole item, whose text is shown only
    when no delta of that item came (so it is never shown twice).
    """

    def __init__(self) -> None:
        self._items_with_deltas: set[Any] = set()
        self._others: dict[int, list[str]] = {}  # the text of each choice past the first (n > 1), by index
        self._chat_calls: dict[int, dict[str, Any]] = {}  # index -> {"id", "type", "function": {"name", "arguments"}}
        self._items: list[dict[str, Any]] = []  # Responses output items, whole (output_item.done)
        self._completed: list[Any] | None = None  # response.completed's output

    def choices(self, first: str) -> list[str]:
        """Every answer's text when ``n`` asked for several (``first``: the one that streamed), else []."""
        if not self._others:
            return []
        return [first, *("".join(self._others.get(i, ())) for i in range(1, max(self._others) + 1))]

    def tool_calls(self) -> list[ToolCall]:
        """The tool calls the streamed answer asked for (chat deltas joined; Responses items)."""
        if self._chat_calls:
            return _chat_tool_calls(self.chat_tool_calls())
        return responses_tool_calls(self._output())

    def chat_tool_calls(self) -> list[dict[str, Any]]:
        return [self._chat_calls[i] for i in sorted(self._chat_calls)]

    def reply(self, kind: str, text: str) -> Any:
        """The streamed answer as the next turn takes it back (see `Parsed.reply`)."""
        if kind == RESPONSES:
            return self._output() or [{"type": "message", "role": "assistant",
                                        "content": [{"type": "output_text", "text": text}]}]
        calls = self.chat_tool_calls()
        return {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}

    def _output(self) -> list[dict[str, Any]]:
        if self._items:
            return list(self._items)
        return [i for i in self._completed or () if isinstance(i, dict)]

    def read(self, data: dict[str, Any]) -> tuple[str, Usage | None, str | None]:
        kind = data.get("type")
        carrier = data.get("response") if kind == "response.completed" and isinstance(data.get("response"), dict) else data
        usage = Usage.from_wire(carrier["usage"]) if isinstance(carrier.get("usage"), dict) else None
        if isinstance(kind, str) and kind.startswith("response."):
            return self._responses_event(kind, data), usage, "stop" if kind == "response.completed" else None
        choices = data.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            shown, finish = "", None
            for choice in (c for c in choices if isinstance(c, dict)):
                index = choice.get("index") if isinstance(choice.get("index"), int) else 0
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    text = _content_text(delta.get("content"))
                    if index == 0 and isinstance(delta.get("tool_calls"), list):
                        self._tool_call_deltas(delta["tool_calls"])
                else:
                    text = choice.get("text") or ""
                text = text if isinstance(text, str) else ""
                if index == 0:  # the first answer streams; the others (n > 1) are kept for the end
                    shown, finish = text, choice.get("finish_reason")
                else:
                    self._others.setdefault(index, []).append(text)
            return shown, usage, finish
        delta = data.get("delta")
        if isinstance(delta, dict):
            return _content_text(delta.get("content")), usage, None
        return "", usage, None

    def _tool_call_deltas(self, deltas: list[Any]) -> None:
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            index = delta.get("index") if isinstance(delta.get("index"), int) else position
            call = self._chat_calls.setdefault(index, {"id": "", "type": "function",
                                                       "function": {"name": "", "arguments": ""}})
            if delta.get("id"):
                call["id"] = str(delta["id"])
            function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
            if function.get("name"):
                call["function"]["name"] = str(function["name"])
            if isinstance(function.get("arguments"), str):
                call["function"]["arguments"] += function["arguments"]

    def _responses_event(self, kind: str, data: dict[str, Any]) -> str:
        if kind == "response.completed" and isinstance(data.get("response"), dict):
            output = data["response"].get("output")
            self._completed = output if isinstance(output, list) else None
        if kind == "response.output_item.done" and isinstance(data.get("item"), dict):
            self._items.append(data["item"])
        if kind == "response.output_text.delta":
            self._items_with_deltas.add(data.get("item_id"))
            delta = data.get("delta")
            return delta if isinstance(delta, str) else ""
        if kind == "response.output_item.done" and isinstance(data.get("item"), dict):
            item = data["item"]
            if item.get("id") not in self._items_with_deltas and None not in self._items_with_deltas:
                return _output_text(item)
        return ""


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


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder: feed bytes as they arrive, get ``data`` payloads.

    Handles lines split across reads, CRLF, comments (``:``), other fields, and multi-line data.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no newline (a long line is scanned once)
        self._data: list[str] = []
        self.truncated = False

    def feed(self, chunk: bytes) -> Iterator[str]:
        self._buffer += chunk
        start = 0
        try:
            while True:
                newline = self._buffer.find(b"\n", max(start, self._scanned))
                if newline < 0:
                    self._scanned = len(self._buffer)
                    return
                line = bytes(self._buffer[start:newline]).rstrip(b"\r").decode("utf-8", "replace")
                start = newline + 1
                if not line:
                    if self._data:
                        yield "\n".join(self._data)
                        self._data = []
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
        finally:  # what was read is dropped once, not line by line
            if start:
                del self._buffer[:start]
                self._scanned = max(self._scanned - start, 0)

    def close(self) -> list[str]:
        """The event left pending when the connection closed without its blank line.

        A partial last line (no newline) is dropped: it is a cut, and ``truncated`` says so.
        """
        self.truncated = bool(self._buffer.strip())
        self._buffer = bytearray()
        self._scanned = 0
        events = ["\n".join(self._data)] if self._data else []
        self._data = []
        return events


def _content_text(content: Any) -> str:
    """Chat content is a string, or a list of parts (``{"type": "text", "text": ...}``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _output_text(item: Any) -> str:
    """The text of one ResponsesAgent output item: the ``output_text`` parts of an assistant
    message (tool calls and their outputs carry none)."""
    if not isinstance(item, dict) or item.get("type", "message") != "message" or item.get("role", "assistant") != "assistant":
        return ""
    content = item.get("content")
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict) and p.get("type") == "output_text")


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
