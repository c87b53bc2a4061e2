"""The widget panel: interactive prompting over the same client, settings, transforms and history.

Open it with ``%dbllm panel`` or ``dbmagic.panel()``. It is a thin adapter: every Send goes through
`dbmagic._cell.run_prompt` (templating, transforms, the shared client, rendering, chat history),
exactly as ``%%dbllm`` does, in a worker thread so the kernel stays responsive. The answer streams
into the panel; ``_dbllm`` and ``dbmagic.panel_result()`` hold the last one.

ipywidgets and anywidget load only when a panel is opened.
"""

from __future__ import annotations

import html
import shlex
import threading
import traceback
from typing import TYPE_CHECKING, Any

from . import _cell, _wire
from .errors import ConfigurationError, DbMagicError, TransformError
from .magic import DbLLM, unescape
from .render import FORMATS, LiveOutput
from .transforms import callables_in

if TYPE_CHECKING:
    from .client import Client, Completion, Stream

__all__ = ["Panel", "panel", "panel_result"]

PROXY = "__proxy__"
_last_result: Completion | None = None


def panel(shell: Any = None, client: Client | None = None) -> Panel:
    """Open a prompting panel in the notebook and return it."""
    from IPython.display import display

    p = Panel(shell=shell, client=client)
    display(p.widget)
    return p


def panel_result() -> Completion | None:
    """The last answer any panel received (also in ``_dbllm``)."""
    return _last_result


def _prompt_box_class() -> type:
    """A textarea that sends on Ctrl/Cmd+Enter and can copy text to the clipboard (anywidget)."""
    import anywidget
    import traitlets

    class PromptBox(anywidget.AnyWidget):
        _esm = r"""
        function render({ model, el }) {
          const ta = document.createElement("textarea");
          ta.className = "dbmagic-prompt-input";
          ta.rows = 4;
          ta.placeholder = model.get("placeholder");
          ta.value = model.get("value");
          // keep notebook shortcuts (a, b, dd ...) out of the prompt while typing
          ta.setAttribute("data-lm-suppress-shortcuts", "true");
          ta.style.cssText = "width:100%;box-sizing:border-box;font-family:var(--jp-code-font-family,monospace);" +
            "font-size:var(--jp-code-font-size,13px);padding:6px;resize:vertical;";
          const sync = () => { model.set("value", ta.value); model.save_changes(); };
          ta.addEventListener("input", sync);
          ta.addEventListener("keydown", (e) => {
            if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
              e.preventDefault();
              sync();
              model.send({ type: "submit" });
            }
            e.stopPropagation();
          });
          model.on("change:value", () => { if (ta.value !== model.get("value")) ta.value = model.get("value"); });
          model.on("msg:custom", (msg) => {
            if (msg.type === "copy" && navigator.clipboard) navigator.clipboard.writeText(msg.text).catch(() => {});
          });
          el.appendChild(ta);
        }
        export default { render };
        """
        value = traitlets.Unicode("").tag(sync=True)
        placeholder = traitlets.Unicode("").tag(sync=True)

    return PromptBox


class Panel:
    """An ipywidgets panel for interactive prompting. ``panel.widget`` is what is displayed.

    Methods mirror the buttons (`send`, `stop`, `clear`, `refresh_endpoints`, `refresh_transforms`,
    `copy_as_cell`), so it can be driven from code and tests; `wait` joins a running call.
    """

    def __init__(self, shell: Any = None, client: Client | None = None):
        import ipywidgets as w
        from IPython import get_ipython

        from .client import get_client

        self.shell = shell or get_ipython()
        if self.shell is None:
            raise ConfigurationError("The panel needs a notebook (IPython); from plain Python use dbmagic.Client.")
        self.namespace = self.shell.user_ns
        self.client = client or get_client()
        found = [c for c in self.shell.configurables if isinstance(c, DbLLM)]
        self.defaults = found[-1] if found else DbLLM(shell=self.shell, parent=self.shell)
        self.result: Completion | None = None
        self.running = False
        self._thread: threading.Thread | None = None
        self._stream: Stream | None = None
        self._stop_requested = False
        self._kinds: dict[str, str] = {}
        d = self.defaults

        full = w.Layout(width="100%")
        label = {"description_width": "initial"}
        self.endpoint = w.Dropdown(description="Endpoint", layout=w.Layout(width="60%"))
        self.refresh_button = w.Button(icon="refresh", tooltip="Refresh the endpoint list", layout=w.Layout(width="36px"))
        self.cluster_id = w.Text(value=d.cluster_id or "", placeholder="cluster id", description="Cluster",
                                 layout=w.Layout(width="40%"))
        self.port = w.Text(value=str(d.port or ""), placeholder="port", description="Port", layout=w.Layout(width="20%"))
        self.proxy_row = w.HBox([self.cluster_id, self.port])
        self.system = w.Textarea(value=d.system or "", placeholder="System prompt (optional)", rows=2, layout=full)
        self.prompt = _prompt_box_class()(placeholder="Prompt: {{ name }} fills in a notebook variable; "
                                                      "Ctrl/Cmd+Enter sends")
        self.prompt.add_class("dbmagic-prompt")
        self.temperature = w.Text(value="" if d.temperature is None else str(d.temperature),
                                  placeholder="default", description="Temperature", style=label,
                                  layout=w.Layout(width="20%"))
        self.max_tokens = w.Text(value="" if d.max_tokens is None else str(d.max_tokens),
                                 placeholder="default", description="Max tokens", style=label,
                                 layout=w.Layout(width="20%"))
        self.stop_sequences = w.TagsInput(value=list(d.stop), allow_duplicates=False, layout=w.Layout(width="28%"))
        self.stop_sequences.add_class("dbmagic-stop")
        self.format = w.Dropdown(options=[f for f in FORMATS], value=d.format, description="Format",
                                 style=label, layout=w.Layout(width="20%"))
        self.transform_input = w.Dropdown(description="Input fn", layout=w.Layout(width="34%"))
        self.transform_output = w.Dropdown(description="Output fn", layout=w.Layout(width="34%"))
        self.refresh_transforms_button = w.Button(icon="refresh", tooltip="Refresh the transform lists",
                                                  layout=w.Layout(width="36px"))
        self.chat = w.Checkbox(value=True, description="Keep conversation", indent=False, layout=w.Layout(width="24%"))
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="eraser")
        self.copy_button = w.Button(description="Copy as cell", icon="copy")
        self.status = w.HTML(layout=full)
        self.status.add_class("dbmagic-status")
        self.output = w.Output(layout=w.Layout(width="100%", min_height="2em", border="1px solid var(--jp-border-color2, #ddd)",
                                               padding="4px"))
        self.output.add_class("dbmagic-answer")
        self.cell_text = w.Textarea(rows=4, layout=w.Layout(width="100%", display="none"))
        self.cell_text.add_class("dbmagic-cell-text")
        self.history = w.HTML()
        self.reset_button = w.Button(description="Reset conversation", icon="trash")
        history_box = w.Accordion(children=[w.VBox([self.history, self.reset_button])], titles=("History",),
                                  selected_index=None)

        self.refresh_button.on_click(lambda _: self.refresh_endpoints())
        self.refresh_transforms_button.on_click(lambda _: self.refresh_transforms())
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.copy_button.on_click(lambda _: self.copy_as_cell())
        self.reset_button.on_click(lambda _: self.reset_conversation())
        self.prompt.on_msg(self._on_prompt_message)
        self.endpoint.observe(lambda _: self._endpoint_changed(), names="value")

        self.widget = w.VBox([
            w.HBox([self.endpoint, self.refresh_button]), self.proxy_row, self.system, self.prompt,
            w.HBox([self.temperature, self.max_tokens, w.Label("Stop"), self.stop_sequences, self.format]),
            w.HBox([self.transform_input, self.transform_output, self.refresh_transforms_button, self.chat]),
            w.HBox([self.send_button, self.stop_button, self.clear_button, self.copy_button]),
            self.status, self.output, self.cell_text, history_box,
        ], layout=w.Layout(width="100%", max_width="980px"))
        self.widget.add_class("dbmagic-panel")
        self.refresh_transforms()
        self.refresh_endpoints()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    # -- pickers ----------------------------------------------------------------------------

    def refresh_endpoints(self) -> None:
        """Fill the endpoint picker from the workspace (keeping the current choice)."""
        current = self.endpoint.value
        options: list[tuple[str, str]] = []
        try:
            endpoints = self.client.endpoints()
        except DbMagicError as exc:
            endpoints = []
            self._set_status(f"Could not list the endpoints: {exc}", error=True)
        for e in endpoints:
            self._kinds[e.name] = e.kind
            options.append((f"{e.name} · {e.task or 'custom model'} · {e.state}", e.name))
        default = self.defaults.endpoint
        if default and default not in self._kinds:
            options.insert(0, (default, default))
        options.append(("driver-proxy app (cluster id + port)", PROXY))
        self.endpoint.options = options
        names = [v for _, v in options]
        if current in names:
            self.endpoint.value = current
        elif default:
            self.endpoint.value = default
        elif self.defaults.port is not None or len(names) == 1:
            self.endpoint.value = PROXY
        else:
            self.endpoint.value = names[0]
        self._endpoint_changed()

    def refresh_transforms(self) -> None:
        """List the notebook's functions in the transform pickers (keeping the current choices)."""
        names = callables_in(self.namespace)
        for picker, default in ((self.transform_input, self.defaults.transform_input),
                                (self.transform_output, self.defaults.transform_output)):
            current = picker.value if picker.options else default
            picker.options = [("(none)", "")] + [(n, n) for n in names]
            picker.value = current if current in names else ""

    def _endpoint_changed(self) -> None:
        self.proxy_row.layout.display = "" if self.endpoint.value == PROXY else "none"
        self._show_history()

    # -- the call ---------------------------------------------------------------------------

    def spec(self) -> _cell.CallSpec:
        """The panel's settings as a call description (raises ConfigurationError on bad values)."""
        d = self.defaults
        proxy = self.endpoint.value == PROXY
        port = None
        if proxy:
            try:
                port = int(self.port.value)
            except ValueError:
                raise ConfigurationError(f"Port {self.port.value!r} is not a number: type the app's port, "
                                         "e.g. 7777.") from None
        kind = self._kinds.get(self.endpoint.value, _wire.CHAT)
        return _cell.CallSpec(
            endpoint=None if proxy else self.endpoint.value,
            cluster_id=(self.cluster_id.value.strip() or None) if proxy else None,
            port=port, org_id=d.org_id, task=d.task,
            system=self.system.value.strip() or None,
            temperature=_number(self.temperature.value, float, "Temperature"),
            max_tokens=_number(self.max_tokens.value, int, "Max tokens"),
            stop=[unescape(s) for s in self.stop_sequences.value],
            params=dict(d.params), timeout=d.timeout, format=self.format.value, stream=d.stream,
            chat=self.chat.value and not proxy and kind == _wire.CHAT,
            transform_input=self.transform_input.value or None,
            transform_output=self.transform_output.value or None,
        )

    def send(self) -> None:
        """Send the prompt (the Send button, or Ctrl/Cmd+Enter in the prompt)."""
        if self.running:
            return
        template = self.prompt.value
        if not template.strip():
            self._set_status("Write a prompt first.", error=True)
            return
        try:
            spec = self.spec()
        except DbMagicError as exc:
            self._set_status(str(exc), error=True)
            return
        self.running, self._stop_requested, self._stream = True, False, None
        self._buttons()
        self.output.outputs = ()
        self._set_status(f"Asking {spec.endpoint or f'cluster {spec.cluster_id} port {spec.port}'}…")
        self._thread = threading.Thread(target=self._work, args=(spec, template), name="dbmagic-panel", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the running answer; what arrived is kept."""
        self._stop_requested = True
        if self._stream is not None:
            self._stream.cancel()

    def wait(self, timeout: float | None = 30) -> None:
        """Block until the running call ends (for code and tests; the buttons never block)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def clear(self) -> None:
        """Clear the answer and the status line."""
        self.output.outputs = ()
        self.status.value = ""
        self.cell_text.layout.display = "none"

    def reset_conversation(self) -> None:
        self.client.conversations.reset(self._target_key())
        self._show_history()

    def _work(self, spec: _cell.CallSpec, template: str) -> None:
        global _last_result
        live = LiveOutput(spec.format, sink=self._show)
        try:
            completion = _cell.run_prompt(spec, template, self.namespace, self.client, live=live,
                                          on_stream=self._opened)
        except TransformError as exc:
            self._set_status(str(exc), error=True)
            cause = exc.__cause__
            if cause is not None:
                tb = cause.__traceback__.tb_next if cause.__traceback__ else None
                self.output.append_stderr("".join(traceback.format_exception(type(cause), cause, tb)))
        except DbMagicError as exc:
            self._set_status(str(exc), error=True)
        except Exception as exc:  # a bug of ours: say so in the panel rather than die silently in a thread
            self._set_status(f"Unexpected {exc.__class__.__name__}: {exc}", error=True)
        else:
            self.result = _last_result = completion
            if completion.finish_reason == "stopped":
                self._set_status(f"Stopped: {len(completion.text)} characters kept in _dbllm.text.")
            else:
                self._set_status(_summary(completion))
            self._show_history()
        finally:
            self.running = False
            self._buttons()

    def _on_prompt_message(self, widget: Any, content: dict[str, Any], buffers: Any) -> None:
        if content.get("type") == "submit":  # Ctrl/Cmd+Enter in the prompt
            self.send()

    def _opened(self, stream: Stream) -> None:
        self._stream = stream
        if self._stop_requested:  # Stop was pressed while the request was on its way
            stream.cancel()

    def _show(self, data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        # replacing the outputs (rather than `with output:`) works from the worker thread
        self.output.outputs = ({"output_type": "display_data", "data": data, "metadata": metadata or {}},)

    def _buttons(self) -> None:
        self.send_button.disabled = self.running
        self.stop_button.disabled = not self.running

    def _set_status(self, text: str, *, error: bool = False) -> None:
        color = "var(--jp-error-color1, #c62828)" if error else "var(--jp-ui-font-color1, inherit)"
        self.status.value = f'<span style="color:{color}">{"⚠ " if error else ""}{html.escape(text)}</span>'

    # -- history and copy ---------------------------------------------------------------------

    def _target_key(self) -> str:
        if self.endpoint.value == PROXY:
            return f"{self.cluster_id.value.strip() or None}:{self.port.value.strip() or None}"
        return str(self.endpoint.value)

    def _show_history(self) -> None:
        turns = self.client.conversations.get(self._target_key())
        if not turns:
            self.history.value = "<i>No conversation with this endpoint yet.</i>"
            return
        self.history.value = "".join(
            f"<div><b>{html.escape(t['role'])}:</b> <span style='white-space:pre-wrap'>{html.escape(t['content'])}</span></div>"
            for t in turns)

    def as_cell(self) -> str:
        """The panel's current settings and prompt as a ``%%dbllm`` cell."""
        spec = self.spec()
        d = self.defaults
        opts: list[str] = []
        if spec.endpoint:
            opts += ["-e", spec.endpoint]
        else:
            opts += ["--cluster-id", str(spec.cluster_id), "--port", str(spec.port)]
        if spec.temperature is not None:
            opts += ["-t", f"{spec.temperature:g}"]
        if spec.max_tokens is not None:
            opts += ["--max-tokens", str(spec.max_tokens)]
        if spec.stop != list(d.stop):
            for s in spec.stop:
                opts += ["--stop", _escape(s)]
        if spec.system:
            opts += ["--system", _escape(spec.system)]
        if spec.format != d.format:
            opts += ["-f", spec.format]
        if spec.transform_input and spec.transform_input != d.transform_input:
            opts += ["--transform-input", spec.transform_input]
        if spec.transform_output and spec.transform_output != d.transform_output:
            opts += ["--transform-output", spec.transform_output]
        if spec.chat:
            opts.append("--chat")
        return "%%dbllm " + " ".join(shlex.quote(o) for o in opts) + "\n" + self.prompt.value.strip()

    def copy_as_cell(self) -> str:
        """Show the ``%%dbllm`` cell for the current settings and copy it to the clipboard."""
        try:
            text = self.as_cell()
        except DbMagicError as exc:
            self._set_status(str(exc), error=True)
            return ""
        self.cell_text.value = text
        self.cell_text.layout.display = ""
        self.prompt.send({"type": "copy", "text": text})
        self._set_status("Copied the %%dbllm cell to the clipboard; paste it into a new cell.")
        return text


def _number(text: str, kind: type, label: str) -> Any:
    text = text.strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ConfigurationError(f"{label} {text!r} is not a {'whole ' if kind is int else ''}number: "
                                 "type one, or leave it empty for the endpoint's default.") from None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def _summary(completion: Completion) -> str:
    usage = completion.usage or {}
    tokens = (f" · {usage.get('prompt_tokens', '?')} → {usage.get('completion_tokens', '?')} tokens"
              if usage else "")
    model = f" ({completion.served_model})" if completion.served_model else ""
    return f"{completion.endpoint}{model} · {completion.latency * 1000:.0f} ms{tokens}"
