"""One prompt, from settings to the rendered answer: the work shared by ``%%dbllm`` and the panel.

``CallSpec`` is the whole description of a call (what the magic's options and ``%config`` defaults
resolve to). `run_prompt` renders the template, resolves the transforms, sends through the shared
client (streaming when it can), shows the answer, keeps the chat history, and stores the
`Completion` as ``_dbllm`` in the namespace, also when a stream is cut or interrupted.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from . import _wire, tracing
from .errors import ConfigurationError, StreamInterrupted
from .render import LiveOutput, output_metadata
from .settings import CLIENT_OPTIONS, CallSpec
from .templating import Template, render_prompt
from .transforms import resolve_transform

if TYPE_CHECKING:  # the client (and requests) load with the first call, not with %load_ext
    from .client import Client, Completion, PreparedRequest, Stream

__all__ = ["CallSpec", "run_prompt", "dry_run", "LAST"]

LAST = "_dbllm"
CUT_AT_LIMIT = ("The answer was cut at the token limit (finish_reason=length): raise --max-tokens "
                "(max_tokens=) for the rest.")


def prepare(spec: CallSpec, template: str | Template, namespace: MutableMapping[str, Any], client: Client,
            *, stream: bool = False) -> tuple[PreparedRequest, Any]:
    """Render the prompt and build the request; returns it and the output transform."""
    prompt = render_prompt(template, namespace).strip()
    t_in = resolve_transform(spec.transform_input, namespace, "transform_input")
    t_out = resolve_transform(spec.transform_output, namespace, "transform_output")
    history = client.conversations.get(spec.target_key) if spec.chat else ()
    options = {name: getattr(spec, name) for name in CLIENT_OPTIONS}
    prepared = client.prepare(prompt, history=history, transform_input=t_in, stream=stream, **options)
    problem = _wire.not_for_kind("--chat", prepared.kind, prepared.target) if spec.chat else None
    if problem:
        raise ConfigurationError(problem)
    return prepared, t_out


def run_batch(spec: CallSpec, template: str | Template, rows: Any, namespace: MutableMapping[str, Any], client: Client, *,
              concurrency: int, column: str, send_missing: bool = False) -> tuple[Any, Any]:
    """The template over ``rows`` (see `dbmagic.batch`): ``(BatchResult, DataFrame with the answer
    and error columns, or None for a list)``."""
    from ._batch import _is_frame, run, with_answers

    options = {name: getattr(spec, name) for name in CLIENT_OPTIONS if name != "endpoint"}
    options["transform_input"] = resolve_transform(spec.transform_input, namespace, "transform_input")
    t_out = resolve_transform(spec.transform_output, namespace, "transform_output")
    result = run(template, rows, spec.endpoint, concurrency=concurrency, namespace=namespace, client=client,
                 transform_output=t_out, timeout=spec.timeout, column=column, send_missing=send_missing, **options)
    return result, (with_answers(rows, result, column) if _is_frame(rows) else None)


def dry_run(spec: CallSpec, template: str | Template, namespace: MutableMapping[str, Any], client: Client,
            *, rich: bool = True) -> PreparedRequest:
    """Show the exact request that would be sent (token hidden); send nothing."""
    from IPython.display import display

    with tracing.dry_run():
        prepared, _ = prepare(spec, template, namespace, client, stream=spec.stream)
    text = json.dumps(prepared.describe(), indent=2, ensure_ascii=False)
    data = {"text/markdown": f"```json\n{text}\n```", "text/plain": text} if rich else {"text/plain": text}
    display(data, raw=True)
    return prepared


def run_prompt(spec: CallSpec, template: str | Template, namespace: MutableMapping[str, Any], client: Client,
               *, rich: bool = True, live: LiveOutput | None = None,
               on_stream: Callable[[Stream], None] | None = None) -> Completion:
    """Send one prompt and show its answer; see the module docstring.

    ``live`` is where the answer is shown (default: this cell's output); ``on_stream`` receives
    the `Stream` once it is open, so another thread can ``cancel()`` it (the panel's Stop). A
    cancelled stream returns what arrived, with ``finish_reason == "stopped"``.
    """
    prepared, t_out = prepare(spec, template, namespace, client, stream=spec.stream)
    live = live or LiveOutput(spec.format, rich=rich)
    if not prepared.stream:
        completion = client.send(prepared, transform_output=t_out, timeout=spec.timeout)
    else:
        stream = client.open_stream(prepared, transform_output=t_out, timeout=spec.timeout)
        if on_stream is not None:
            on_stream(stream)
        try:
            for piece in _pumped(stream, tick=live.interval):
                if piece is None:
                    live.flush()  # the endpoint paused: show what the throttle held back
                else:
                    live.append(piece)
        except (StreamInterrupted, KeyboardInterrupt) as exc:
            stream.cancel()
            why = "cut" if isinstance(exc, StreamInterrupted) else "interrupted"
            _keep_partial(namespace, live, stream, why)
            raise
        if stream.completion is None:  # cancelled
            return _keep_partial(namespace, live, stream, "stopped")
        completion = stream.completion
    namespace[LAST] = completion
    if spec.chat:
        client.conversations.add(spec.target_key, _wire.user_turn(prepared.kind, prepared.body), completion.text)
    live.finish(completion.value, output_metadata(completion))
    if completion.finish_reason == "length":
        print(CUT_AT_LIMIT)
    return completion


def _pumped(stream: Stream, *, tick: float) -> Iterator[str | None]:
    """The stream's pieces, read in a helper thread so that this one can wake every ``tick``
    seconds (yielding None) while the endpoint is quiet. Display calls stay on the caller's thread,
    where the kernel routes output to the right cell; Ctrl-C lands here and cancels the read."""
    box: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def read() -> None:
        try:
            for piece in stream:
                box.put(("piece", piece))
            box.put(("end", None))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            box.put(("error", exc))

    reader = threading.Thread(target=read, name="dbmagic-stream", daemon=True)
    reader.start()
    try:
        while True:
            try:
                kind, value = box.get(timeout=tick)
            except queue.Empty:
                yield None
                continue
            if kind == "piece":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        if reader.is_alive():
            stream.cancel()
            reader.join(5)


def _keep_partial(namespace: MutableMapping[str, Any], live: LiveOutput, stream: Stream, why: str) -> Completion:
    """Store and show what arrived of an answer that did not end normally."""
    partial = stream.partial(why)
    namespace[LAST] = partial
    live.finish(partial.text, note=f"The stream was {why}: {len(partial.text)} characters kept in {LAST}.text.")
    return partial
