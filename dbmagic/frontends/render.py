"""How an answer looks in the notebook: formats, the live (streamed) output, output metadata.

Formats: ``markdown`` (default), ``text``, ``code`` (a highlighted block), ``json`` (parsed, code
fences stripped) and ``html``. Every output carries ``{"dbmagic": {endpoint, served_model, usage,
latency_ms, request_id}}`` in its metadata. Terminal IPython gets plain text.
"""

from __future__ import annotations

import html
import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ..errors import FormatError
from ..settings import FORMATS

__all__ = ["FORMATS", "bundle", "answer_bundle", "output_metadata", "extract_code", "parse_json", "LiveOutput"]

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> tuple[str, str]:
    """``(code, language)``: the first fenced block of ``text``, or all of it."""
    match = _FENCE.search(text)
    if match:
        return match.group(2).rstrip("\n"), match.group(1)
    return text.strip("\n"), ""


def parse_json(text: str) -> Any:
    """Parse an answer as JSON, stripping a code fence around it."""
    candidate = extract_code(text)[0] if "```" in text else text
    try:
        return json.loads(candidate)
    except RecursionError:
        raise FormatError("The answer is JSON nested too deeply to show. It is kept in _dbllm.text; show it with "
                          "-f text.") from None
    except ValueError as exc:
        raise FormatError(
            f"The answer is not valid JSON ({exc}). It is kept in _dbllm.text; "
            "show it with -f text, or ask the model for JSON only."
        ) from None


def bundle(value: Any, fmt: str, *, rich: bool = True) -> dict[str, Any]:
    """The MIME bundle for ``value`` in format ``fmt`` (a lone surrogate shows as U+FFFD: the
    front end could not encode it)."""
    if isinstance(value, str):
        value = _encodable(value)
    if not isinstance(value, str):
        try:
            pretty = json.dumps(value, indent=2, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            return {"text/plain": repr(value)[:100_000]}
        # a table (or JSON as code) in Markdown, which every front end renders as such: JupyterLab ranks
        # application/json above Markdown and would show a collapsible tree (the value is in _dbllm)
        return {"text/markdown": _table(value)[1], "text/plain": pretty} if rich else {"text/plain": pretty}
    if not rich or fmt == "text":
        return {"text/plain": value}
    if fmt == "markdown":
        return {"text/markdown": value, "text/plain": value}
    if fmt == "code":
        code, language = extract_code(value)
        return {"text/markdown": f"```{language}\n{code}\n```", "text/plain": code}
    if fmt == "json":
        data = parse_json(value)
        pretty = json.dumps(data, indent=2, ensure_ascii=False)
        return {"text/markdown": f"```json\n{pretty}\n```", "text/plain": pretty}
    if fmt == "html":
        return {"text/html": value, "text/plain": value}
    raise FormatError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}.")


def answer_bundle(completion: Any, fmt: str, *, rich: bool = True,
                  stopped_by: str | None = None) -> dict[str, Any] | None:
    """How a whole answer is shown when it is more than its value in ``fmt``: a schema's value as a
    small table, the tool calls it asks for (a table), the earlier steps of a call that went on (a
    list). None for a plain answer (`bundle` shows it). ``stopped_by``: the limit that left the tool
    calls it asks for not run (``--max-steps 5``)."""
    value = completion.value
    choices = getattr(completion, "choices", None) or []
    if not (completion.steps or completion.tool_calls or (completion.schema is not None and _is_data(value))
            or len(choices) > 1):
        return None
    data = _data(value)
    if data is not None:
        text, md = _table(data)
        parts_md, parts_text = [md], [text]
    elif completion.tool_calls and not completion.text:
        parts_md, parts_text = [], []
    else:
        try:
            shown = bundle(value, fmt, rich=rich)
        except FormatError:  # -f json of an answer that is not JSON, after steps: its text, and the steps
            shown = bundle(value, "text", rich=rich)
        parts_md = [shown.get("text/markdown") or f"```\n{shown['text/plain']}\n```"]
        parts_text = [shown["text/plain"]]
    pending = completion.pending_tool_calls
    if pending:
        rows = [[c.name, c.raw_arguments if c.arguments is None else json.dumps(c.arguments, ensure_ascii=False), c.id]
                for c in pending]
        text, md = _grid(["tool", "arguments", "id"], rows)
        said = "The model asks for " + ("this tool call" if len(pending) == 1 else f"{len(pending)} tool calls")
        if stopped_by is not None:
            said += f" (not run: the call stopped at {stopped_by})"
        parts_md.append(f"**{said}:**\n\n{md}")
        parts_text.append(f"{said}:\n{text}")
    if len(choices) > 1:  # -n: every answer, the first above
        parts_md[0] = f"**Answer 1 of {len(choices)}:**\n\n{parts_md[0]}"
        parts_text[0] = f"Answer 1 of {len(choices)}:\n{parts_text[0]}"
        for i, text in enumerate(choices[1:], 2):
            shown = bundle(text, fmt if fmt in ("markdown", "text", "code") else "text", rich=rich)
            parts_md.append(f"**Answer {i} of {len(choices)}:**\n\n" + (shown.get("text/markdown") or
                                                                        f"```\n{shown['text/plain']}\n```"))
            parts_text.append(f"Answer {i} of {len(choices)}:\n{shown['text/plain']}")
    if completion.steps:
        lines = [f"{i}. {step.describe()}" for i, step in enumerate(completion.steps, 1)]
        parts_md.append("**Steps:**\n\n" + "\n".join(_md_cell(line) for line in lines))
        parts_text.append("Steps:\n" + "\n".join(lines))
    plain = "\n\n".join(p for p in parts_text if p)
    if not rich:
        return {"text/plain": plain}
    return {"text/markdown": "\n\n".join(p for p in parts_md if p), "text/plain": plain}


def with_what_was_sent(data: dict[str, Any], request: Any) -> dict[str, Any]:
    """``data`` (a bundle) with a strip of thumbnails of the images the request sent above it (small
    JPEGs made here, not the images themselves); as it is when the request sent none."""
    sent = sent_pictures(request)
    if not sent:
        return data
    said = sent_line(sent)
    md = " ".join(f"![sent]({thumb})" for thumb, _ in sent if thumb) + f"\n\n*{said}*"
    html_strip = sent_html(sent)
    out = {}
    for k, v in data.items():
        out[k] = f"{md}\n\n{v}" if k == "text/markdown" else f"{said}\n{v}" if k == "text/plain" else \
            f"{html_strip}{v}" if k == "text/html" else v
    return out


def sent_line(sent: list[tuple[str | None, str]]) -> str:
    """``Sent: 2 images (image/jpeg 800x600, ...)``."""
    return f"Sent: {len(sent)} image{'' if len(sent) == 1 else 's'} ({', '.join(said for _, said in sent)})"


def sent_html(sent: list[tuple[str | None, str]]) -> str:
    """The thumbnails and `sent_line` as HTML (above a comparison's table)."""
    pictures = "".join(f"<img src='{thumb}' alt='sent' style='margin-right:4px'>" for thumb, _ in sent if thumb)
    return f"<div class='dbmagic-sent'>{pictures}<div><i>{html.escape(sent_line(sent))}</i></div></div>"


def sent_pictures(request: Any, side: int = 96) -> list[tuple[str | None, str]]:
    """Per image a request body carried (chat's ``image_url`` parts, the Responses API's
    ``input_image``): a thumbnail's ``data:`` URL (None when it cannot be drawn) and what it is."""
    urls = []
    for turn in (request or {}).get("messages") or (request or {}).get("input") or []:
        content = turn.get("content") if isinstance(turn, dict) else None
        for part in content if isinstance(content, list) else []:
            url = part.get("image_url") if isinstance(part, dict) else None
            url = url.get("url") if isinstance(url, dict) else url
            if isinstance(url, str) and url.startswith("data:image/"):
                urls.append(url)
    if not urls:
        return []
    import base64
    import io

    try:
        from PIL import Image
    except ImportError:  # parts a transform made, without Pillow here: named, not drawn
        return [(None, "an image") for _ in urls]
    sent: list[tuple[str | None, str]] = []
    for url in urls:
        try:
            with Image.open(io.BytesIO(base64.b64decode(url.partition(",")[2]))) as picture:
                said = f"{Image.MIME.get(picture.format, picture.format)} {picture.size[0]}x{picture.size[1]}"
                small = picture.convert("RGB")
                small.thumbnail((side, side))
                out = io.BytesIO()
                small.save(out, "JPEG", quality=70)
            sent.append(("data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode(), said))
        except Exception:  # a picture that cannot be shown is named, not drawn
            sent.append((None, "an image"))
    return sent


def _is_data(value: Any) -> bool:
    return hasattr(value, "model_dump") or isinstance(value, (dict, list))


def _data(value: Any) -> Any:
    """A schema's value as plain JSON data (a pydantic model dumped)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value if isinstance(value, (dict, list)) else None


def _table(data: Any) -> tuple[str, str]:
    """``(text, markdown)``: an object as field | value rows, a list of objects as a table."""
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        names = list(dict.fromkeys(k for d in data for k in d))
        return _grid(names, [[_cell(d.get(n)) for n in names] for d in data])
    if isinstance(data, dict):
        return _grid(["field", "value"], [[k, _cell(v)] for k, v in data.items()])
    text = json.dumps(data, indent=2, ensure_ascii=False)
    return text, f"```json\n{text}\n```"


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _grid(headers: list[str], rows: list[list[str]]) -> tuple[str, str]:
    md = ["| " + " | ".join(_md_cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    md += ["| " + " | ".join(_md_cell(str(v)) for v in row) + " |" for row in rows]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in [headers, *rows])
    return text, "\n".join(md)


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def output_metadata(completion: Any) -> dict[str, Any]:
    """What a notebook user can audit about an answer, stored in the output's metadata."""
    return {"dbmagic": {
        "endpoint": completion.endpoint,
        "kind": completion.kind,
        "served_model": completion.served_model,
        "usage": completion.usage.as_dict(),
        "latency_ms": completion.latency_ms,
        "request_id": completion.request_id,
        **({"cached": True} if getattr(completion, "cached", False) else {}),  # answered by the cache, not sent
        # an answer as data (a schema's value): kept here as JSON, as in _dbllm, while the cell shows a table
        **({"value": _data(completion.value)} if getattr(completion, "schema", None) is not None
           and _is_data(completion.value) else {}),
    }}


class LiveOutput:
    """One output updated in place as text streams in, at most ``max_rate`` updates a second.

    The first piece is shown at once; later pieces wait for the throttle; `finish` always shows
    the final value. In the terminal (``rich=False``) pieces are written to ``stdout`` as they come.
    ``sink(data, metadata)`` shows a bundle; by default one IPython display handle is updated in place
    (the panel passes one that fills its Output widget).
    """

    def __init__(self, fmt: str, *, rich: bool = True, max_rate: float = 20.0,
                 clock: Callable[[], float] = time.monotonic, stdout: TextIO | None = None,
                 sink: Callable[[dict[str, Any], dict[str, Any] | None], None] | None = None):
        self.fmt = fmt
        self.sink = sink or self._display
        self.rich = rich
        self._interval = 1.0 / max_rate
        self._clock = clock
        self._stdout = stdout
        self._handle: Any = None
        self._last = float("-inf")
        self._parts: list[str] = []  # what arrived, joined when shown (linear in the answer's length)
        self._shown = 0  # characters shown so far

    @property
    def interval(self) -> float:
        """Seconds between updates (1 / max_rate)."""
        return self._interval

    @property
    def _text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def append(self, piece: str) -> None:
        """A new piece of text arrived."""
        self._parts.append(piece)
        if not self.rich:
            out = self._stdout or sys.stdout
            out.write(piece)
            out.flush()
            return
        self.flush()

    def flush(self) -> None:
        """Show text that the throttle held back, once the interval has passed (call it when the
        stream goes quiet, so a pause never hides what already arrived)."""
        if not self.rich or not self._parts:
            return
        text = self._text
        if len(text) == self._shown:
            return
        now = self._clock()
        if now - self._last >= self._interval:
            self._show(bundle(text, self.fmt if self.fmt in ("markdown", "code", "html") else "text"))
            self._shown, self._last = len(text), now

    def restart(self) -> None:
        """A new round trip of the same call began (a schema retry, tool results sent back): its
        text replaces what was shown."""
        if not self.rich and self._parts:
            out = self._stdout or sys.stdout
            out.write("\n")
        self._parts, self._shown = [], 0

    def finish(self, value: Any, metadata: dict[str, Any] | None = None, note: str | None = None,
               data: dict[str, Any] | None = None) -> None:
        """Show the final value (and an optional note, e.g. that the stream was cut); ``data``: the
        bundle to show, made already (`answer_bundle`)."""
        if not self.rich:
            out = self._stdout or sys.stdout
            if data is not None and self._text != data["text/plain"]:
                plain = data["text/plain"]
                shown = plain[len(self._text):] if self._text and plain.startswith(self._text) else \
                    ("\n" if self._text else "") + plain
                out.write(shown + "\n")
            elif self._text:
                out.write("\n")
            else:
                out.write(bundle(value, self.fmt, rich=False)["text/plain"] + "\n")
            if note:
                out.write(note + "\n")
            out.flush()
            return
        try:
            data = data if data is not None else bundle(value, self.fmt)
        except FormatError:  # show the answer as text, then say why it is not what was asked for
            self._show(bundle(value, "text"), metadata)
            raise
        if note:
            data = {k: (f"{v}\n\n*{note}*" if k == "text/markdown" else f"{v}\n\n{note}" if k == "text/plain" else v)
                    for k, v in data.items()}
        self._show(data, metadata)

    def _show(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.sink(data, metadata)

    def _display(self, data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(data, raw=True, metadata=metadata, display_id=True)
        else:
            self._handle.update(data, raw=True, metadata=metadata)
