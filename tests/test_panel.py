"""The panel without a front end: set widget values, click buttons, read what the panel shows."""

from __future__ import annotations

import html
import json
import re
import threading
import time

import pytest

import dbmagic
from dbmagic.frontends.cell import LAST
from dbmagic.frontends.panel import PROXY, Panel
from dbmagic.testing import Endpoint

from .conftest import CHAT, CLUSTER, COMPLETIONS, CUSTOM, PORT


@pytest.fixture
def panel(shell):
    p = Panel(shell)
    yield p
    p.stop()
    p.wait()


def posts(workspace):
    return [r for r in workspace.requests if r.method == "POST"]


def answer(p):
    return p.output.outputs[-1]["data"]


def status(p):
    """The status line as the user reads it."""
    return html.unescape(re.sub(r"<[^>]+>", "", p.status.value))


def ask(p, prompt, **values):
    for name, value in values.items():
        getattr(p, name).value = value
    p.prompt.value = prompt
    p.send_button.click()
    p.wait()


def test_endpoint_picker_lists_the_workspace_and_defaults_to_config(shell, workspace):
    shell.run_line_magic("config", f'DbLLM.endpoint = "{COMPLETIONS}"')
    p = Panel(shell)
    labels = dict((v, k) for k, v in p.endpoint.options)
    assert labels[CHAT] == f"{CHAT} · llm/v1/chat · READY"
    assert labels[CUSTOM] == f"{CUSTOM} · custom model · READY"
    assert PROXY in labels
    assert p.endpoint.value == COMPLETIONS
    workspace.add_endpoint(Endpoint("brand-new", "llm/v1/chat", ready="NOT_READY"))
    p.refresh_button.click()
    assert dict((v, k) for k, v in p.endpoint.options)["brand-new"] == "brand-new · llm/v1/chat · NOT_READY"
    assert p.endpoint.value == COMPLETIONS  # refreshing keeps the choice


def test_send_streams_into_the_panel_with_template_system_and_parameters(panel, shell, workspace):
    shown = []
    panel.output.observe(lambda change: shown.append(change["new"]), names="outputs")
    shell.user_ns["who"] = "world"
    ask(panel, "Hello {{ who }}, one two three four", system="Be brief.", temperature="0.3", max_tokens="50",
        stop_sequences=["four"], format="text")
    assert posts(workspace)[-1].json == {
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hello world, one two three four"}],
        "temperature": 0.3, "max_tokens": 50, "stop": ["four"], "stream": True}
    assert answer(panel) == {"text/plain": "[Be brief.] Echo: Hello world, one two three "}
    assert len([s for s in shown if s]) >= 2  # streamed: the first piece, then the final answer
    assert f"{CHAT} (meta-llama-3.3-70b-instruct) · " in status(panel)
    assert " ms · 8 tokens in, 8 out" in status(panel)
    assert shell.user_ns[LAST].text == "[Be brief.] Echo: Hello world, one two three "
    assert dbmagic.panel_result() is panel.result is shell.user_ns[LAST]


def test_ctrl_enter_sends(panel, workspace):
    panel.prompt.value = "via keyboard"
    panel.keys._handle_custom_msg({"type": "submit"}, [])  # what the front end sends on Ctrl/Cmd+Enter
    panel.wait()
    assert posts(workspace)[-1].json["messages"][-1]["content"] == "via keyboard"


def test_the_panel_works_without_anywidget(shell, workspace, monkeypatch):
    import ipywidgets

    monkeypatch.setitem(__import__("sys").modules, "anywidget", None)  # `import anywidget` fails
    p = Panel(shell)
    assert p.keys is None and isinstance(p.prompt, ipywidgets.Textarea)
    ask(p, "no extras")
    assert answer(p)["text/markdown"] == "Echo: no extras"
    p.copy_button.click()
    assert "copy it into a new cell" in status(p) and p.cell_text.value.endswith("\nno extras")
    workspace.chunk_delay = 0.2
    p.prompt.value = "one two three four five"
    p.send_button.click()
    time.sleep(0.3)
    p.stop_button.click()
    p.wait()
    assert "Stopped" in status(p)


def test_markdown_code_and_json_formats(panel):
    ask(panel, "**x**")
    assert answer(panel)["text/markdown"] == "Echo: **x**"
    ask(panel, '```json\n{"a": 1}\n```', endpoint=CUSTOM, format="json")  # the model echoes
    assert json.loads(answer(panel)["text/plain"]) == {"a": 1} and "application/json" not in answer(panel)
    ask(panel, "not json")
    assert "The answer is not valid JSON" in status(panel)
    assert answer(panel) == {"text/plain": "Echo: not json"}  # shown as text all the same
    ask(panel, "print(1)", endpoint=CHAT, format="code")
    assert answer(panel)["text/markdown"] == "```\nEcho: print(1)\n```"


def test_proxy_app(panel, workspace):
    ask(panel, "How are you?", endpoint=PROXY, cluster_id=CLUSTER, port=str(PORT))
    assert posts(workspace)[-1].path == f"/driver-proxy-api/o/{workspace.workspace_id}/{CLUSTER}/{PORT}"
    assert answer(panel)["text/markdown"] == "Echo: How are you?"
    panel.port.value = "seventy"
    panel.send()
    assert "port must be a whole number; got 'seventy'." in status(panel)


def test_transform_pickers_list_notebook_functions(panel, shell, workspace):
    assert [v for _, v in panel.transform_input.options] == [""]
    shell.run_cell("def shout(value):\n    return value.upper()\n"
                   "def concise(**request):\n    request['prompt'] += ' Be Concise.'\n    return request\n"
                   "import os\nnumber = 3\n")
    panel.refresh_transforms_button.click()
    assert [v for _, v in panel.transform_input.options] == ["", "concise", "shout"]
    ask(panel, "hi", transform_input="concise", transform_output="shout")
    assert posts(workspace)[-1].json["messages"][-1]["content"] == "hi Be Concise."
    assert answer(panel)["text/markdown"] == "ECHO: HI BE CONCISE."


def test_transform_error_shows_status_and_the_users_traceback(panel, shell):
    shell.run_cell("def broken(**request):\n    return request['missing']\n")
    panel.refresh_transforms()
    ask(panel, "hi", transform_input="broken")
    assert "transform_input 'broken' raised KeyError" in status(panel)
    stderr = "".join(o.get("text", "") for o in panel.output.outputs)
    assert "return request['missing']" in stderr and "KeyError" in stderr


def test_404_429_and_cut_stream(panel, workspace):
    ask(panel, "hi", endpoint=PROXY, cluster_id="no-such-cluster", port="1")
    assert "⚠" in status(panel) and "was not found" in status(panel) and "%dbllm endpoints" in status(panel)

    workspace.fail(CHAT, 429, retry_after=0)
    ask(panel, "again", endpoint=CHAT)
    assert answer(panel)["text/markdown"] == "Echo: again"
    assert len([r for r in posts(workspace) if r.path.endswith("invocations")]) == 2

    workspace.fail(CHAT, cut_after=2)
    ask(panel, "one two three")
    assert "The stream from endpoint" in status(panel) and "was cut" in status(panel)
    assert answer(panel)["text/markdown"].startswith("Echo: one")
    assert not panel.running and not panel.send_button.disabled


def test_stop_keeps_what_arrived_and_the_kernel_stays_responsive(panel, shell, workspace):
    workspace.chunk_delay = 0.3
    first_piece = threading.Event()
    panel.output.observe(lambda change: first_piece.set(), names="outputs")
    panel.prompt.value = "one two three four five six seven"
    panel.send_button.click()
    assert panel.running and panel.send_button.disabled and not panel.stop_button.disabled
    assert shell.run_cell("21 * 2").result == 42  # the main thread is free while the answer streams
    assert first_piece.wait(5)
    panel.stop_button.click()
    panel.wait(5)
    assert not panel.running and not panel.send_button.disabled and panel.stop_button.disabled
    kept = shell.user_ns[LAST]
    assert kept.finish_reason == "stopped" and kept.text.startswith("Echo:")
    assert len(kept.text) < len("Echo: one two three four five six seven")
    assert "Stopped: " in status(panel) and "characters kept in _dbllm.text" in status(panel)


def test_stop_while_the_endpoint_is_silent(panel, workspace):
    workspace.fail(CHAT, stall_after=1, stall=10)
    first_piece = threading.Event()
    panel.output.observe(lambda change: first_piece.set(), names="outputs")
    panel.prompt.value = "one two three"
    panel.send_button.click()
    assert first_piece.wait(5)
    started = time.monotonic()
    panel.stop_button.click()
    panel.wait(5)
    assert not panel.running
    assert time.monotonic() - started < 2  # the blocked read was woken, not waited out
    assert "Stopped: 5 characters kept" in status(panel)


def test_clear(panel):
    ask(panel, "hi")
    panel.clear_button.click()
    assert panel.output.outputs == () and status(panel) == ""


def test_bad_parameter_values_send_nothing(panel, workspace):
    ask(panel, "hi", temperature="warm")
    assert "temperature must be a number; got 'warm'." in status(panel)
    panel.temperature.value = ""
    ask(panel, "hi", max_tokens="1.5")
    assert "max_tokens must be a whole number; got '1.5'." in status(panel)
    ask(panel, "hi", max_tokens="0")
    assert "max_tokens must be at least 1; got '0'." in status(panel)  # the words of --max-tokens 0
    panel.max_tokens.value = ""
    ask(panel, "hi", extra_params='{"top_p": NaN}')
    assert "extra_params must hold JSON values only" in status(panel)
    ask(panel, "   ", max_tokens="")
    assert "Write a prompt first." in status(panel)
    assert posts(workspace) == []


def test_two_panels_send_at_the_same_time_and_do_not_interfere(shell, workspace):
    # the server holds each request until both have arrived: sends one after the other get a 409
    workspace.fail(CHAT, gather=2, times=2, gather_timeout=5)
    a, b = Panel(shell), Panel(shell)
    a.endpoint.value = b.endpoint.value = CHAT
    a.prompt.value, b.prompt.value = "alpha one two three", "beta one two three"
    a.send_button.click()
    b.send_button.click()
    a.wait()
    b.wait()
    assert answer(a)["text/markdown"] == "Echo: alpha one two three", status(a)
    assert answer(b)["text/markdown"] == "Echo: beta one two three", status(b)
    assert a.result is not b.result


def test_sends_that_do_not_overlap_are_caught_by_the_server(shell, workspace):
    # the check above can fail: one send at a time runs into the 409
    workspace.fail(CHAT, gather=2, times=2, gather_timeout=0.3)
    a = Panel(shell)
    ask(a, "alone")
    assert "REQUESTS_DID_NOT_OVERLAP" in status(a)


def test_history_is_the_same_store_as_chat_cells(panel, shell, workspace, capsys):
    panel.chat.value = True
    ask(panel, "from the panel")
    assert "from the panel" in panel.history.value and "Echo: from the panel" in panel.history.value
    shell.run_cell_magic("dbllm", f"-e {CHAT} --chat", "from a cell")
    assert posts(workspace)[-1].json["messages"][:2] == [
        {"role": "user", "content": "from the panel"}, {"role": "assistant", "content": "Echo: from the panel"}]
    ask(panel, "back in the panel")
    assert len(posts(workspace)[-1].json["messages"]) == 5
    panel.reset_button.click()
    assert "No conversation" in panel.history.value
    panel.chat.value = False
    ask(panel, "no memory")
    assert posts(workspace)[-1].json["messages"] == [{"role": "user", "content": "no memory"}]


def test_copy_as_cell_reproduces_the_request(panel, shell, workspace):
    shell.run_cell("def shout(value):\n    return value.upper()\n")
    panel.refresh_transforms()
    panel.chat.value = False
    ask(panel, "Hi {{ 1 + 1 }}", system="Line one\nline two", temperature="0.25", max_tokens="20",
        stop_sequences=["\\n\\n"], format="text", transform_output="shout")
    from_panel = posts(workspace)[-1].json
    cell = panel.copy_as_cell()
    assert cell == ("%%dbllm --endpoint=databricks-meta-llama-3-3-70b-instruct --temperature=0.25 --max-tokens=20 "
                    "'--stop=\\n\\n' '--system=Line one\\nline two' --transform-output=shout --format=text\n"
                    "Hi {{ 1 + 1 }}")
    assert panel.cell_text.value == cell and panel.cell_text.layout.display == ""
    assert "Copied the %%dbllm cell" in status(panel)
    assert shell.run_cell(cell).success
    assert posts(workspace)[-1].json == from_panel


def test_line_magic_opens_a_panel(shell):
    shell.run_line_magic("dbllm", "panel")
    views = [o for o in shell.display_pub.outputs if "application/vnd.jupyter.widget-view+json" in o["data"]]
    assert len(views) == 1


def test_compare_mode_sends_to_several_endpoints_side_by_side(panel, shell, workspace):
    # held until both requests have arrived: they go out together
    workspace.fail((CHAT, COMPLETIONS), gather=2, times=2, gather_timeout=5)
    panel.compare_mode.value = True
    assert panel.compare_endpoints.layout.display == "" and panel.endpoint.layout.display == "none"
    panel.compare_endpoints.value = (COMPLETIONS, CHAT)
    ask(panel, "side by side", temperature="0.3")
    table = answer(panel)["text/html"]
    assert table.index(f"<th>{COMPLETIONS}</th>") < table.index(f"<th>{CHAT}</th>")
    assert table.count("Echo: side by side") == 2
    assert sorted(r.json.get("temperature") for r in posts(workspace)) == [0.3, 0.3]
    assert "Compared 2 endpoints" in status(panel) and list(shell.user_ns[LAST]) == [COMPLETIONS, CHAT]
    assert panel.as_cell() == f"%%dbllm --compare={COMPLETIONS},{CHAT} --temperature=0.3\nside by side"
    panel.compare_endpoints.value = (CHAT,)
    panel.send()
    assert "Pick two or more endpoints to compare" in status(panel)


@pytest.mark.parametrize("mode", ["call", "compare"])
def test_stop_frees_the_panel_at_once_before_any_byte(panel, workspace, mode):
    """On main Stop did nothing for a non-streamed call (or compare) until the server answered."""
    workspace.fail(CHAT, delay=3)
    panel.stream.value = False
    panel.prompt.value = "slow"
    if mode == "compare":
        panel.compare_mode.value = True
        panel.compare_endpoints.value = (CHAT, COMPLETIONS)
    panel.send_button.click()
    time.sleep(0.3)
    started = time.monotonic()
    panel.stop_button.click()
    assert time.monotonic() - started < 1 and not panel.running and not panel.send_button.disabled
    assert "Stopped" in status(panel) and "The panel is free" in status(panel)
    panel.wait(5)  # the stopped call ends on the server later: it does not write over the panel
    assert "Stopped" in status(panel)
    if mode == "call":  # nor over the notebook's last answer, which may be a newer Send's by then
        assert LAST not in panel.namespace


def test_attach_sends_the_files_given_after_the_prompt(panel, workspace):
    """Issue 35: the panel takes a file (as --attach): a picture, and a PDF as its pages' images."""
    pytest.importorskip("PIL")
    import datetime
    import io

    from PIL import Image

    png, pdf = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (60, 30), (1, 2, 3)).save(png, "PNG")
    Image.new("RGB", (72, 144), (255, 255, 255)).save(pdf, "PDF")
    def upload(name: str, kind: str, data: bytes) -> dict:  # what the browser's FileUpload sends
        return {"name": name, "type": kind, "size": len(data), "content": memoryview(data),
                "last_modified": datetime.datetime(2026, 12, 7, tzinfo=datetime.timezone.utc)}

    panel.attach.value = (upload("a.png", "image/png", png.getvalue()), upload("b.pdf", "application/pdf", pdf.getvalue()))
    ask(panel, "What are these?", format="text")
    sent = posts(workspace)[-1].json["messages"][-1]["content"]
    assert [p["type"] for p in sent] == ["text", "text", "image_url", "image_url"]
    assert answer(panel)["text/plain"].endswith("Echo: What are these?\n[image/png 60x30][image/jpeg 200x400]")
    assert "Sent: 2 images" in answer(panel)["text/plain"]
    assert panel.as_cell().split("\n")[0].endswith("# and the 2 files given to Attach: save them and add --attach PATH")
    panel.attach.value = (upload("c.txt", "text/plain", b"abc"),)
    before = len(posts(workspace))
    ask(panel, "And this?")
    assert "is not an image Pillow can read" in status(panel) and len(posts(workspace)) == before
