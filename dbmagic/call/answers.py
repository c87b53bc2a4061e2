"""Reading an answer, per endpoint kind: a whole answer (`parse_response`), a streamed one event
by event (`SSEDecoder`, `ChunkReader`), its usage in any shape (`Usage`) and the tool calls it asks
for (`ToolCall`). Pure functions over dicts and bytes: no HTTP here."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from .kinds import CHAT, CHAT_AGENT, COMPLETIONS, CUSTOM, EMBEDDINGS, PROXY, RESPONSES


class WireError(ValueError):
    """An answer whose shape does not fit its endpoint kind (the client turns it into BadResponse)."""


def chat_tool_calls(calls: Any) -> list[ToolCall]:
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
        return [content_text((c.get("message") or {}).get("content")) for c in found]
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
                text = content_text(message.get("content"))
                calls = chat_tool_calls(message.get("tool_calls"))
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
            text = content_text(answers[-1].get("content"))
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
            return chat_tool_calls(self.chat_tool_calls())
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
                    text = content_text(delta.get("content"))
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
            return content_text(delta.get("content")), usage, None
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


def content_text(content: Any) -> str:
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
