"""Side by side: one prompt to several endpoints (or settings) at once, in one table.

``%%dbllm -e A -e B -e C`` (or ``--compare A,B,C``) sends the rendered prompt to each endpoint
concurrently; ``-t 0 -t 0.8`` (any sweep setting given twice) compares settings; endpoints x
settings is the grid (16 calls at most). Each column streams its answer as it arrives, then shows
latency, time to first token, tokens and the served model; an error stays in its column.
``--repeat N`` runs each N times: median latency and how many distinct answers came back.
"""

from __future__ import annotations

import html
import itertools
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from .. import settings
from ..batching.result import Comparison, column_metrics
from ..call.model import brief
from ..call.wire import attachments_in
from ..errors import DbMagicError
from . import cell as _cell
from .render import sent_html, sent_line, sent_pictures

if TYPE_CHECKING:
    from ..client import Call, Client

__all__ = ["Comparison", "cells", "run"]

_SHORT = {"temperature": "t", "max_tokens": "max_tokens", "system": "system", "task": "task",
          "transform_input": "in", "transform_output": "out"}


def cells(values: Mapping[str, Any], axes: Mapping[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every combination of the compared values, in the order given: ``(label, the call's values)``."""
    names = list(axes)
    out = []
    for combo in itertools.product(*(axes[n] for n in names)) if names else [()]:
        cell = {**values, **dict(zip(names, combo, strict=True))}
        if "endpoint" in names:
            cell["cluster_id"] = cell["port"] = None
        label = " · ".join(str(v) if n == "endpoint" else f"{_SHORT.get(n, n)}={brief(v, 24)}" for n, v in zip(names, combo, strict=True))
        out.append((label or str(values.get("endpoint") or "call"), cell))
    return _unique(out)


def _unique(compared: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Labels cut short can collide (two long --system values): number them, so no column (nor,
    with --over, an answer column) is lost."""
    counts: dict[str, int] = {}
    for label, _ in compared:
        counts[label] = counts.get(label, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for label, cell in compared:
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label} #{seen[label]}"
        out.append((label, cell))
    return out


class _Column:
    def __init__(self) -> None:
        self.runs: list[Any] = []
        self.call: Call | None = None
        self.done = False

    @property
    def text(self) -> str:
        """What arrived so far of the running call."""
        return self.call.text if self.call is not None else ""


def run(compared: list[tuple[str, dict[str, Any]]], template: Any, namespace: MutableMapping[str, Any],
        client: Client, *, repeat: int = 1, rich: bool = True,
        sink: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
        on_call: Callable[[Call], None] | None = None) -> Comparison:
    """Send every compared call at once and show one table, updated as answers stream in."""
    columns = {label: _Column() for label, _ in compared}
    show = sink or _display_sink(rich)

    def work(label: str, values: dict[str, Any]) -> None:
        column = columns[label]
        spec = settings.spec_from(values)
        try:
            for _ in range(repeat):
                column.runs.append(_one(spec, template, namespace, client, column, on_call))
        finally:
            column.done = True

    threads = [threading.Thread(target=work, args=(label, values), name=f"dbmagic-compare-{i}", daemon=True)
               for i, (label, values) in enumerate(compared)]
    for thread in threads:
        thread.start()
    interrupted = False
    live = rich or sink is not None  # a terminal gets the table once, at the end
    try:
        while not all(c.done for c in columns.values()):
            time.sleep(0.05)
            if live:
                show(*_table(columns, repeat, final=False))
    except KeyboardInterrupt:
        interrupted = True
        for column in columns.values():
            if column.call is not None:
                column.call.cancel("interrupted")
        until = time.monotonic() + 0.5  # a streamed call ends at once; one blocked on its answer is not waited for
        for thread in threads:
            thread.join(max(until - time.monotonic(), 0))
        for column in columns.values():  # a call still on its way keeps what arrived, as every other
            call = column.call
            if not column.done and call is not None and len(column.runs) < repeat:
                column.runs.append(call.completion or call.partial("interrupted"))
    show(*_table(columns, repeat, final=True))
    result = Comparison({label: (c.runs[0] if c.runs else None) for label, c in columns.items()},
                        {label: list(c.runs) for label, c in columns.items()}, dict(compared))
    namespace[_cell.LAST] = result
    if interrupted:
        raise KeyboardInterrupt
    return result


def _one(spec: Any, template: Any, namespace: Any, client: Client, column: _Column,
         on_call: Callable[[Call], None] | None) -> Any:
    """One call of one column: its `Completion` (partial if cut, stopped or interrupted) or its error."""
    try:
        call = _cell.start(spec, template, namespace, client)
        column.call = call
        if on_call is not None:
            on_call(call)
        return call.outcome()
    except DbMagicError as exc:
        return exc
    except Exception as exc:  # a bug of ours: shown in its column, the others go on
        return DbMagicError(f"Unexpected {exc.__class__.__name__}: {exc}")


def _table(columns: Mapping[str, _Column], repeat: int, *, final: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The comparison as HTML and text, with every endpoint and model in the metadata."""
    shown = {}
    for label, column in columns.items():
        if final or column.done:
            shown[label] = column_metrics(column.runs) if column.runs else {"answer": column.text}
        else:
            shown[label] = {"answer": column.text + " …"}
    names = ["answer", "latency_ms", "time_to_first_token_ms", "input_tokens", "output_tokens", "served_model"]
    if repeat > 1:
        names += ["runs", "distinct_answers"]
    head = "".join(f"<th>{html.escape(label)}</th>" for label in columns)
    body = []
    for name in names:
        cells_html = []
        for label in columns:
            metrics = shown[label]
            if name == "answer" and metrics.get("error"):  # the error, under what arrived of a cut answer
                kept = html.escape(metrics.get("answer") or "")
                cells_html.append(f"<td style='white-space:pre-wrap;vertical-align:top;text-align:left'>{kept}"
                                  f"<div style='color:var(--jp-error-color1,#c62828)'>⚠ "
                                  f"{html.escape(metrics['error'])}</div></td>")
                continue
            value = metrics.get(name)
            text = "" if value is None else str(value)
            style = " style='white-space:pre-wrap;vertical-align:top;text-align:left'" if name == "answer" else ""
            cells_html.append(f"<td{style}>{html.escape(text)}</td>")
        body.append(f"<tr><th>{name.replace('_', ' ')}</th>{''.join(cells_html)}</tr>")
    table = f"<table class='dbmagic-compare'><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    sent = next((sent_pictures(r.request) for c in columns.values() for r in c.runs[:1]
                 if final and not isinstance(r, Exception) and r is not None and attachments_in(r.request)), [])
    if sent:  # the prompt every column was sent, its pictures as thumbnails above the table
        table = sent_html(sent) + table
    text = ("" if not sent else sent_line(sent) + "\n\n") + "\n\n".join(
        f"--- {label}\n" + str(m.get("answer") or "") + (("\n" if m.get("answer") else "") + f"⚠ {m['error']}"
                                                          if m.get("error") else "")
        + "".join(f"\n{n}: {m[n]}" for n in names[1:] if m.get(n) is not None)
        for label, m in shown.items())
    metadata = {"dbmagic": {"compare": [
        {"label": label, "endpoint": (runs[0].endpoint if runs and not isinstance(runs[0], Exception) else None),
         "served_model": shown[label].get("served_model"), "latency_ms": shown[label].get("latency_ms"),
         "error": shown[label].get("error")}
        for label, runs in ((label, c.runs) for label, c in columns.items())]}}
    return {"text/html": table, "text/plain": text}, metadata


def _display_sink(rich: bool) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    from IPython.display import display

    state: dict[str, Any] = {"handle": None, "last": None}

    def show(data: dict[str, Any], metadata: dict[str, Any]) -> None:
        if not rich:
            print(data["text/plain"])
            return
        if data == state["last"]:
            return
        state["last"] = data
        if state["handle"] is None:
            state["handle"] = display(data, raw=True, metadata=metadata, display_id=True)
        else:
            state["handle"].update(data, raw=True, metadata=metadata)

    return show
