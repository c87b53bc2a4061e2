"""%%dbllm in a real InteractiveShell against the local workspace: what was sent, what the user sees."""

from __future__ import annotations

import json
import re

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.error import UsageError

import dbmagic
from dbmagic.frontends.cell import LAST
from dbmagic.frontends.render import LiveOutput

from .conftest import (
    CHAT,
    CLUSTER,
    COMPLETIONS,
    CUSTOM,
    EMBEDDINGS,
    LANGCHAIN_TRANSFORMS,
    PORT,
)


def shown(ip):
    """The data of the last thing displayed (the final state of a streamed answer)."""
    return ip.display_pub.outputs[-1]["data"]


def sent(workspace):
    return [r for r in workspace.requests if r.method == "POST"][-1]


def invocations(workspace):
    return [r for r in workspace.requests if r.path.endswith("/invocations")]


def cell(ip, line, body):
    return ip.run_cell_magic("dbllm", line, body)


def test_chat_prompt_with_every_call_option(shell, workspace):
    cell(shell, f'--endpoint {CHAT} -t 0.2 --max-tokens 200 --stop "\\n\\n" --stop END --system "Be brief." '
                "-p top_p=0.9 -p 'tags=[\"a\"]' -p label=plain --timeout 30", "Hello there")
    assert sent(workspace).path == f"/serving-endpoints/{CHAT}/invocations"
    assert sent(workspace).json == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        "temperature": 0.2, "max_tokens": 200, "stop": ["\n\n", "END"], "top_p": 0.9, "tags": ["a"],
        "label": "plain", "stream": True}
    assert shown(shell) == {"text/markdown": "[Be brief.] Echo: Hello there",
                            "text/plain": "[Be brief.] Echo: Hello there"}
    meta = shell.display_pub.outputs[-1]["metadata"]["dbmagic"]
    assert meta["endpoint"] == CHAT and meta["kind"] == "chat"  # the name and kind as data, not a label
    assert meta["served_model"] == "meta-llama-3.3-70b-instruct"
    assert meta["usage"] == {"input": 4, "output": 5, "total": 9}
    assert meta["latency_ms"] == round(shell.user_ns[LAST].latency * 1000, 1)


def test_template_over_the_namespace_without_ipython_expansion(shell, workspace):
    shell.user_ns.update(notes="Q3 numbers", audience="the board", items=[1, 2])
    cell(shell, f"-e {CHAT}", 'Summarize {{ notes }} for {{ audience }} ({{ items | length }} items). '
                              'Reply as {"summary": "$x"}.')
    assert sent(workspace).json["messages"][-1]["content"] == (
        'Summarize Q3 numbers for the board (2 items). Reply as {"summary": "$x"}.')


def test_undefined_template_name_fails_and_sends_nothing(shell, workspace):
    with pytest.raises(UsageError, match="The prompt template uses 'notez', which is not defined in the notebook"):
        cell(shell, f"-e {CHAT}", "Summarize {{ notez }}")
    assert not [r for r in workspace.requests if r.method == "POST"]


def test_config_defaults_and_line_options_beat_them(shell, workspace):
    shell.run_line_magic("config", f'DbLLM.endpoint = "{CHAT}"')
    shell.run_line_magic("config", "DbLLM.temperature = 0.7")
    shell.run_line_magic("config", 'DbLLM.system = "Default system."')
    shell.run_line_magic("config", 'DbLLM.extra_params = {"top_k": 3}')
    cell(shell, "", "first")
    assert sent(workspace).json["temperature"] == 0.7 and sent(workspace).json["top_k"] == 3
    assert sent(workspace).json["messages"][0] == {"role": "system", "content": "Default system."}
    with pytest.raises(UsageError, match=r"--system sets the system prompt .* \(or its %config DbLLM default\)"):
        cell(shell, f"-e {COMPLETIONS} -t 0", "second")  # a default that cannot apply is not dropped silently
    shell.run_line_magic("config", "DbLLM.system = None")
    cell(shell, f"-e {COMPLETIONS} -t 0", "second")
    assert sent(workspace).path == f"/serving-endpoints/{COMPLETIONS}/invocations"
    assert sent(workspace).json["temperature"] == 0


def test_flag_options_have_config_defaults_too(shell, workspace):
    shell.run_line_magic("config", "DbLLM.dry_run = True")
    cell(shell, f"-e {CHAT}", "only shown")
    assert not [r for r in workspace.requests if r.method == "POST"]
    shell.run_line_magic("config", "DbLLM.dry_run = False")
    shell.run_line_magic("config", 'DbLLM.output = "last_answer"')
    shell.run_line_magic("config", "DbLLM.chat = True")
    shell.run_line_magic("config", "DbLLM.insert = True")
    cell(shell, f"-e {CHAT}", "one")
    cell(shell, f"-e {CHAT}", "two")
    assert shell.user_ns["last_answer"] == "Echo: two"
    assert len(sent(workspace).json["messages"]) == 3  # the conversation was kept
    assert shell.rl_next_input == "Echo: two"


def test_one_line_prompt_keeps_quotes(shell, workspace):
    shell.run_line_magic("dbllm", f"-e {COMPLETIONS} What's \"2+2\"? {{x}}")
    assert sent(workspace).json == {"prompt": "What's \"2+2\"? {x}", "stream": True,
                                    "stream_options": {"include_usage": True}}  # an external model
    assert shown(shell)["text/plain"] == "Echo: What's \"2+2\"? {x}"


def test_driver_proxy_app(shell, workspace):
    cell(shell, f"--cluster-id {CLUSTER} --port {PORT} --org-id 42 --stop ?", "How are you?")
    assert sent(workspace).path == f"/driver-proxy-api/o/42/{CLUSTER}/{PORT}"
    assert sent(workspace).json == {"prompt": "How are you?", "stop": ["?"]}
    assert shown(shell)["text/plain"] == "Echo: How are you"


def test_embeddings_and_custom_models(shell, workspace):
    cell(shell, f"-e {EMBEDDINGS} -o vectors", "alpha")
    assert sent(workspace).json == {"input": "alpha"}
    assert len(shell.user_ns["vectors"]) == 1 and len(shell.user_ns["vectors"][0]) == 8
    assert "application/json" not in shown(shell) and shown(shell)["text/markdown"].startswith("```json")
    cell(shell, f"-e {CUSTOM} -t 0.5 -o prediction", "score me")
    assert sent(workspace).json == {"dataframe_records": [{"prompt": "score me", "temperature": 0.5}]}
    assert shell.user_ns["prediction"] == "Echo: score me"


def test_langchain_transforms_by_name(shell, workspace):
    shell.run_cell(LANGCHAIN_TRANSFORMS)
    cell(shell, f"-e {CHAT} --transform-input transform_input --transform-output transform_output -o answer",
         "How are you?")
    assert sent(workspace).json["messages"][-1]["content"] == "How are you?\n    Be Concise.\n    "
    assert shell.user_ns["answer"] == "ECHO: HOW ARE YOU?\n    BE CONCISE.\n    "
    assert shown(shell)["text/markdown"] == shell.user_ns["answer"]
    completion = shell.user_ns[LAST]
    assert completion.text == shell.user_ns["answer"]
    assert completion.usage.output == 6  # the raw answer's usage is kept


def test_transform_from_config_and_dotted_names(shell, workspace):
    shell.run_cell("import types\nhelpers = types.SimpleNamespace(shout=lambda v: v + '!')")
    shell.run_cell(LANGCHAIN_TRANSFORMS)
    shell.run_line_magic("config", 'DbLLM.transform_input = "transform_input"')
    cell(shell, f"-e {COMPLETIONS} --transform-output helpers.shout --no-stream -o out", "Hi")
    assert sent(workspace).json["prompt"] == "Hi\n    Be Concise.\n    "
    assert shell.user_ns["out"] == "Echo: Hi\n    Be Concise.\n    !"


def test_unknown_and_non_callable_transforms(shell):
    with pytest.raises(UsageError, match=r"transform_input 'nope' is not defined in the notebook.*def nope\(\*\*request\)"):
        cell(shell, f"-e {CHAT} --transform-input nope", "x")
    shell.user_ns["not_a_function"] = 42
    with pytest.raises(UsageError, match="transform_output 'not_a_function' is a int, not a function"):
        cell(shell, f"-e {CHAT} --transform-output not_a_function", "x")
    shell.run_cell("def takes_two(a, b): return a")
    with pytest.raises(UsageError, match="must take exactly one argument"):
        cell(shell, f"-e {CHAT} --transform-output takes_two", "x")


def test_transform_that_raises_shows_the_users_traceback_and_fails_the_cell(shell, capsys):
    shell.run_cell("def add_context(**request):\n    return request['context'] + 1\n")
    capsys.readouterr()
    result = shell.run_cell(f"%%dbllm -e {CHAT} --transform-input add_context\nHi\n")
    assert isinstance(result.error_in_exec, UsageError)
    assert "transform_input 'add_context' raised KeyError: 'context'" in str(result.error_in_exec)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # no colours
    assert "add_context" in out and "request['context'] + 1" in out and "KeyError" in out


def test_dry_run_shows_the_request_and_sends_nothing(shell, workspace):
    shell.run_cell(LANGCHAIN_TRANSFORMS)
    cell(shell, f"-e {CHAT} --transform-input transform_input --dry-run -t 0.1", "Hi")
    assert not [r for r in workspace.requests if r.method == "POST"]
    data = json.loads(shown(shell)["text/plain"])
    assert shown(shell)["text/markdown"].startswith("```json\n{")
    assert data["url"] == f"{workspace.host}/serving-endpoints/{CHAT}/invocations"
    assert data["headers"]["Authorization"] == "Bearer ***"
    assert data["json"]["messages"][-1]["content"] == "Hi\n    Be Concise.\n    "
    assert workspace.token not in str(shell.display_pub.outputs)


@pytest.mark.parametrize("fmt, key, expected", [
    ("text", "text/plain", "Echo: **bold**"),
    ("markdown", "text/markdown", "Echo: **bold**"),
    ("html", "text/html", "Echo: **bold**"),
])
def test_formats(shell, fmt, key, expected):
    cell(shell, f"-e {CHAT} -f {fmt}", "**bold**")
    assert shown(shell)[key] == expected
    if fmt == "text":
        assert list(shown(shell)) == ["text/plain"]


def test_code_format_and_insert(shell):
    cell(shell, f"-e {CHAT} -f code --insert", "```python\nprint('hi')\n```")
    assert shown(shell)["text/markdown"] == "```python\nprint('hi')\n```"
    assert shown(shell)["text/plain"] == "print('hi')"
    assert shell.rl_next_input == "print('hi')"


def test_json_format_parses_through_code_fences(shell):
    cell(shell, f"-e {CUSTOM} -f json", '```json\n{"a": [1, 2]}\n```')  # custom model echoes
    assert json.loads(shown(shell)["text/plain"]) == {"a": [1, 2]} and "application/json" not in shown(shell)
    assert shown(shell)["text/markdown"].startswith("```json\n")


def test_json_format_that_does_not_parse(shell):
    with pytest.raises(UsageError, match="The answer is not valid JSON .* kept in _dbllm.text"):
        cell(shell, f"-e {CHAT} -f json --no-stream", "not json")
    assert shell.user_ns[LAST].text == "Echo: not json"
    assert shown(shell) == {"text/plain": "Echo: not json"}


def test_streaming_updates_one_output_in_place(shell, workspace):
    cell(shell, f"-e {CHAT}", " ".join(f"w{i}" for i in range(30)))
    outputs = shell.display_pub.outputs
    assert outputs[0]["transient"]["display_id"] == outputs[-1]["transient"]["display_id"]
    assert [o["update"] for o in outputs] == [False] + [True] * (len(outputs) - 1)
    assert outputs[0]["data"]["text/plain"] == "Echo:"  # the first token shows at once
    assert outputs[-1]["data"]["text/plain"] == "Echo: " + " ".join(f"w{i}" for i in range(30))


def test_a_pause_in_the_stream_shows_what_the_throttle_held_back(shell, workspace):
    workspace.fail(CHAT, stall_after=3, stall=0.4)  # "Echo:", " one", " two", then a pause
    cell(shell, f"-e {CHAT} -f text", "one two three four")
    texts = [o["data"]["text/plain"] for o in shell.display_pub.outputs]
    assert texts[0] == "Echo:"
    assert "Echo: one two" in texts  # shown during the pause, before " three" arrived
    assert texts[-1] == "Echo: one two three four"


def test_no_stream(shell, workspace):
    cell(shell, f"-e {CHAT} --no-stream", "a b c")
    assert "stream" not in sent(workspace).json
    assert len(shell.display_pub.outputs) == 1


def test_cut_stream_keeps_what_arrived_and_fails_the_cell(shell, workspace):
    workspace.fail(CHAT, cut_after=2)
    with pytest.raises(UsageError, match="was cut.*characters arrived.*kept \\(in a notebook, in _dbllm.text\\)"):
        cell(shell, f"-e {CHAT}", "one two three four")
    assert shell.user_ns[LAST].text == "Echo: one"
    assert shell.user_ns[LAST].finish_reason == "cut"
    # one place says where it is kept: the error (on main the note said _dbllm.text and the error .partial)
    assert shown(shell)["text/markdown"] == "Echo: one\n\n*The answer was cut: 9 characters.*"


def test_interrupt_stops_the_stream_and_keeps_what_arrived(shell, workspace):
    class InterruptOnThird(CapturingDisplayPublisher):
        def publish(self, data, *args, **kwargs):
            super().publish(data, *args, **kwargs)
            if len(self.outputs) == 2:
                raise KeyboardInterrupt

    workspace.chunk_delay = 0.06  # past the display throttle, so each piece is shown
    shell.display_pub = InterruptOnThird()
    with pytest.raises(KeyboardInterrupt):
        cell(shell, f"-e {CHAT}", "one two three four five six")
    assert shell.user_ns[LAST].text == "Echo: one"
    assert shell.user_ns[LAST].finish_reason == "interrupted"
    assert "interrupted: 9 characters kept in _dbllm.text" in shown(shell)["text/plain"]


def test_chat_history_reset(shell, workspace, capsys):
    cell(shell, f"-e {CHAT} --chat", "first")
    cell(shell, f"-e {CHAT} --chat", "second")
    assert sent(workspace).json["messages"] == [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "Echo: first"},
        {"role": "user", "content": "second"}]
    shell.run_line_magic("dbllm", "history")
    assert f"--- {CHAT}\nuser: first\nassistant: Echo: first\nuser: second\nassistant: Echo: second" in (
        capsys.readouterr().out)
    shell.run_line_magic("dbllm", f"reset {CHAT}")
    cell(shell, f"-e {CHAT} --chat", "third")
    assert sent(workspace).json["messages"] == [{"role": "user", "content": "third"}]
    with pytest.raises(UsageError, match="--chat keeps a conversation with a chat or agent endpoint"):
        cell(shell, f"-e {COMPLETIONS} --chat", "x")


def test_subcommands_have_an_exact_grammar_and_a_prompt_is_never_swallowed(shell, workspace):
    """On main `history of Rome` ran the history subcommand and `help` went to the model."""
    shell.run_line_magic("config", f'DbLLM.endpoint = "{CHAT}"')
    for line, words in [("history of Rome", "takes the names of kept conversations"),
                        ("reset my password", "takes the names of kept conversations"),
                        ("last week's numbers?", "takes no words after it"),
                        ("endpoints extra", "takes no words after it"), ("trace maybe", "takes on or off"),
                        ("help", "'help' is not a subcommand"), ("endpoint", "'endpoint' is not a subcommand")]:
        with pytest.raises(UsageError, match=words) as info:
            shell.run_line_magic("dbllm", line)
        assert f"write %dbllm -- {line}" in str(info.value)
        assert "whoami, endpoints, last, panel, prompts, history, reset, trace" in str(info.value) or "takes" in words
    assert invocations(workspace) == []
    shell.run_line_magic("dbllm", "-- last week's numbers?")
    shell.run_line_magic("dbllm", "Last week's numbers?")  # not a subcommand: a prompt
    assert [r.json["messages"][-1]["content"] for r in invocations(workspace)] == [
        "last week's numbers?", "Last week's numbers?"]


def test_a_line_ending_in_a_question_mark_is_a_prompt_not_a_help_request(shell, workspace):
    shell.run_line_magic("config", f'DbLLM.endpoint = "{CHAT}"')
    shell.run_cell("%dbllm How are you?\n%dbllm --no-stream -5 degrees?\nif True:\n    %dbllm What is my name?")
    assert [r.json["messages"][-1]["content"] for r in invocations(workspace)] == [
        "How are you?", "-5 degrees?", "What is my name?"]
    assert shell.run_cell("%dbllm?").success  # the magic's own help still works


def test_a_question_in_a_real_kernel_reaches_the_endpoint(workspace, monkeypatch):
    """The `?` case as a notebook runs it: a kernel of its own, through nbclient (on main IPython
    printed "Object `you` not found." and the cell passed, sending nothing)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
    cells = ["%load_ext dbmagic", f"%dbllm -e {CHAT} --no-stream How are you?",
             f"%dbllm -e {CHAT} --no-stream -5 degrees?"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=60, kernel_name="python3").execute()
    assert [r.json["messages"][-1]["content"] for r in invocations(workspace)] == ["How are you?", "-5 degrees?"]
    shown = "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in notebook.cells[1].outputs)
    assert "Echo: How are you?" in shown


def test_whoami_endpoints_last(shell, workspace):
    shell.run_line_magic("dbllm", "whoami")
    text = shown(shell)["text/plain"]
    rows = [" ".join(line.split()) for line in text.splitlines()]
    assert rows[:4] == [f"host {workspace.host}", "source environment", "auth type pat", "token ***"]
    assert "skipped 1 notebook context: not in a Databricks runtime" in " ".join(rows)  # what was tried before
    assert "databricks apps not reachable: a personal access token (Apps take OAuth only)" in rows
    assert workspace.token not in str(shell.display_pub.outputs)
    shell.run_line_magic("dbllm", "endpoints")
    table = shown(shell)["text/markdown"]
    assert f"| {CHAT} | llm/v1/chat | READY | FOUNDATION_MODEL_API | meta-llama-3.3-70b-instruct |" in table
    assert f"| {CUSTOM} | (custom model) | READY | CUSTOM_MODEL |" in table
    cell(shell, f"-e {CHAT} --no-stream", "x y")
    shell.run_line_magic("dbllm", "last")
    assert "tokens        input 2 / output 3 / total 5" in shown(shell)["text/plain"]


def test_last_after_a_batch_a_comparison_and_both(shell, workspace, capsys):
    """On main each raised a raw AttributeError."""
    shell.user_ns["rows"] = ["a", "b"]
    cell(shell, f"-e {CHAT} --over rows", "{{ row }}")
    capsys.readouterr()
    shell.run_line_magic("dbllm", "last")
    assert "2 rows in" in capsys.readouterr().out
    cell(shell, f"-e {CHAT} -e no-such-endpoint --no-stream", "x")
    shell.run_line_magic("dbllm", "last")
    table = shown(shell)["text/plain"]
    assert table.splitlines()[0].split()[:3] == ["compared", "endpoint", "served"]
    assert CHAT in table and "no-such-endpoint" in table and "not found" in table
    cell(shell, f"-e {CHAT} -t 0 -t 1 --over rows", "{{ row }}")
    shell.run_line_magic("dbllm", "last")
    assert shown(shell)["text/plain"].count("2 rows in") == 2


@pytest.mark.parametrize("line, message", [
    (f"-e {CHAT} -t hot", "argument -t/--temperature: temperature must be a number; got 'hot'."),
    (f"-e {CHAT} -t nan", "argument -t/--temperature: temperature must be a finite number; got 'nan'."),
    (f"-e {CHAT} --max-tokens many", "max_tokens must be a whole number; got 'many'."),
    (f"-e {CHAT} --max-tokens 0", "max_tokens must be at least 1; got '0'."),
    (f"-e {CHAT} --timeout -1", "timeout must be above 0 and at most 3600; got '-1'."),
    (f"-e {CHAT} --timeout inf", "timeout must be a finite number; got 'inf'."),
    (f"-e {CHAT} -f yaml", "format must be one of markdown, text, code, json, html; got 'yaml'."),
    (f"-e {CHAT} -p top_p=Infinity", "Infinity is not a finite number, and JSON cannot carry it."),
    (f"-e {CHAT} --cluster-id {CLUSTER} --port {PORT}", "Give either an endpoint or a driver-proxy app"),
    (f"-e {CHAT} --temprature 0.2", "Unknown option '--temprature' (see %%dbllm?)"),
    ("-e ../../api/2.0", "endpoint must be a plain name"),
    (f"-e {CHAT} -p novalue", "-p takes KEY=VALUE"),
    (f"-e {CHAT} -p stream=false", "-p stream=... is a setting, not a request field: answers stream by default; --no-stream"),
    (f"-e {CHAT} -p cluster_id=x", "-p cluster_id=... is a setting, not a request field: use --cluster-id."),
    (f"-e {CHAT} -o 1bad", "output must be a valid variable name (not a keyword, a __dunder__ or a builtin such as print); got '1bad'."),
    (f"-e {CHAT} -o class", "output must be a valid variable name"),
    (f"-e {CHAT} stray words", "Unexpected words after the options: 'stray words'"),
    ("", "No endpoint given: pass endpoint= (--endpoint NAME"),
    (f"-e {CHAT} -p max_tokens=5", "-p max_tokens=... is a setting, not a request field: use --max-tokens."),
    (f"-e {CHAT} --task chat -p n=\"x\"", "-p n=... is a setting, not a request field: use --n."),
])
def test_bad_option_values(shell, line, message):
    with pytest.raises(UsageError) as info:
        cell(shell, line, "Hi")
    assert message in str(info.value)


def test_errors_fail_the_cell_with_the_next_step(shell):
    result = shell.run_cell("%%dbllm -e no-such-endpoint\nHi\n")
    assert type(result.error_in_exec) is UsageError
    assert "endpoint 'no-such-endpoint' was not found" in str(result.error_in_exec)
    assert "%dbllm endpoints" in str(result.error_in_exec)


def test_empty_cell_and_no_prompt(shell):
    with pytest.raises(UsageError, match="The cell is empty"):
        cell(shell, f"-e {CHAT}", "  \n")
    with pytest.raises(UsageError, match="No prompt"):
        shell.run_line_magic("dbllm", f"-e {CHAT}")


def test_no_credentials_error_reaches_the_user(shell, monkeypatch):
    monkeypatch.delenv("DATABRICKS_HOST")
    dbmagic.configure()
    with pytest.raises(UsageError, match="No Databricks credentials found. Tried, in order"):
        cell(shell, f"-e {CHAT}", "Hi")


def test_terminal_gets_plain_text(workspace, capsys):
    out = LiveOutput("markdown", rich=False)
    for piece in ["Echo:", " **a**"]:
        out.append(piece)
    out.finish("Echo: **a**")
    assert capsys.readouterr().out == "Echo: **a**\n"


def test_live_output_throttles_updates():
    now = [0.0]
    out = LiveOutput("markdown", max_rate=20, clock=lambda: now[0])
    published = []
    out._show = lambda data, metadata=None: published.append(data["text/plain"])
    for i in range(200):  # 200 pieces over 1 second
        out.append(f"{i} ")
        now[0] += 0.005
    out.finish("final")
    assert 20 <= len(published) <= 22
    assert published[0] == "0 " and published[-1] == "final"


def test_a_streamed_answer_keeps_its_last_event_as_raw(shell, workspace):
    """The README says the whole Completion is in _dbllm; on main `raw` was None after a stream."""
    cell(shell, f"-e {CHAT}", "x")
    last = shell.user_ns["_dbllm"]
    assert last.text == "Echo: x" and isinstance(last.raw, dict) and last.raw["object"] == "chat.completion.chunk"
    assert last.endpoint == CHAT and last.kind == "chat"
