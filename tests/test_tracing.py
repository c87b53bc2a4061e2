"""MLflow traces and the Prompt Registry against a local sqlite tracking store: read back with
MLflow's own API; what the spans hold; the batch's parent/child shape; no token anywhere."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from IPython.core.error import UsageError

mlflow = pytest.importorskip("mlflow")

import dbmagic  # noqa: E402
from dbmagic import Client, RetryPolicy, StreamInterrupted
from dbmagic.frontends.panel import Panel  # noqa: E402
from dbmagic.observe import tracing

from .conftest import CHAT, COMPLETIONS, EMBEDDINGS, FakeClock, canaries_in  # noqa: E402

# where MLflow goes between the tests: the temporary default the root conftest sets (MLflow 3 takes
# set_tracking_uri(None) for ./mlflow.db in the checkout, whatever the environment says)
DEFAULT_STORE = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """One sqlite tracking store for the module (creating one costs seconds of migrations), its
    artifacts beside it; afterwards the canary audit reads every byte of both."""
    folder = tmp_path_factory.mktemp("mlflow")
    yield folder
    mlflow.set_tracking_uri(DEFAULT_STORE)
    texts = [path.read_bytes().decode("latin-1") for path in folder.rglob("*") if path.is_file()]
    assert texts, "the store is empty: the audit proves nothing"
    assert canaries_in(texts) == [], "a local workspace secret reached the MLflow store"


@pytest.fixture(scope="module")
def tracking_uri(store_dir):
    return f"sqlite:///{store_dir / 'mlflow.db'}"


def experiment_in(store_dir, name):
    """The experiment ``name``, its artifacts in the store's folder (MLflow's default is ./mlruns)."""
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=(store_dir / "artifacts" / name).as_uri())
    return mlflow.set_experiment(name)


@pytest.fixture
def store(tracking_uri, store_dir, tmp_path):
    """An experiment of its own in the local tracking store, tracing on; off again afterwards."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = experiment_in(store_dir, f"dbmagic-{tmp_path.name}")
    dbmagic.autolog()
    yield experiment
    dbmagic.autolog(disable=True)
    mlflow.set_tracking_uri(DEFAULT_STORE)


def traces(experiment):
    mlflow.flush_trace_async_logging()
    found = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
    return sorted(found, key=lambda t: t.info.request_time)


def no_token_in(found, token):
    for trace in found:
        assert token not in trace.to_json(), "the token reached a trace"
        assert token not in json.dumps(trace.info.tags) + json.dumps(trace.info.trace_metadata)


def test_a_call_is_one_span_with_request_answer_usage_and_attempts(store, workspace):
    client = Client(host=workspace.host, token=workspace.token, clock=FakeClock(), retry=RetryPolicy(attempts=3))
    workspace.fail(CHAT, 429, retry_after=0)
    completion = client.complete("Hi there", endpoint=CHAT, system="S", temperature=0.2,
                                 transform_output=str.upper)
    [trace] = traces(store)
    [span] = trace.data.spans
    assert (span.name, span.span_type, span.status.status_code) == (f"endpoint '{CHAT}'", "CHAT_MODEL", "OK")
    assert span.inputs == completion.request == {"messages": [{"role": "system", "content": "S"},
                                                              {"role": "user", "content": "Hi there"}],
                                                 "temperature": 0.2}
    assert span.outputs == completion.raw and span.outputs["choices"][0]["message"]["content"] == "[S] Echo: Hi there"
    attributes = span.attributes
    assert attributes["dbmagic.output"] == "[S] ECHO: HI THERE"  # after transform_output
    assert attributes["dbmagic.task"] == "chat" and attributes["dbmagic.params"] == {"temperature": 0.2}
    assert attributes["dbmagic.attempts"] == 2  # the 429, then the answer
    assert attributes["mlflow.chat.tokenUsage"] == {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
    assert attributes["dbmagic.latency_ms"] == round(completion.latency * 1000, 3)
    no_token_in([trace], workspace.token)


def test_span_types_streams_errors_and_cut_streams(store, workspace, client):
    client.complete("a b", endpoint=COMPLETIONS)
    client.complete("vec", endpoint=EMBEDDINGS)
    assert "".join(client.stream("one two", endpoint=CHAT)) == "Echo: one two"
    with pytest.raises(dbmagic.EndpointNotFound):
        client.complete("x", endpoint="nope", task="chat")
    workspace.fail(CHAT, cut_after=2)
    stream = client.stream("one two three four", endpoint=CHAT)
    with pytest.raises(StreamInterrupted):
        list(stream)
    found = traces(store)
    spans = [t.data.spans[0] for t in found]
    assert [s.span_type for s in spans] == ["LLM", "EMBEDDING", "CHAT_MODEL", "CHAT_MODEL", "CHAT_MODEL"]
    # a stream: the whole answer put together, and a chunk event per streamed event, as MLflow records them
    assert spans[2].outputs["choices"][0]["message"]["content"] == "Echo: one two"
    assert spans[2].attributes["dbmagic.stream"] is True and len(spans[2].events) == 3
    assert spans[3].status.status_code == "ERROR" and "was not found" in spans[3].status.description
    assert spans[4].status.status_code == "ERROR" and spans[4].outputs == "Echo: one"  # the partial text
    assert spans[4].attributes["dbmagic.finish_reason"] == "cut"
    no_token_in(found, workspace.token)


def test_a_batch_is_a_trace_a_row_tied_by_a_tag_and_one_summary(store, workspace, client):
    result = dbmagic.batch("Say {{ row }}", ["a", "b", "c"], endpoint=CHAT, concurrency=3, client=client,
                           progress=False)
    assert result.failed == []
    found = traces(store)
    assert len(found) == 4 and all(len(t.data.spans) == 1 for t in found)  # no trace holds the whole batch
    [summary] = [t for t in found if "dbmagic.row" not in t.info.tags]
    span = summary.data.spans[0]
    assert (span.name, span.span_type) == ("dbmagic.batch", "CHAIN")
    assert span.inputs == {"template": "Say {{ row }}", "rows": 3, "endpoint": CHAT}
    assert span.outputs == {"answered": 3, "failed": 0, "interrupted": False}
    batch_id = summary.info.tags["dbmagic.batch"]
    rows = tracing.rows_of(batch_id, locations=[store.experiment_id])
    assert [t.info.tags["dbmagic.row"] for t in rows] == ["0", "1", "2"]
    assert [t.data.spans[0].inputs["messages"][-1]["content"] for t in rows] == ["Say a", "Say b", "Say c"]
    assert {t.info.tags["dbmagic.batch"] for t in rows} == {batch_id}


def test_a_batch_inside_your_own_span_stays_inside_it(store, workspace, client):
    with mlflow.start_span(name="my pipeline"):
        dbmagic.batch("Say {{ row }}", ["a", "b"], endpoint=CHAT, concurrency=2, client=client, progress=False)
    [trace] = traces(store)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == "my pipeline" and len(trace.data.spans) == 4  # the batch's span and both rows under it


def test_the_magic_and_the_panel_leave_traces(store, shell, workspace):
    shell.run_cell("def shout(v):\n    return v.upper()\n")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --transform-output shout --no-stream", "from a cell")
    p = Panel(shell)
    p.endpoint.value, p.prompt.value = CHAT, "from the panel"
    p.send()
    p.wait()
    found = traces(store)
    assert [t.data.spans[0].inputs["messages"][-1]["content"] for t in found] == ["from a cell", "from the panel"]
    assert found[0].data.spans[0].attributes["dbmagic.output"] == "ECHO: FROM A CELL"
    no_token_in(found, workspace.token)


def test_switching_tracing_from_the_notebook(shell, workspace, tracking_uri, store_dir, capsys):
    mlflow.set_tracking_uri(tracking_uri)
    experiment = experiment_in(store_dir, "switches")
    try:
        shell.run_line_magic("dbllm", "trace on")
        assert tracing.enabled() and "Tracing every dbmagic call to MLflow, experiment 'switches'" in capsys.readouterr().out
        shell.run_cell_magic("dbllm", f"-e {CHAT}", "traced")
        shell.run_line_magic("dbllm", "trace off")
        shell.run_cell_magic("dbllm", f"-e {CHAT}", "not traced")
        shell.run_line_magic("config", "DbLLM.trace = True")
        shell.run_cell_magic("dbllm", f"-e {CHAT}", "traced again")
        assert [t.data.spans[0].inputs["messages"][-1]["content"] for t in traces(experiment)] == [
            "traced", "traced again"]
    finally:
        dbmagic.autolog(disable=True)
        mlflow.set_tracking_uri(DEFAULT_STORE)


def test_without_mlflow_turning_tracing_on_names_the_package(shell, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(dbmagic.ConfigurationError, match=r"pip install 'dbmagic\[mlflow\]'"):
        dbmagic.autolog()
    with pytest.raises(UsageError, match=r"pip install 'dbmagic\[mlflow\]'"):
        shell.run_line_magic("dbllm", "trace on")
    assert not tracing.enabled()


def test_registered_prompts_render_link_and_list(store, shell, workspace, capsys):
    version = dbmagic.register_prompt("summarise", "Summarise {{ notes }} for {{ audience }}.", commit_message="v1")
    assert version.uri == "prompts:/summarise/1"
    shell.user_ns.update(notes="Q3 numbers", audience="the board")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --prompt prompts:/summarise/1 --no-stream", "Keep it short.")
    sent = [r for r in workspace.requests if r.path.endswith("/invocations")][-1]
    assert sent.json["messages"][-1]["content"] == "Summarise Q3 numbers for the board.\n\nKeep it short."
    shell.run_line_magic("dbllm", f"-e {CHAT} --prompt prompts:/summarise@latest")
    assert [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json["messages"][-1][
        "content"] == "Summarise Q3 numbers for the board."
    found = traces(store)
    assert json.loads(found[0].info.tags["mlflow.linkedPrompts"]) == [{"name": "summarise", "version": "1"}]
    call = next(s for s in found[0].data.spans if s.span_type == "CHAT_MODEL")
    assert call.parent_id is not None  # the call is a child of the cell's prompt span
    shell.run_line_magic("dbllm", "prompts")
    table = shell.display_pub.outputs[-1]["data"]["text/plain"]
    assert "summarise" in table and "--prompt prompts:/summarise/1" in table


def test_prompt_errors_and_the_sandbox(store, shell, workspace):
    with pytest.raises(UsageError, match=r"Could not load prompts:/missing/1 from the MLflow Prompt Registry .*"
                                         r"`%dbllm prompts` lists the registered prompts"):
        shell.run_line_magic("dbllm", f"-e {CHAT} --prompt prompts:/missing/1")
    with pytest.raises(UsageError, match="prompt must be a prompt URI"):
        shell.run_line_magic("dbllm", f"-e {CHAT} --prompt summarise")
    dbmagic.register_prompt("sneaky", "{% if true %}{{ ''.__class__.__mro__[1].__subclasses__() }}{% endif %}")
    with pytest.raises(UsageError, match="prompts:/sneaky/1 was refused"):
        shell.run_line_magic("dbllm", f"-e {CHAT} --prompt prompts:/sneaky/1")
    assert [r for r in workspace.requests if r.path.endswith("/invocations")] == []
    # without {% %}, MLflow fills a prompt by plain substitution: the same expression is text, sent as it is
    dbmagic.register_prompt("sneaky", "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt prompts:/sneaky/2")
    sent = [r for r in workspace.requests if r.path.endswith("/invocations")][-1]
    assert sent.json["messages"][-1]["content"] == "{{ ''.__class__.__mro__[1].__subclasses__() }}"


HOSTILE_PROMPTS = {  # what a shared prompt tried on main, and the part of the error the user sees now
    "{{ get_ipython().run_cell('pwned = 1') }}": "get_ipython, which is the notebook's own state",
    "{{ In }}": "asks for In",
    "{{ os.environ }}": "its variable 'os' is a module",
    "{{ dbmagic.get_client().credentials.token.reveal() }}": "its variable 'dbmagic' is a module",
    "{{ open }}{{ cfg }}": "its variable 'cfg' is a dict with a key that is not text",
    "{{ writer('x') }}": "its variable 'writer' is a function",
    "{{ ('a' * 10) * 1000000 }}": "repeats a value past 2,000,000 characters",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "loops over more than",
    "{% for i in range(99999) %}{{ long }}{% endfor %}": "renders more than 2,000,000 characters",
    "{{ long|replace('', long) }}": "replaces text past",
    "{% set x = long %}{{ x }}": "{% set %}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}": "{% macro %}",
    "{{ '{:>999999999}'.format(1) }}": "calls format()",
    "{{ '%999999999s' % 'x' }}": "formats text with %",
    "{{ long.ljust(999999999) }}": "calls ljust()",
    "{{ long|center(999999999) }}": "No filter named 'center'",
}


def _jinja(text):
    """``text`` as a Jinja2 prompt (MLflow renders a prompt as Jinja2 only when it holds {% %})."""
    return text if "{%" in text else "{% if true %}" + text + "{% endif %}"


def test_a_registry_prompt_gets_only_its_own_plain_variables_and_never_runs_code(store, shell, workspace, tmp_path):
    """A shared prompt is someone else's text: on main it rendered with the whole namespace, so it
    could reach get_ipython, modules, files and the token; now every such Jinja2 prompt is refused
    before anything is sent, and nothing in the notebook changes."""
    shell.run_cell("import os, dbmagic\ncfg = {1: 'x'}\nlong = 'x' * 2000\n"
                   f"def writer(text):\n    open({str(tmp_path / 'written')!r}, 'w').write(text)")
    before = set(shell.user_ns)
    for i, (text, seen) in enumerate(HOSTILE_PROMPTS.items()):
        dbmagic.register_prompt(f"hostile-{i}", _jinja(text))
        with pytest.raises(UsageError) as caught:
            shell.run_line_magic("dbllm", f"-e {CHAT} --prompt prompts:/hostile-{i}/1")
        assert seen in str(caught.value), (text, str(caught.value))
    assert [r for r in workspace.requests if r.path.endswith("/invocations")] == []
    assert set(shell.user_ns) == before and "pwned" not in shell.user_ns
    assert not (tmp_path / "written").exists()


def test_a_plain_registry_prompt_is_text_filled_by_substitution_and_never_runs_code(store, shell, workspace, tmp_path):
    """The same prompts without {% %}: MLflow fills only {{ name }} variables, so each is either sent
    as its text, or refused for a variable it names (reserved, not plain data, not defined)."""
    shell.run_cell("import os, dbmagic\ncfg = {1: 'x'}\nlong = 'x' * 2000\n"
                   f"def writer(text):\n    open({str(tmp_path / 'written')!r}, 'w').write(text)")
    before = set(shell.user_ns)
    plain = [text for text in HOSTILE_PROMPTS if "{%" not in text]
    for i, text in enumerate(plain):
        dbmagic.register_prompt(f"plain-hostile-{i}", text)
        sent_before = len(workspace.requests)
        try:
            shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt prompts:/plain-hostile-{i}/1")
        except UsageError as refused:  # a variable it names: In, cfg (not plain data), os.environ (undefined)
            assert any(w in str(refused) for w in ("asks for", "is a dict", "needs")), str(refused)
            assert len(workspace.requests) == sent_before
        else:
            assert workspace.requests[-1].json["messages"][-1]["content"] == text  # the text, as MLflow leaves it
    assert set(shell.user_ns) - {"_dbllm"} == before - {"_dbllm"} and "pwned" not in shell.user_ns
    assert not (tmp_path / "written").exists()


def test_a_registry_prompt_renders_its_variables_loops_and_filters_with_the_cell_after_it(store, shell, workspace):
    shell.run_cell("import numpy as np\nname = 'Ada'\nself = 'me'\ntopics = ['tea', 'maths']\n"
                   "meta = {'year': np.int64(1843)}")
    dbmagic.register_prompt("letter", "Dear {{ name|upper }} ({{ self }}, {{ meta.year }}):\n"
                                      "{% for t in topics %}- {{ t }}\n{% endfor %}"
                                      "{% if meta.year > 1800 %}modern{% endif %}")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --prompt prompts:/letter/1 --no-stream", "Cell: {{ topics|length }}")
    sent = [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json["messages"][-1]["content"]
    assert sent == "Dear ADA (me, 1843):\n- tea\n- maths\nmodern\n\nCell: 2"
def test_traces_of_oauth_calls_and_failures_hold_no_token_or_client_secret(store, workspace, clean_env):
    """Calls signed in with an OAuth M2M token (from a client secret), answered, failed and
    streamed, with server text that echoes the secret: the trace holds none of it (and the store
    audit of `store_dir` reads every byte)."""
    secret = workspace.add_service_principal("sp-trace")
    (clean_env / ".databrickscfg").write_text(f"[sp]\nhost = {workspace.host}\nclient_id = sp-trace\n"
                                               f"client_secret = {secret}\n")
    client = Client(profile="sp")
    client.complete("one", endpoint=CHAT)
    workspace.fail(CHAT, 500, body={"error_code": "INTERNAL_ERROR", "message": f"echo {secret}"},
                   headers={"x-request-id": f"req-{secret}"})
    with pytest.raises(dbmagic.ServerError):
        client.complete("two", endpoint=CHAT)
    "".join(client.stream("three", endpoint=CHAT))
    found = traces(store)
    assert len(found) == 3 and [t.info.state for t in found] == ["OK", "ERROR", "OK"]
    assert all(canaries_in([t.to_json()]) == [] for t in found)


def test_a_call_that_fails_before_its_request_is_an_error_span_and_a_dry_run_is_none(store, shell, workspace):
    """On main an endpoint that was not found left no trace, while a 400 or a 500 gave an error span."""
    client = Client(host=workspace.host, token=workspace.token)
    with pytest.raises(dbmagic.EndpointNotFound):
        client.complete("lost", endpoint="no-such-endpoint")
    with pytest.raises(UsageError):
        shell.run_cell_magic("dbllm", "-e no-such-endpoint --dry-run", "not a call")
    [trace] = traces(store)
    [span] = trace.data.spans
    assert (span.name, span.status.status_code, trace.info.state) == ("endpoint 'no-such-endpoint'", "ERROR", "ERROR")
    assert span.inputs == {"prompt": "lost"} and "not found" in span.attributes["dbmagic.error"]


def test_import_and_load_ext_do_not_load_mlflow():
    code = ("import sys, dbmagic; from IPython.core.interactiveshell import InteractiveShell; "
            "InteractiveShell.instance().run_line_magic('load_ext', 'dbmagic'); print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_schema_retry_records_both_attempts_and_a_tool_run_its_tool_span(store, workspace):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(CHAT, off_schema=True)
    completion = client.complete("I love it", endpoint=CHAT, schema="label: str, n: int")
    [trace] = traces(store)
    parent, first, second = sorted(trace.data.spans, key=lambda s: s.start_time_ns)
    assert first.parent_id == second.parent_id == parent.span_id
    assert first.status.status_code == "ERROR" and "label: 12345 is not of type 'string'" in first.status.description
    assert first.inputs["messages"] == [{"role": "user", "content": "I love it"}]
    assert second.status.status_code == parent.status.status_code == "OK"
    assert second.inputs["messages"][-1]["content"].startswith("Your answer did not fit the JSON Schema")
    assert parent.attributes["dbmagic.output"] == completion.value
    # the parent's usage is both attempts' (MLflow counts it once: it skips the children of a span with usage)
    assert parent.attributes["mlflow.chat.tokenUsage"]["total_tokens"] == completion.usage.total == sum(
        s.attributes["mlflow.chat.tokenUsage"]["total_tokens"] for s in (first, second))

    def weather(city: str) -> str:
        """The weather."""
        return f"sunny in {city}"

    client.complete("weather in Paris", endpoint=CHAT, tools=[weather], run_tools=True)
    latest = traces(store)[-1]
    kinds = sorted((s.span_type, s.name) for s in latest.data.spans)
    assert ("TOOL", "weather") in kinds and len(kinds) == 4  # the call, two round trips, the tool run
    tool = next(s for s in latest.data.spans if s.span_type == "TOOL")
    assert tool.inputs == {"city": "weather in Paris"} and tool.outputs == "sunny in weather in Paris"
    no_token_in(traces(store), workspace.token)


def test_a_schema_that_never_fits_is_an_error_span_with_the_answer(store, workspace):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(CHAT, off_schema=True)
    with pytest.raises(dbmagic.SchemaError):
        client.complete("I love it", endpoint=CHAT, schema="n: int", schema_retries=0)
    [trace] = traces(store)
    [span] = trace.data.spans
    assert span.status.status_code == "ERROR" and "does not fit the schema" in span.status.description
    assert span.outputs["choices"][0]["message"]["content"] == '{"n": "many"}'


# -- the same trace MLflow's own OpenAI autologger writes ---------------------------------------------

def _openai_autolog_span(workspace, store, **create):
    """The span mlflow.openai.autolog() writes for the same call through the openai client (the
    OpenAI-compatible route of the local workspace), read back from the store."""
    openai = pytest.importorskip("openai")
    dbmagic.autolog(disable=True)
    mlflow.openai.autolog()
    try:
        client = openai.OpenAI(base_url=f"{workspace.host}/serving-endpoints", api_key=workspace.token)
        answer = client.chat.completions.create(model=CHAT, **create)
        if create.get("stream"):
            list(answer)
    finally:
        mlflow.openai.autolog(disable=True)
        dbmagic.autolog()
    return traces(store)[-1].data.spans[0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_chat_call_is_traced_as_mlflows_openai_autologger_traces_it(store, workspace, client, stream):
    messages = [{"role": "user", "content": "Hi there"}]
    theirs = _openai_autolog_span(workspace, store, messages=messages, temperature=0.2, stream=stream,
                                  **({"stream_options": {"include_usage": True}} if stream else {}))
    call = client.call(client.prepare("Hi there", CHAT, temperature=0.2, stream=stream))
    call.wait()
    ours = traces(store)[-1].data.spans[0]
    assert ours.span_type == theirs.span_type == "CHAT_MODEL"
    for key in ("mlflow.message.format", "mlflow.chat.tokenUsage", "temperature"):
        assert ours.attributes[key] == theirs.attributes[key], key
    assert ours.inputs["messages"] == theirs.inputs["messages"] == messages
    for answer in (ours.outputs, theirs.outputs):  # a whole chat completion, streamed or not
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == "Echo: Hi there"
        assert answer["usage"]["total_tokens"] == 5
    assert [e.name for e in ours.events] == [e.name for e in theirs.events]  # the chunks, one event each
    if stream:
        assert json.loads(ours.events[0].attributes["mlflow.chunk.value"])["choices"][0]["delta"]["role"] == "assistant"
    # deliberately not theirs: the endpoint's name and provider, which MLflow prices from its Databricks
    # catalog (the served model's name in the answer, which the autologger records, has no price)
    assert (ours.attributes["mlflow.llm.model"], ours.attributes["mlflow.llm.provider"]) == (CHAT, "databricks")
    assert theirs.attributes["mlflow.llm.model"] == "meta-llama-3.3-70b-instruct"


def test_cost_appears_when_mlflow_has_a_price_for_the_model(store, workspace, client):
    # the tests' catalog (tests/model_catalog) prices the chat endpoint at 0.5 and 1.5 per token
    client.complete("Hi there", endpoint=CHAT)
    [trace] = traces(store)
    span = trace.data.spans[0]
    assert span.attributes["mlflow.llm.cost"] == {"input_cost": 1.0, "output_cost": 4.5, "total_cost": 5.5}
    assert trace.info.token_usage == {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}


def test_an_external_model_is_priced_by_its_own_name_and_provider(store, workspace, client):
    client.complete("a b", endpoint=COMPLETIONS)  # EXTERNAL_MODEL: local-instruct from provider "local"
    span = traces(store)[-1].data.spans[0]
    assert (span.attributes["mlflow.llm.model"], span.attributes["mlflow.llm.provider"]) == ("local-instruct", "local")
    assert span.attributes["mlflow.message.format"] == "openai"


def test_tools_offered_are_recorded_for_the_chat_view(store, workspace, client):
    def lookup(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    client.complete("weather in Paris?", endpoint=CHAT, tools=[lookup])
    span = traces(store)[-1].data.spans[0]
    [tool] = span.attributes["mlflow.chat.tools"]
    assert tool["type"] == "function" and tool["function"]["name"] == "lookup"


# -- registry prompts rendered exactly as MLflow renders them -------------------------------------------

PARITY = [  # (template, the notebook's values): dbmagic's rendering must equal PromptVersion.format's
    ("Summarise {{ notes }} for {{audience}}.", {"notes": "Q3", "audience": "the board"}),
    ('Answer as {{"label": "pos"}} for {{ text }}', {"text": "great film"}),  # JSON braces are text
    ("Ticket {#id} says: {{ text }}", {"text": "it broke"}),  # {# is no comment without {% %}
    ("{{ text }} and {{ text }} again, {{ n }} times", {"text": "x", "n": 3}),
    ("Hello {% if name %}{{ name }}{% else %}Guest{% endif %}!", {}),  # Jinja2: an unset name is allowed
    ("Hello {% if name %}{{ name }}{% else %}Guest{% endif %}!", {"name": "Ada"}),
    ("{% for t in topics %}- {{ t|upper }}\n{% endfor %}{{ missing }}end\n", {"topics": ["tea", "maths"]}),
    ([{"role": "system", "content": "You are a {{ style }} assistant."},
      {"role": "user", "content": "{{ question }}"}], {"style": "terse", "question": "Why is the sky blue?"}),
    ([{"role": "system", "content": "{% if style %}Be {{ style }}.{% else %}Be kind.{% endif %}"},
      {"role": "user", "content": "Hi {{ who }}"}], {"who": "there"}),
]


@pytest.mark.parametrize(("template", "values"), PARITY, ids=[f"t{i}" for i in range(len(PARITY))])
def test_a_registry_prompt_renders_exactly_as_prompt_version_format(store, shell, workspace, template, values):
    version = dbmagic.register_prompt("parity", template)
    expected = version.format(**values)
    shell.user_ns.update(values)
    shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt {version.uri}")
    sent = [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json["messages"]
    if isinstance(template, str):
        assert sent == [{"role": "user", "content": expected}]
    else:  # a chat prompt: its messages, as they are
        assert sent == expected


def test_a_plain_prompt_with_a_variable_unset_names_it_and_var_fills_it(store, shell, workspace):
    version = dbmagic.register_prompt("needs", "Write for {{ audience }} about {{ topic.name }}.")
    with pytest.raises(UsageError, match=r"needs audience, topic\.name, which are not defined .*--var NAME=VALUE"):
        shell.run_line_magic("dbllm", f"-e {CHAT} --prompt {version.uri}")
    shell.user_ns["audience"] = "the notebook's"
    shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt {version.uri} --var audience=engineers "
                                  "--var topic.name=caching")
    sent = [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json["messages"][-1]["content"]
    assert sent == version.format(audience="engineers", **{"topic.name": "caching"}) == \
        "Write for engineers about caching."
    with pytest.raises(UsageError, match="--var fills a registry prompt's variables"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --var a=1", "no prompt here")


def test_a_chat_prompt_sends_its_messages_with_the_cell_as_a_last_turn_and_only_to_chat_endpoints(store, shell,
                                                                                                  workspace):
    version = dbmagic.register_prompt("helper", [{"role": "system", "content": "You are {{ style }}."},
                                                 {"role": "user", "content": "About {{ topic }}:"}])
    shell.user_ns.update(style="brief", topic="tides")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream --prompt {version.uri}", "Two lines, please.")
    sent = [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json["messages"]
    assert sent == [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "About tides:"},
                    {"role": "user", "content": "Two lines, please."}]
    shell.run_line_magic("dbllm", f"-e local-responses-agent --no-stream --prompt {version.uri}")
    assert [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json["input"] == sent[:2]
    before = len(workspace.requests)
    with pytest.raises(UsageError, match="A chat prompt is a list of messages, which go with a chat or agent endpoint"):
        shell.run_line_magic("dbllm", f"-e {COMPLETIONS} --prompt {version.uri}")
    with pytest.raises(UsageError, match="--system and --chat have nothing to add"):
        shell.run_line_magic("dbllm", f"-e {CHAT} --system Hi --prompt {version.uri}")
    assert [r.path for r in workspace.requests[before:] if r.path.endswith("/invocations")] == []


def test_a_prompts_response_format_and_model_config_reach_the_request_unless_the_cell_sets_them(store, shell,
                                                                                                workspace):
    version = dbmagic.register_prompt(
        "graded", "Grade {{ text }}.", response_format={"type": "object", "properties": {"score": {"type": "integer"}},
                                                        "required": ["score"], "additionalProperties": False},
        model_config={"temperature": 0.1, "max_tokens": 64, "top_p": 0.5, "stop_sequences": ["END"]})
    shell.user_ns["text"] = "an essay"
    shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt {version.uri} -o graded")
    body = [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["stop"]) == (0.1, 64, 0.5, ["END"])
    assert body["response_format"]["json_schema"]["schema"]["properties"] == {"score": {"type": "integer"}}
    # the answer read as data by the prompt's schema (the local workspace answers an integer with the word count)
    assert shell.user_ns["graded"] == {"score": len("Grade an essay.".split())}
    shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt {version.uri} -t 0.9 --max-tokens 8")
    body = [r for r in workspace.requests if r.path.endswith("/invocations")][-1].json
    assert (body["temperature"], body["max_tokens"], body["top_p"]) == (0.9, 8, 0.5)  # the cell's flags win


def test_a_prompts_response_format_that_points_outside_itself_is_refused_and_nothing_is_read(store, shell,
                                                                                                 workspace, tmp_path):
    """Hardening round three, item 1: on main a registry prompt's $ref made the kernel read a local
    file after the paid call, and quoted it back to the endpoint and in the cell."""
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"type": "integer", "description": "PRIVATE-FILE-CONTENT"}))
    version = dbmagic.register_prompt(
        "reaching", "Grade {{ text }}.",
        response_format={"type": "object", "properties": {"score": {"$ref": private.as_uri()}}, "required": ["score"]})
    shell.user_ns["text"] = "an essay"
    before = len(workspace.requests)
    with pytest.raises(UsageError) as info:
        shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt {version.uri}")
    assert "outside the schema" in str(info.value) and "PRIVATE" not in str(info.value)
    assert [r for r in workspace.requests[before:] if r.path.endswith("/invocations")] == []


def test_an_alias_resolves_once_and_the_trace_links_the_version_sent_in_unity_catalog_names(store, shell, workspace):
    name = "main.default.summarise"  # a Unity Catalog name, as Databricks names prompts
    first = dbmagic.register_prompt(name, "First: {{ text }}")
    second = dbmagic.register_prompt(name, "Second: {{ text }}")
    mlflow.genai.set_prompt_alias(name, alias="prod", version=first.version)
    shell.user_ns["text"] = "x"
    shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt prompts:/{name}@prod")
    mlflow.genai.set_prompt_alias(name, alias="prod", version=second.version)
    shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream --prompt prompts:/{name}@prod")
    sent = [r.json["messages"][-1]["content"] for r in workspace.requests if r.path.endswith("/invocations")]
    assert sent == ["First: x", "Second: x"]
    linked = [json.loads(t.info.tags["mlflow.linkedPrompts"]) for t in traces(store)]
    assert linked == [[{"name": name, "version": "1"}], [{"name": name, "version": "2"}]]


def test_a_call_the_cache_answers_is_traced_as_cached(store, workspace, client, tmp_path):
    dbmagic.use_cache(tmp_path / "cache")
    try:
        client.complete("Hi", endpoint=CHAT, temperature=0)
        client.complete("Hi", endpoint=CHAT, temperature=0)
    finally:
        dbmagic.use_cache(None)
    first, second = (t.data.spans[0] for t in traces(store))
    assert "dbmagic.cached" not in first.attributes and second.attributes["dbmagic.cached"] is True
    assert len([r for r in workspace.requests if r.path.endswith("/invocations")]) == 1


@pytest.mark.parametrize("split", [None, 5])
def test_an_echoed_token_never_reaches_a_trace(store, workspace, client, split):
    """Hardening round three, item 4: on main an endpoint that echoes headers put the token into the
    MLflow trace (its outputs, its chunk events)."""
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("echo-proxy", "llm/v1/chat", echo_headers=True))
    if split:
        workspace.fail("echo-proxy", chunk_chars=split)
    for _piece in client.stream("hello", endpoint="echo-proxy"):
        pass
    client.complete("hello", endpoint="echo-proxy")
    found = traces(store)
    assert len(found) == 2
    no_token_in(found, workspace.token)
    text = json.dumps([t.to_dict() for t in found])
    assert "Bearer ***" in text and workspace.token[:20] not in text
    if split:  # the split secret: the chunk events are left out, an event says so
        events = [e.name for e in found[0].data.spans[0].events]
        assert "dbmagic.scrubbed" in events and not any(n.startswith("mlflow.chunk.item") for n in events)


def test_an_image_call_is_traced_as_mlflows_openai_autologger_traces_it(store, workspace, client):
    """Issue 35: the image parts go into the span's inputs as the OpenAI autologger records them."""
    pytest.importorskip("PIL")
    import io

    from PIL import Image

    from dbmagic.prompts.templating import Template

    out = io.BytesIO()
    Image.new("RGB", (40, 30), (5, 6, 7)).save(out, "PNG")
    parts = Template("What is this? {{ image(p) }}").render({"p": out.getvalue()})
    client.complete(parts, endpoint=CHAT, temperature=0.2)
    ours = traces(store)[-1].data.spans[0]
    messages = workspace.requests[-1].json["messages"]  # what the server received, sent again by openai
    theirs = _openai_autolog_span(workspace, store, messages=messages, temperature=0.2)
    assert messages[-1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")

    def kept(span):  # MLflow keeps each image as a trace attachment, named by a fresh id in that trace
        return re.sub(r"mlflow-attachment://[0-9a-f-]+\?(.*)&trace_id=tr-[0-9a-f]+", r"mlflow-attachment://ID?\1",
                      json.dumps(span.inputs["messages"]))

    assert kept(ours) == kept(theirs)
    assert "mlflow-attachment://ID?content_type=image%2Fpng&size=" in kept(ours)
    assert ours.outputs["choices"][0]["message"]["content"] == theirs.outputs["choices"][0]["message"]["content"] \
        == "Echo: What is this? [image/png 40x30]"
