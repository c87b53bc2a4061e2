"""The widget panel: interactive prompting over the same client, settings, transforms and history.

Open it with ``%dbllm panel`` or ``dbmagic.panel()``. It is a thin adapter: every Send goes through
`dbmagic.frontends.cell.run_prompt` (templating, transforms, the shared client, rendering, chat history),
exactly as ``%%dbllm`` does, in a worker thread so the kernel stays responsive. The answer streams
into the panel; ``_dbllm`` and ``dbmagic.panel_result()`` hold the last one.

ipywidgets (and anywidget, for Ctrl/Cmd+Enter and the clipboard) load only when a panel is
opened. Every control that matters is a core ipywidget, so the panel works where a front end
renders standard widgets only.
"""

from __future__ import annotations

import html
import json
import re
import shlex
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import settings
from ..call import wire as _wire
from ..errors import ConfigurationError, DbMagicError, TransformError, error_of
from ..prompts.templating import Attached, Template
from ..prompts.transforms import callables_in
from ..settings import SETTINGS, Setting
from . import cell as _cell
from . import history as _history
from .render import LiveOutput

if TYPE_CHECKING:
    from ..client import Call, Client, Completion

__all__ = ["Panel", "panel", "panel_result"]

PROXY = "__proxy__"
_last_result: Completion | None = None
# where the main controls stand; every other setting with a control goes under "More options"
_ROWS = (("cluster_id", "port"), ("system",), ("temperature", "max_tokens", "stop", "format"),
         ("transform_input", "transform_output", "chat"))
# the compare picker's chosen endpoints in the theme's own selection colours (the browser's default
# grey is hard to tell from the rest), and a message's `code` as the notebook shows code
_STYLE = """<style>
.dbmagic-compare-endpoints select option:checked { background: var(--jp-brand-color1, #1976d2) linear-gradient(0deg,
  var(--jp-brand-color1, #1976d2) 0%, var(--jp-brand-color1, #1976d2) 100%); color: white; }
.dbmagic-status code { font-family: var(--jp-code-font-family, monospace); background: var(--jp-layout-color2, #eee);
  padding: 0 2px; }
</style>"""
_WIDTHS = {"text": "30%", "number": "19%", "tags": "30%", "choice": "19%", "function": "34%", "checkbox": "24%",
           "json": "60%"}


def panel(shell: Any = None, client: Client | None = None) -> Panel:
    """Open a prompting panel in the notebook and return it."""
    from IPython.display import display

    p = Panel(shell=shell, client=client)
    display(p.widget)
    return p


def panel_result() -> Completion | None:
    """The last answer any panel received (also in ``_dbllm``)."""
    return _last_result


def _keys_class() -> type | None:
    """An invisible anywidget that adds Ctrl/Cmd+Enter to the panel's prompt and copies text to the
    clipboard. Only an extra: where the front end does not load it (or anywidget is missing) the
    panel's core ipywidgets still send, stop and show answers."""
    try:
        import anywidget
    except ImportError:
        return None

    class PanelKeys(anywidget.AnyWidget):
        _esm = r"""
        function render({ model, el }) {
          el.style.display = "none";
          let tries = 0;
          const attach = () => {
            const panel = el.isConnected ? el.closest(".dbmagic-panel") : null;
            const ta = panel && panel.querySelector(".dbmagic-prompt textarea");
            if (!ta) { if (tries++ < 200) setTimeout(attach, 50); return; }
            if (ta.dataset.dbmagicKeys) return;
            ta.dataset.dbmagicKeys = "1";
            // keep notebook shortcuts (a, b, dd ...) out of the prompt while typing
            ta.setAttribute("data-lm-suppress-shortcuts", "true");
            ta.addEventListener("keydown", (e) => {
              if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
                e.preventDefault();
                ta.dispatchEvent(new Event("input", { bubbles: true }));  // the last keystrokes first
                model.send({ type: "submit" });
              }
              e.stopPropagation();
            });
          };
          attach();
          model.on("msg:custom", (msg) => {
            if (msg.type === "copy" && navigator.clipboard) navigator.clipboard.writeText(msg.text).catch(() => {});
          });
        }
        export default { render };
        """

    return PanelKeys


def config_defaults(shell: Any) -> dict[str, Any]:
    """The ``%config DbLLM`` defaults in force in ``shell`` (built-in ones without ``%load_ext``)."""
    for configurable in reversed(getattr(shell, "configurables", [])):
        values = getattr(configurable, "setting_values", None)
        if callable(values):
            return values()
    return settings.merge({}, {})


class Panel:
    """An ipywidgets panel for interactive prompting. ``panel.widget`` is what is displayed.

    ``panel.controls`` holds one control per setting of `dbmagic.settings` that has one, also
    reachable as an attribute of the same name (``panel.temperature``; the stop sequences are
    ``panel.stop_sequences``, as ``stop()`` is the Stop button). Methods mirror the buttons (`send`,
    `stop`, `clear`, `refresh_endpoints`, `refresh_transforms`, `copy_as_cell`), so it can be driven
    from code and tests; `wait` joins a running call.
    """

    def __init__(self, shell: Any = None, client: Client | None = None):
        import ipywidgets as w
        from IPython import get_ipython

        from ..client import get_client

        self.shell = shell or get_ipython()
        if self.shell is None:
            raise ConfigurationError("The panel needs a notebook (IPython); from plain Python use dbmagic.Client.")
        self.namespace = self.shell.user_ns
        self.client = client or get_client()
        self.defaults = config_defaults(self.shell)
        self.result: Completion | None = None
        self.running = False
        self._thread: threading.Thread | None = None
        self._calls: list[Call] = []
        self._stop_requested = False
        self._generation = 0  # one per Send: a call stopped (or replaced) never writes to the panel again
        self._kinds: dict[str, str] = {}

        self.controls: dict[str, Any] = {s.name: _control(w, s, self.defaults[s.name]) for s in SETTINGS if s.widget}
        for name, control in self.controls.items():
            setattr(self, "stop_sequences" if name == "stop" else name, control)
        full = w.Layout(width="100%")
        self.refresh_button = w.Button(icon="refresh", tooltip="Refresh the endpoint list", layout=w.Layout(width="36px"))
        # compare mode: the same prompt to several endpoints at once, answers side by side
        self.compare_mode = w.ToggleButton(description="Compare", icon="columns",
                                           tooltip="Send to several endpoints at once, answers side by side")
        self.compare_endpoints = w.SelectMultiple(description="Compare", rows=8,
                                                  layout=w.Layout(width="60%", display="none"))
        self.compare_endpoints.add_class("dbmagic-compare-endpoints")
        self.compare_mode.observe(lambda _: self._endpoint_changed(), names="value")
        self.prompt = w.Textarea(placeholder="Prompt: {{ name }} fills in a notebook variable; Ctrl/Cmd+Enter sends",
                                 rows=4, layout=full)
        self.prompt.add_class("dbmagic-prompt")
        keys = _keys_class()
        self.keys = keys() if keys is not None else None
        self.refresh_transforms_button = w.Button(icon="refresh", tooltip="Refresh the transform lists",
                                                  layout=w.Layout(width="36px"))
        # pictures and PDFs sent after the prompt (as --attach), read from the browser's files
        self.attach = w.FileUpload(accept="image/*,.pdf", multiple=True, description="Attach",
                                   tooltip="Pictures or PDFs to send after the prompt (a PDF as its pages' images)")
        self.attach.add_class("dbmagic-attach")
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
        self.reset_button = w.Button(description="Reset conversation", icon="trash", layout=w.Layout(width="auto"))
        history_box = w.Accordion(children=[w.VBox([self.history, self.reset_button])], titles=("History",),
                                  selected_index=None)
        placed = {"endpoint", *(name for row in _ROWS for name in row)}
        more = [w.HBox(_labelled(w, s, self.controls[s.name])) for s in SETTINGS if s.widget and s.name not in placed]
        more_box = w.Accordion(children=[w.VBox(more)], titles=("More options",), selected_index=None)

        self.refresh_button.on_click(lambda _: self.refresh_endpoints())
        self.refresh_transforms_button.on_click(lambda _: self.refresh_transforms())
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self.stop())
        self.clear_button.on_click(lambda _: self.clear())
        self.copy_button.on_click(lambda _: self.copy_as_cell())
        self.reset_button.on_click(lambda _: self.reset_conversation())
        if self.keys is not None:
            self.keys.on_msg(self._on_keys_message)
        self.endpoint.observe(lambda _: self._endpoint_changed(), names="value")
        # a cell shown by Copy as cell follows the fields: it never shows a call the panel would not send
        for control in (*self.controls.values(), self.prompt, self.compare_mode, self.compare_endpoints):
            control.observe(lambda _: self._refresh_copied(), names="value")

        rows = [w.HBox([c for name in row for c in _labelled(w, settings.BY_NAME[name], self.controls[name])])
                for row in _ROWS]
        self.proxy_row = rows[0]
        rows[-1].children = (*rows[-1].children[:2], self.refresh_transforms_button, *rows[-1].children[2:])
        self.widget = w.VBox([
            w.HBox([self.endpoint, self.refresh_button, self.compare_mode]), self.compare_endpoints, self.proxy_row, rows[1].children[0], self.prompt,
            *rows[2:], more_box,
            w.HBox([self.send_button, self.stop_button, self.clear_button, self.copy_button, self.attach,
                    *([self.keys] if self.keys is not None else [])]),
            self.status, self.output, self.cell_text, history_box, w.HTML(_STYLE),
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
            endpoints, _ = self.client.targets()  # serving endpoints, model services, apps
        except DbMagicError as exc:
            endpoints = []
            self._set_status(f"Could not list the endpoints: {exc}", error=True)
        for e in endpoints:
            self._kinds[e.name] = e.kind
            options.append((f"{e.name} · {e.described} · {e.state}", e.name))
        default = self.defaults["endpoint"]
        if default and default not in self._kinds:
            options.insert(0, (default, default))
        options.append(("driver-proxy app (cluster id + port)", PROXY))
        self.endpoint.options = options
        self.compare_endpoints.options = [(label, name) for label, name in options if name != PROXY]
        names = [v for _, v in options]
        if current in names:
            self.endpoint.value = current
        elif default:
            self.endpoint.value = default
        elif self.defaults["port"] is not None or len(names) == 1:
            self.endpoint.value = PROXY
        else:
            self.endpoint.value = names[0]
        self._endpoint_changed()

    def refresh_transforms(self) -> None:
        """List the notebook's functions in the transform pickers (keeping the current choices)."""
        names = callables_in(self.namespace)
        for picker, default in ((self.transform_input, self.defaults["transform_input"]),
                                (self.transform_output, self.defaults["transform_output"])):
            current = picker.value if picker.options else default
            picker.options = [("(none)", "")] + [(n, n) for n in names]
            picker.value = current if current in names else ""

    def _endpoint_changed(self) -> None:
        comparing = self.compare_mode.value
        self.compare_endpoints.layout.display = "" if comparing else "none"
        self.endpoint.layout.display = "none" if comparing else ""
        self.proxy_row.layout.display = "" if self.endpoint.value == PROXY and not comparing else "none"
        self._show_history()

    # -- the call ---------------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        """What the controls say, checked as ``%%dbllm`` checks its options (`SettingError` if not)."""
        values = {name: _read(settings.BY_NAME[name], control) for name, control in self.controls.items()}
        if values["endpoint"] == PROXY:
            values["endpoint"] = None
            if values["port"] is None:
                raise settings.SettingError("port is missing: type the driver-proxy app's port, e.g. 7777.")
        else:
            values["cluster_id"] = values["port"] = None
        # a conversation is kept with chat endpoints only; the checkbox stays as the user left it
        kind = self._kinds.get(values["endpoint"] or "", _wire.CHAT)
        values["chat"] = values["chat"] and values["endpoint"] is not None and kind in _wire.CONVERSATIONAL
        # %config fills only what the panel has no control for: an emptied field means none, never the
        # default it started from, so the panel sends what it shows
        return settings.merge({k: v for k, v in self.defaults.items() if k not in self.controls}, values)

    def spec(self) -> _cell.CallSpec:
        """The panel's settings as a call description (raises `SettingError` on bad values)."""
        return settings.spec_from(self.values())

    def send(self) -> None:
        """Send the prompt (the Send button, or Ctrl/Cmd+Enter in the prompt); in compare mode, to
        every endpoint picked, side by side."""
        if self.running:
            return
        template = self.prompt.value
        if not template.strip():
            self._set_status("Write a prompt first.", error=True)
            return
        try:
            spec = self.spec()
            compared = self._compared()
            template = self._with_uploads(template)
        except DbMagicError as exc:
            self._set_status(str(exc), error=True)
            return
        self.running, self._stop_requested, self._calls = True, False, []
        self._generation += 1
        self._buttons()
        self.output.outputs = ()
        if compared is not None:
            self._set_status(f"Asking {', '.join(label for label, _ in compared)}…")
            work, args = self._work_compare, (compared, template, self._generation)
        else:
            self._set_status(f"Asking {spec.endpoint or f'cluster {spec.cluster_id} port {spec.port}'}…")
            work, args = self._work, (spec, template, self._generation)
        self._thread = threading.Thread(target=work, args=args, name="dbmagic-panel", daemon=True)
        self._thread.start()

    def _with_uploads(self, template: str) -> str | Template:
        """The prompt with the files given to Attach after it (as ``--attach``), or as it is."""
        uploads = list(self.attach.value or ())
        if not uploads:
            return template
        from ..prompts.attachments import load_any

        return Attached(Template(template), [part for u in uploads for part in load_any(bytes(u["content"]))])

    def _compared(self) -> list[tuple[str, dict[str, Any]]] | None:
        """The compared calls in compare mode (None otherwise)."""
        if not self.compare_mode.value:
            return None
        from . import compare as _compare

        names = list(self.compare_endpoints.value)
        if len(names) < 2:
            raise settings.SettingError("Pick two or more endpoints to compare (Ctrl/Cmd+click in the list).")
        values = {**self.values(), "chat": False}
        return _compare.cells(values, {"endpoint": names})

    def stop(self) -> None:
        """Stop the running answer(s) and free the panel at once, whether or not a byte has arrived:
        what arrived stays shown; the call itself may still end on the server, unseen."""
        self._stop_requested = True
        for call in list(self._calls):
            call.cancel()
        if self.running and self._calls and self._thread is not None:
            self._thread.join(0.5)  # a cancelled stream ends its call at once, keeping what arrived
        if not self.running:
            return
        self._generation += 1  # the stopped call's late answer or error is not the panel's any more
        self.running = False
        self._buttons()
        shown = "what arrived is kept above" if self.output.outputs else "nothing had arrived"
        self._set_status(f"Stopped: {shown}. The panel is free; a late answer to the stopped call is not shown.")

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
        _history.of(self.client).reset(self._target_key())
        self._show_history()

    def _work(self, spec: _cell.CallSpec, template: str | Template, generation: int) -> None:
        live = LiveOutput(spec.format, sink=self._sink(generation))
        self._in_worker(lambda: _cell.run_prompt(spec, template, self.namespace, self.client, live=live,
                                                 on_call=self._opened, keep=self._keeper(generation)),
                        self._answered, generation)

    def _work_compare(self, compared: list[tuple[str, dict[str, Any]]], template: str, generation: int) -> None:
        from . import compare as _compare

        self._in_worker(lambda: _compare.run(compared, template, self.namespace, self.client,
                                             sink=self._sink(generation), on_call=self._opened),
                        self._compared_all, generation)

    def _keeper(self, generation: int) -> Callable[[Completion], None]:
        """Where one Send's answer is kept (``_dbllm``): the notebook, until that Send is stopped
        (a late answer to a stopped call is not the last answer any more)."""
        def keep(completion: Completion) -> None:
            if generation == self._generation:
                self.namespace[_cell.LAST] = completion

        return keep

    def _sink(self, generation: int) -> Callable[[dict[str, Any], dict[str, Any] | None], None]:
        """Where one Send's output goes: the panel, until that Send is stopped."""
        def show(data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
            if generation == self._generation:
                self._show(data, metadata)

        return show

    def _in_worker(self, call: Callable[[], Any], done: Callable[[Any], None], generation: int) -> None:
        """Run one Send in the worker thread: its errors go to the status line (a transform's own
        traceback below it), its result to ``done``, and the buttons are freed at the end. A Send
        that was stopped meanwhile leaves the panel as Stop left it."""
        global _last_result

        def current() -> bool:
            return generation == self._generation

        try:
            result = call()
        except TransformError as exc:
            if current():
                self._set_status(str(exc), error=True)
                cause = exc.__cause__
                if cause is not None:
                    tb = cause.__traceback__.tb_next if cause.__traceback__ else None
                    self.output.append_stderr("".join(traceback.format_exception(type(cause), cause, tb)))
        except DbMagicError as exc:
            if current():
                self._set_status(str(exc), error=True)
        except Exception as exc:  # a bug of ours: say so in the panel rather than die silently in a thread
            if current():
                self._set_status(f"Unexpected {exc.__class__.__name__}: {exc}", error=True)
        else:
            if current():
                self.result = _last_result = result
                done(result)
        finally:
            if current():
                self.running = False
                self._buttons()

    def _answered(self, completion: Completion) -> None:
        if completion.finish_reason == "stopped":
            self._set_status(f"Stopped: {len(completion.text)} characters kept in _dbllm.text.")
        else:
            self._set_status(_summary(completion))
        self._show_history()

    def _compared_all(self, result: Any) -> None:
        failed = [label for label, value in result.items() if error_of(value) is not None]
        self._set_status(f"Compared {len(result)} endpoints" + (f"; failed: {', '.join(failed)}" if failed else "")
                         + ". The Comparison is in _dbllm.", error=bool(failed))

    def _on_keys_message(self, widget: Any, content: dict[str, Any], buffers: Any) -> None:
        if content.get("type") == "submit":  # Ctrl/Cmd+Enter in the prompt
            self.send()

    def _opened(self, call: Call) -> None:
        self._calls.append(call)
        if self._stop_requested:  # Stop was pressed while the request was on its way
            call.cancel()

    def _show(self, data: dict[str, Any], metadata: dict[str, Any] | None) -> None:
        # replacing the outputs (rather than `with output:`) works from the worker thread
        self.output.outputs = ({"output_type": "display_data", "data": data, "metadata": metadata or {}},)

    def _buttons(self) -> None:
        self.send_button.disabled = self.running
        self.stop_button.disabled = not self.running

    def _set_status(self, text: str, *, error: bool = False) -> None:
        color = "var(--jp-error-color1, #c62828)" if error else "var(--jp-ui-font-color1, inherit)"
        shown = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))  # a message's `code` as code
        self.status.value = f'<span style="color:{color}">{"⚠ " if error else ""}{shown}</span>'

    # -- history and copy ---------------------------------------------------------------------

    def _target_key(self) -> str:
        # the panel needs the key while its fields may not yet form a valid call
        if self.endpoint.value == PROXY:
            return f"{self.cluster_id.value.strip() or None}:{self.port.value.strip() or None}"
        return str(self.endpoint.value)

    def _show_history(self) -> None:
        turns = _history.of(self.client).get(self._target_key())
        if not turns:
            self.history.value = "<i>No conversation with this endpoint yet.</i>"
            return
        self.history.value = "".join(
            f"<div><b>{html.escape(t['role'])}:</b> <span style='white-space:pre-wrap'>{html.escape(t['content'])}</span></div>"
            for t in turns)

    def as_cell(self) -> str:
        """The ``%%dbllm`` cell that sends what the panel sends (``--no-config`` when ``%config``
        defaults would otherwise change it; ``--compare`` in compare mode)."""
        compared = self._compared()
        values = self.values() if compared is None else compared[0][1]
        # the %config in force now (it may have changed since the panel opened) is what the cell meets
        argv = settings.cell_argv(values, config_defaults(self.shell))
        if compared is not None:  # the first endpoint stands for all of them
            at = next(i for i, word in enumerate(argv) if word.startswith("--endpoint="))
            argv[at] = "--compare=" + ",".join(v["endpoint"] for _, v in compared)
        uploads = len(self.attach.value or ())
        note = (f"  # and the {uploads} file{'s' if uploads > 1 else ''} given to Attach: save {'them' if uploads > 1 else 'it'}"
                " and add --attach PATH") if uploads else ""
        return "%%dbllm " + shlex.join(argv) + note + "\n" + self.prompt.value.strip()

    def _refresh_copied(self) -> None:
        """The cell Copy as cell showed, made again from the fields as they are now (hidden when they
        no longer make a call)."""
        if self.cell_text.layout.display == "none":
            return
        try:
            self.cell_text.value = self.as_cell()
        except DbMagicError:
            self.cell_text.layout.display = "none"

    def copy_as_cell(self) -> str:
        """Show the ``%%dbllm`` cell for the current settings and copy it to the clipboard."""
        try:
            text = self.as_cell()
        except DbMagicError as exc:
            self._set_status(str(exc), error=True)
            return ""
        self.cell_text.value = text
        self.cell_text.layout.display = ""
        if self.keys is not None:
            self.keys.send({"type": "copy", "text": text})
            self._set_status("Copied the %%dbllm cell to the clipboard; paste it into a new cell.")
        else:
            self._set_status("The %%dbllm cell is below: copy it into a new cell.")
        return text


def _control(w: Any, s: Setting, value: Any) -> Any:
    """The widget for setting ``s``, showing ``value``."""
    layout = w.Layout(width=_WIDTHS.get(s.widget or "", "100%"))
    label = {"description": s.title, "style": {"description_width": "initial"}, "layout": layout}
    if s.widget == "endpoint":
        return w.Dropdown(description=s.title, layout=w.Layout(width="60%"))
    if s.widget in ("text", "number"):
        return w.Text(value="" if value is None else str(value), placeholder="default", **label)
    if s.widget == "textarea":
        return w.Textarea(value=value or "", placeholder=f"{s.title} (optional)", rows=2, layout=layout)
    if s.widget == "tags":
        tags = w.TagsInput(value=[settings.escape(v) for v in value], allow_duplicates=False, layout=layout)
        tags.add_class(f"dbmagic-{s.name}")
        return tags
    if s.widget == "choice":
        return w.Dropdown(options=list(s.choices), value=value, **label)
    if s.widget == "json":
        return w.Text(value=json.dumps(value) if value else "", placeholder='{"top_p": 0.9}', **label)
    if s.widget == "checkbox":
        return w.Checkbox(value=value, description=s.title, indent=False, layout=layout)
    if s.widget == "function":
        return w.Dropdown(description=s.title, layout=layout)
    raise ValueError(f"setting {s.name} has an unknown widget kind {s.widget!r}")


def _labelled(w: Any, s: Setting, control: Any) -> list[Any]:
    # a TagsInput has no description of its own
    return [w.Label(s.title), control] if s.widget == "tags" else [control]


def _read(s: Setting, control: Any) -> Any:
    """The checked value a control shows (None for an empty field: the default)."""
    value = control.value
    if s.widget in ("text", "number", "json"):
        return settings.from_text(s.name, value) if value.strip() else None
    if s.widget == "textarea":
        return settings.coerce(s.name, value) if value.strip() else None
    if s.widget == "tags":  # a tag cannot hold a newline: \n typed in it is one
        return settings.coerce(s.name, [settings.unescape(v) for v in value])
    if s.widget == "function":
        return settings.coerce(s.name, value or None)
    return value


def _summary(completion: Completion) -> str:
    tokens = f" · {completion.usage.describe()}" if completion.usage else ""
    model = f" ({completion.served_model})" if completion.served_model else ""
    cut = " · cut at the token limit: raise Max tokens" if completion.finish_reason == "length" else ""
    return f"{completion.endpoint}{model} · {completion.latency * 1000:.0f} ms{tokens}{cut}"
