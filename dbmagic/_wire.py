"""Request bodies and response parsing for each endpoint kind, and the SSE decoder.

Kinds: ``chat`` (``llm/v1/chat``), ``completions`` (``llm/v1/completions``), ``embeddings``
(``llm/v1/embeddings``), ``custom`` (a custom MLflow model) and ``proxy`` (a cluster driver-proxy
app). Pure functions over dicts and bytes: no HTTP here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

CHAT, COMPLETIONS, EMBEDDINGS, CUSTOM, PROXY = "chat", "completions", "embeddings", "custom", "proxy"
KINDS = (CHAT, COMPLETIONS, EMBEDDINGS, CUSTOM, PROXY)
STREAMING_KINDS = frozenset({CHAT, COMPLETIONS})
_CUSTOM_INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
_TASKS = {"llm/v1/chat": CHAT, "llm/v1/completions": COMPLETIONS, "llm/v1/embeddings": EMBEDDINGS}


class WireError(ValueError):
    """An answer whose shape does not fit its endpoint kind (the client turns it into BadResponse)."""


def kind_for(task: str | None) -> str:
    """The request shape for an endpoint ``task`` (``llm/v1/chat``, ``chat``, ``agent/v2/chat`` ...)."""
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


def seed_request(prompt: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The request LangChain's ``Databricks`` class hands to ``transform_input``:
    ``{"prompt": ..., "temperature": ..., "stop": [...], ...}`` (unset parameters left out)."""
    request = {"prompt": prompt}
    request.update((k, v) for k, v in params.items() if v is not None)
    return request


def build_body(
    kind: str,
    request: dict[str, Any],
    *,
    system: str | None = None,
    history: Sequence[dict[str, Any]] = (),
    stream: bool = False,
) -> dict[str, Any]:
    """The JSON body for ``kind`` from a (possibly transformed) seed-shaped request."""
    body = dict(request)
    if kind == CHAT:
        if "messages" not in body:
            messages: list[dict[str, Any]] = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.extend(history)
            messages.append({"role": "user", "content": _as_text(body.pop("prompt", ""))})
            body = {"messages": messages, **body}
        else:
            body.pop("prompt", None)
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


@dataclass
class Parsed:
    """What one answer means: the natural value, its display text, usage and model."""

    value: Any
    text: str
    usage: dict[str, Any] = field(default_factory=dict)
    served_model: str | None = None
    finish_reason: str | None = None


def parse_response(kind: str, data: Any) -> Parsed:
    """Read a whole (non-streamed) answer of ``kind``."""
    try:
        if kind in (CHAT, COMPLETIONS):
            choice = data["choices"][0]
            if kind == CHAT:
                text = _content_text(choice["message"].get("content"))
            else:
                text = choice.get("text") or ""
            return Parsed(text, text, data.get("usage") or {}, data.get("model"), choice.get("finish_reason"))
        if kind == EMBEDDINGS:
            vectors = [item["embedding"] for item in sorted(data["data"], key=lambda d: d.get("index", 0))]
            dim = len(vectors[0]) if vectors else 0
            text = f"{len(vectors)} embedding{'s' if len(vectors) != 1 else ''} of dimension {dim}"
            return Parsed(vectors, text, data.get("usage") or {}, data.get("model"))
        if kind == CUSTOM:
            predictions = data["predictions"] if isinstance(data, dict) else data
            value = predictions[0] if isinstance(predictions, list) and predictions else predictions
            return Parsed(value, _as_text(value))
        if kind == PROXY:
            return Parsed(data, _as_text(data))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise WireError(f"a {kind} answer without the expected fields ({exc.__class__.__name__}: {exc})") from exc
    raise WireError(f"unknown endpoint kind {kind!r}")


def chunk_delta(data: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    """``(text, usage, finish_reason)`` of one streamed chunk: chat deltas, completion text, or an
    agent's ``{"delta": {...}}`` without ``choices``."""
    usage = data.get("usage") or None
    choices = data.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = _content_text(delta.get("content"))
        else:
            text = choice.get("text") or ""
        return text, usage, choice.get("finish_reason")
    delta = data.get("delta")
    if isinstance(delta, dict):
        return _content_text(delta.get("content")), usage, None
    return "", usage, None


class SSEDecoder:
    """Incremental ``text/event-stream`` decoder: feed bytes as they arrive, get ``data`` payloads.

    Handles lines split across reads, CRLF, comments (``:``), other fields, and multi-line data.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self.truncated = False

    def feed(self, chunk: bytes) -> Iterator[str]:
        self._buffer += chunk
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                return
            line = self._buffer[:newline].rstrip(b"\r").decode("utf-8", "replace")
            self._buffer = self._buffer[newline + 1 :]
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

    def close(self) -> list[str]:
        """The event left pending when the connection closed without its blank line.

        A partial last line (no newline) is dropped: it is a cut, and ``truncated`` says so.
        """
        self.truncated = bool(self._buffer.strip())
        self._buffer = b""
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
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
