"""One prompt, from settings to the rendered answer: the work shared by ``%%dbllm`` and the panel.

``CallSpec`` is the whole description of a call (what the magic's options and ``%config`` defaults
resolve to). `start` renders the template, resolves the transforms and makes the client's `Call`
(tagged with its conversation for ``--chat``: the history, `dbmagic.frontends.history`, is a subscriber);
`run_prompt` shows its answer as it arrives and stores the `Completion` as ``_dbllm``, also a
partial one (a cut stream, a Stop, a Ctrl-C). The compare table and the panel make their calls
with `start` too, and read the same `Call`.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from ..call import wire as _wire
from ..errors import ConfigurationError, SchemaError
from ..observe import tracing
from ..prompts.attachments import Parts
from ..prompts.templating import Template, render_prompt
from ..prompts.transforms import resolve_transform
from ..settings import CLIENT_OPTIONS, CallSpec
from . import history as _history
from .render import LiveOutput, answer_bundle, bundle, output_metadata, with_what_was_sent

if TYPE_CHECKING:  # the client (and requests) load with the first call, not with %load_ext
    from ..client import Call, Client, Completion, PreparedRequest

__all__ = ["CallSpec", "start", "run_prompt", "dry_run", "LAST"]

LAST = "_dbllm"
CUT_AT_LIMIT = ("The answer was cut at the token limit (finish_reason=length): raise --max-tokens "
                "(max_tokens=) for the rest.")


def call_options(spec: CallSpec, namespace: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The `Client.prepare` keywords a spec means, with the names it holds found in the notebook
    (the transforms, the schema, the tools), and the output transform."""
    from ..call.schema import schema_named

    options = {name: getattr(spec, name) for name in CLIENT_OPTIONS}
    options["transform_input"] = resolve_transform(spec.transform_input, namespace, "transform_input")
    options["schema"] = schema_named(spec.schema, namespace)
    if spec.tools:
        from ..call.tools import toolbox_named

        options["tools"] = toolbox_named(spec.tools, namespace)
    return options, resolve_transform(spec.transform_output, namespace, "transform_output")


def prepare(spec: CallSpec, template: str | Template, namespace: MutableMapping[str, Any], client: Client,
            *, stream: bool = False) -> tuple[PreparedRequest, Any]:
    """Render the prompt and build the request; returns it and the output transform."""
    prompt = render_prompt(template, namespace)
    prompt = prompt.strip() if isinstance(prompt, (str, Parts)) else prompt  # a registry chat prompt's messages as they are
    options, t_out = call_options(spec, namespace)
    if spec.chat and _wire.is_messages(prompt):
        raise ConfigurationError("A chat prompt brings its own messages, so --chat has no conversation to keep: "
                                 "drop --chat (or its %config DbLLM default).")
    history = _history.of(client).get(spec.target_key) if spec.chat else ()
    prepared = client.prepare(prompt, history=history, stream=stream, **options)
    problem = _wire.not_for_kind("--chat", prepared.kind, prepared.target) if spec.chat else None
    if problem:
        raise ConfigurationError(problem)
    return prepared, t_out


def start(spec: CallSpec, template: str | Template, namespace: MutableMapping[str, Any], client: Client) -> Call:
    """The `Call` of one prompt (not sent yet): rendered, transforms resolved, its conversation tagged."""
    prepared, t_out = prepare(spec, template, namespace, client, stream=spec.stream)
    tags = {"conversation": spec.target_key} if spec.chat else None
    return client.call(prepared, transform_output=t_out, timeout=spec.timeout, tags=tags)


def run_batch(spec: CallSpec, template: str | Template, rows: Any, namespace: MutableMapping[str, Any], client: Client, *,
              concurrency: int, column: str, send_missing: bool = False, checkpoint: str | None = None,
              shared_checkpoint: bool = False,
              max_tokens_total: int | None = None, max_cost: float | None = None,
              background: bool = False, rows_per_request: int | None = None) -> tuple[Any, Any]:
    """The template over ``rows`` (see `dbmagic.batch`): ``(BatchResult, DataFrame with the answer
    and error columns, or None for a list)``; with ``background``, ``(BackgroundBatch, None)``."""
    from ..batching.run import batch, is_frame, run, with_answers

    options, t_out = call_options(spec, namespace)
    options.pop("endpoint")
    given = dict(concurrency=concurrency, namespace=namespace, client=client, transform_output=t_out,
                 timeout=spec.timeout, column=column, send_missing=send_missing, checkpoint=checkpoint,
                 shared_checkpoint=shared_checkpoint,
                 max_tokens_total=max_tokens_total, max_cost=max_cost, rows_per_request=rows_per_request, **options)
    if background:
        return batch(template, rows, spec.endpoint, background=True, **given), None
    result = run(template, rows, spec.endpoint, **given)
    return result, (with_answers(rows, result, column) if is_frame(rows) else None)


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
               *, rich: bool = True, live: LiveOutput | None = None, on_call: Callable[[Call], None] | None = None,
               keep: Callable[[Completion], None] | None = None) -> Completion:
    """Send one prompt and show its answer; see the module docstring.

    ``live`` is where the answer is shown (default: this cell's output); ``on_call`` receives the
    `Call` before it is sent, so another thread can ``cancel()`` it (the panel's Stop). ``keep``
    stores the outcome (default: as ``_dbllm`` in ``namespace``). A cancelled call returns what
    arrived, with ``finish_reason == "stopped"``; a cut or interrupted one keeps it, then raises.
    """
    call = start(spec, template, namespace, client)
    if on_call is not None:
        on_call(call)
    live = live or LiveOutput(spec.format, rich=rich)
    keep = keep or (lambda completion: namespace.__setitem__(LAST, completion))
    step = 0
    try:
        for item in _pumped(call, tick=live.interval):
            if item is None:
                live.flush()  # the endpoint paused: show what the throttle held back
                continue
            piece_step, piece = item
            if piece_step != step:  # the call went on (a schema retry, tool results): its new answer
                step = piece_step
                live.restart()
            if call.prepared.stream:  # a whole answer is shown once, below
                live.append(piece)
    except SchemaError as exc:  # an answer that never fit: it is kept and shown as text, and the cell fails
        if exc.completion is not None:
            keep(exc.completion)
            live.restart()
            live.finish(exc.text, output_metadata(exc.completion), data=bundle(exc.text, "text", rich=live.rich),
                        note=f"This answer does not fit the schema; it is kept in {LAST}.text.")
        raise
    except BaseException:
        if call.error is None:  # a cut answer or a Ctrl-C: what arrived is kept
            _keep_partial(call.completion or call.partial("interrupted"), live, keep)
        raise
    completion = call.wait()  # read to its end above: its Completion
    if completion.is_partial:  # stopped
        return _keep_partial(completion, live, keep)
    keep(completion)
    data = answer_bundle(completion, spec.format, rich=live.rich, stopped_by=call.stopped_by)
    if _wire.attachments_in(completion.request):  # what was sent, as thumbnails above the answer
        data = with_what_was_sent(data or bundle(completion.value, spec.format, rich=live.rich), completion.request)
    live.finish(completion.value, output_metadata(completion), data=data)
    if completion.finish_reason == "length":
        print(CUT_AT_LIMIT)
    return completion


def _pumped(call: Call, *, tick: float) -> Iterator[tuple[int, str] | None]:
    """The call's pieces, read in a helper thread so that this one can wake every ``tick``
    seconds (yielding None) while the endpoint is quiet; each piece comes as ``(round trip, piece)``. Display calls stay on the caller's thread,
    where the kernel routes output to the right cell; Ctrl-C lands here and cancels the call."""
    box: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    def read() -> None:
        try:
            for piece in call:
                box.put(("piece", (call.step, piece)))
            box.put(("end", None))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            box.put(("error", exc))

    reader = threading.Thread(target=read, name="dbmagic-call", daemon=True)
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
            call.cancel("interrupted")
            reader.join(5)


def _keep_partial(partial: Completion, live: LiveOutput, keep: Callable[[Completion], None]) -> Completion:
    """Store and show what arrived of an answer that did not end normally (a cut fails the cell with
    an error that says where it is kept; a Stop and a Ctrl-C say it here)."""
    keep(partial)
    where = f" kept in {LAST}.text" if partial.error is None else ""
    live.finish(partial.text, note=f"The answer was {partial.finish_reason}: {len(partial.text)} characters"
                                   f"{where}.")
    return partial
