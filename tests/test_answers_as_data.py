"""Answers as data over real HTTP: schemas in every front end, typed batch columns, tool calls."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from pydantic import BaseModel

import dbmagic
from dbmagic import Client, ConfigurationError, SchemaError, SettingError
from dbmagic.call.schema import extract_json, schema_of
from dbmagic.testing import Endpoint, schema_reply

from .conftest import CHAT, COMPLETIONS, CUSTOM

RESPONSES = "local-responses-agent"
SHORT = "label: str, score: float, tags: list[str], reason: str?"


class Ticket(BaseModel):
    label: str
    score: float


def posts(workspace, name=None):
    return [r for r in workspace.requests if r.method == "POST" and (name is None or f"/{name}/" in r.path)]


def short_schema(text=SHORT):
    return schema_of(text).json_schema


# -- the short form ------------------------------------------------------------------------------

def test_the_short_form_parses_every_documented_type():
    schema = schema_of("a: str, b: int, c: float, d: bool, e: list[str], f: list[list[int]], g: 'pos'|'neg', "
                       "h: str?, i: 'x'|\"y\"?, j: list[float]?")
    assert schema.json_schema == {
        "type": "object", "additionalProperties": False,
        "required": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"],
        "properties": {
            "a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "number"}, "d": {"type": "boolean"},
            "e": {"type": "array", "items": {"type": "string"}},
            "f": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            "g": {"type": "string", "enum": ["pos", "neg"]},
            "h": {"type": ["string", "null"]},
            "i": {"anyOf": [{"type": "string", "enum": ["x", "y"]}, {"type": "null"}]},
            "j": {"type": ["array", "null"], "items": {"type": "number"}}}}
    assert schema.strict  # every field required, no other allowed: what strict structured output takes
    # an optional field may be left out or null; the others must be there, with their types
    assert schema.validate({"a": "x", "b": 1, "c": 1.5, "d": True, "e": [], "f": [[1]], "g": "neg"})["h"] is None
    with pytest.raises(SchemaError) as refused:
        schema.validate({"a": "x", "b": 1.5, "c": 1, "d": True, "e": [], "f": [], "g": "pos"})
    assert refused.value.field == "b" and "1.5 is not of type 'integer'" in str(refused.value)


@pytest.mark.parametrize(("written", "said"), [
    ("label", "is a name, not a schema"),
    ("label: string", "'label' has the type 'string'; the short form is NAME: TYPE"),
    ("label: str, label: int", "names the field 'label' twice"),
    ("tags: list[str", "'tags' has the type 'list[str'"),
    ("2x: int", "'2x' is not a field name"),
    ("a: str,, b: int", "has an empty field"),
    ("a:", "'a' has the type '(none)'"),
    ("mood: 'pos'|neg", "the choices of 'mood' are quoted words"),
    ("a str", "'a str' has no type"),
])
def test_a_malformed_short_form_is_refused_with_the_way_to_write_it(written, said):
    with pytest.raises(SettingError) as refused:
        schema_of(written)
    assert said in str(refused.value)


def test_json_is_found_in_fences_and_prose_and_a_bad_schema_is_refused_before_sending():
    assert extract_json('{"a": 1}') == (True, {"a": 1})
    assert extract_json('Sure! Here it is:\n```json\n{"a": [1, 2]}\n```\nAnything else?') == (True, {"a": [1, 2]})
    assert extract_json('The answer is {"a": "}"} as asked.') == (True, {"a": "}"})
    assert extract_json("no json { here") == (False, None)
    assert extract_json("[" * 100_000) == (False, None)  # bounded: prose cannot make it slow or recurse
    with pytest.raises(SettingError, match="not valid JSON Schema"):
        schema_of({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(SettingError, match="a name, not a schema"):
        schema_of("Ticket")
    assert schema_of({"name": "t", "schema": {"type": "object"}, "strict": False}).wire() == {
        "name": "t", "schema": {"type": "object"}, "strict": False}


# -- on the wire, per kind -----------------------------------------------------------------------

def test_chat_gets_response_format_and_the_value_is_parsed(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    completion = client.complete("I love it", endpoint=CHAT, schema=SHORT)
    assert posts(workspace)[-1].json == {
        "messages": [{"role": "user", "content": "I love it"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": short_schema(),
                                                                    "strict": True}}}
    assert completion.value == schema_reply(short_schema(), "I love it") == {
        "label": "I love it", "score": 0.3, "tags": ["I", "love", "it"], "reason": "I love it"}
    assert json.loads(completion.text) == completion.value  # the raw answer stays in .text
    model = client.complete("I love it", endpoint=CHAT, schema=Ticket)
    assert model.value == Ticket(label="I love it", score=0.3)
    sent = posts(workspace)[-1].json["response_format"]["json_schema"]
    assert sent == {"name": "Ticket", "schema": Ticket.model_json_schema(), "strict": False}


def test_a_streamed_answer_is_parsed_too(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    call = client.stream("one two three four", endpoint=CHAT, schema=Ticket)
    pieces = list(call)
    assert len(pieces) > 1 and call.completion.value == Ticket(label="one two three four", score=0.4)
    assert posts(workspace)[-1].json["stream"] is True


def test_responses_agents_get_text_format(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    for stream in (False, True):
        call = client.call(client.prepare("a b", RESPONSES, schema="n: int, ok: bool", stream=stream))
        assert call.wait().value == {"n": 2, "ok": True}
        assert posts(workspace)[-1].json["text"] == {"format": {
            "type": "json_schema", "name": "answer", "schema": short_schema("n: int, ok: bool"), "strict": True}}
        assert "response_format" not in posts(workspace)[-1].json


@pytest.mark.parametrize("kind", ["completions", "custom", "proxy"])
def test_kinds_without_a_schema_on_the_wire_get_it_as_an_instruction(workspace, kind):
    client = Client(host=workspace.host, token=workspace.token)
    target = {"completions": {"endpoint": COMPLETIONS}, "custom": {"endpoint": CUSTOM},
              "proxy": {"cluster_id": "0123-456789-local", "port": 7777}}[kind]
    completion = client.complete("Rate this", schema="label: str, n: int", **target)
    assert completion.value == {"label": "Rate this", "n": 2}
    assert "```json" in completion.text  # the model fenced it, with prose before: tolerated
    body = posts(workspace)[-1].json
    prompt = body["dataframe_records"][0]["prompt"] if kind == "custom" else body["prompt"]
    assert prompt == "Rate this\n\n" + schema_of("label: str, n: int").instruction()
    assert "response_format" not in body


def test_a_schema_on_an_embeddings_endpoint_is_refused_before_sending(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    with pytest.raises(ConfigurationError, match="answers embeddings"):
        client.complete("x", endpoint="databricks-gte-large-en", schema=SHORT)
    assert posts(workspace) == []


def test_databricks_refuses_a_json_schema_without_a_name_and_dbmagic_always_sends_one(workspace):
    import requests

    sent = {"messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}
    answer = requests.post(f"{workspace.host}/serving-endpoints/{CHAT}/invocations", json=sent,
                           headers={"Authorization": f"Bearer {workspace.token}"}, timeout=10)
    assert answer.status_code == 400 and "json_schema.name is required" in answer.text
    client = Client(host=workspace.host, token=workspace.token)
    weird = schema_of({"title": "My ticket!", "type": "object", "properties": {"a": {"type": "string"}}})
    assert client.complete("x", endpoint=CHAT, schema=weird).value == {"a": "x"}
    assert posts(workspace)[-1].json["response_format"]["json_schema"]["name"] == "My_ticket"


# -- an answer that does not fit -------------------------------------------------------------------

def test_an_answer_that_does_not_fit_is_asked_for_again_with_the_problem(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(CHAT, off_schema=True)
    completion = client.complete("I love it", endpoint=CHAT, schema=Ticket)
    first, second = posts(workspace)
    assert first.json["messages"] == [{"role": "user", "content": "I love it"}]
    assert second.json["messages"][:2] == [{"role": "user", "content": "I love it"},
                                           {"role": "assistant", "content": '{"label": 12345, "score": 0.3}'}]
    assert second.json["messages"][2] == {"role": "user", "content": (
        "Your answer did not fit the JSON Schema (label: Input should be a valid string). Answer again with only "
        "JSON that fits the schema.")}
    assert isinstance(completion.value, Ticket) and [s.why for s in completion.steps] == ["retry"]
    # the usage is both round trips' (the local workspace counts a word of every turn as a prompt token)
    assert completion.steps[0].completion.usage.input == 3
    assert completion.usage.input == 3 + sum(len(m["content"].split()) for m in second.json["messages"])


def test_one_that_never_fits_is_a_schema_error_with_the_raw_text_kept(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(CHAT, off_schema=True, times=2)
    with pytest.raises(SchemaError) as refused:
        client.complete("I love it", endpoint=CHAT, schema=SHORT)
    error = refused.value
    assert error.field == "label" and error.attempts == 2 and len(posts(workspace)) == 2
    assert json.loads(error.text)["label"] == 12345
    assert "does not fit the schema 'label: str, score: float, tags: list[str], reason: str?': label: 12345 is not " \
           "of type 'string'" in str(error)
    assert error.completion.text == error.text and error.completion.usage.input > 3  # both answers were paid for
    workspace.clear()
    workspace.fail(CHAT, off_schema=True)
    with pytest.raises(SchemaError):
        client.complete("I love it", endpoint=CHAT, schema=SHORT, schema_retries=0)
    assert len(posts(workspace)) == 1


def test_a_completions_retry_extends_the_prompt(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(COMPLETIONS, off_schema=True)
    assert client.complete("Rate", endpoint=COMPLETIONS, schema="n: int").value == {"n": 1}
    first, second = posts(workspace)
    assert second.json["prompt"].startswith(first.json["prompt"] + "\n\nYour answer was:\nHere is the JSON")
    assert second.json["prompt"].endswith("Answer again with only JSON that fits the schema.")


# -- the front ends --------------------------------------------------------------------------------

def test_the_magic_stores_the_value_and_shows_a_table(shell, workspace):
    shell.run_cell("from pydantic import BaseModel\nclass Ticket(BaseModel):\n    label: str\n    score: float\n")
    shell.run_line_magic("config", f'DbLLM.endpoint = "{CHAT}"')
    result = shell.run_cell("%%dbllm --schema Ticket -o t\nI love it")
    assert result.success
    t = shell.user_ns["t"]
    assert type(t).__name__ == "Ticket" and (t.label, t.score) == ("I love it", 0.3)
    shown = shell.display_pub.outputs[-1]["data"]
    assert "| field | value |" in shown["text/markdown"] and "| score | 0.3 |" in shown["text/markdown"]
    # a table wherever it shows: no application/json, which JupyterLab 4 would show as a tree (on main it was there)
    assert "application/json" not in shown
    assert shell.display_pub.outputs[-1]["metadata"]["dbmagic"]["value"] == {"label": "I love it", "score": 0.3}
    shell.run_line_magic("config", f'DbLLM.schema = "{SHORT}"')
    assert shell.run_cell("%%dbllm -o d --no-stream\nI love it").success
    assert shell.user_ns["d"]["tags"] == ["I", "love", "it"]


def test_the_magic_fails_the_cell_on_an_answer_that_never_fits_and_keeps_it(shell, workspace):
    workspace.fail(CHAT, off_schema=True, times=2)
    result = shell.run_cell(f'%%dbllm -e {CHAT} --schema "n: int"\nI love it')
    assert not result.success and "does not fit the schema" in str(result.error_in_exec)
    assert json.loads(shell.user_ns["_dbllm"].text) == {"n": "many"}
    assert "kept in _dbllm.text" in shell.display_pub.outputs[-1]["data"]["text/plain"]
    for line, said in ((f'-e {CHAT} --schema Nope', "schema 'Nope' is not defined in the notebook"),
                       (f'-e {CHAT} --schema "a: strr"', "'a' has the type 'strr'"),
                       (f'-e {CHAT} --schema-retries 9 --schema "a: str"', "schema_retries must be at least 0 and at most 5"),
                       (f'-e {CHAT} --run-tools', "--run-tools runs the functions named in --tools")):
        bad = shell.run_cell(f"%%dbllm {line}\nx")
        assert not bad.success and said in str(bad.error_in_exec), line


def test_the_panel_takes_a_schema_under_more_options(shell, workspace):
    from dbmagic import Panel

    shell.user_ns["Ticket"] = Ticket
    p = Panel(shell)
    try:
        p.controls["schema"].value = "Ticket"
        p.endpoint.value = CHAT
        p.prompt.value = "I love it"
        p.send_button.click()
        p.wait()
        assert p.result.value == Ticket(label="I love it", score=0.3)
        assert posts(workspace)[-1].json["response_format"]["json_schema"]["name"] == "Ticket"
        assert "--schema=Ticket" in p.as_cell()
    finally:
        p.stop()
        p.wait()


def test_compare_parses_each_column(shell, workspace):
    shell.user_ns["Ticket"] = Ticket
    assert shell.run_cell(f"%%dbllm -e {CHAT} -e {RESPONSES} --schema Ticket -o c\nI love it").success
    compared = shell.user_ns["c"]
    assert compared[CHAT].value == compared[RESPONSES].value == Ticket(label="I love it", score=0.3)
    assert '{"label": "I love it", "score": 0.3}' in shell.display_pub.outputs[-1]["data"]["text/plain"]


def test_a_200_row_batch_has_typed_columns_with_failed_rows_in_place(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    frame = pd.DataFrame({"id": range(200), "text": [f"ticket number {i}" for i in range(200)]})
    workspace.fail(CHAT, off_schema=True, times=2)  # the first row sent fails twice: it keeps its place
    out = dbmagic.batch("{{ text }}", frame, CHAT, client=client, progress=False, concurrency=1,
                        schema="label: str, n: int, score: float, ok: bool, tags: list[str], why: str?")
    assert list(out.columns) == ["id", "text", "label", "n", "score", "ok", "tags", "why", "error", "answer_raw"]
    assert {c: str(t) for c, t in out.dtypes.items()} == {
        "id": "int64", "text": "object", "label": "string", "n": "Int64", "score": "Float64", "ok": "boolean",
        "tags": "object", "why": "string", "error": "object", "answer_raw": "object"}
    failed = out.iloc[0]
    assert pd.isna(failed["label"]) and pd.isna(failed["n"]) and failed["tags"] is None
    assert "label: 12345 is not of type 'string'" in failed["error"] and json.loads(failed["answer_raw"])["label"] == 12345
    rest = out.iloc[1:]
    assert rest["error"].isna().all() and rest["answer_raw"].isna().all()
    assert list(rest["label"]) == [f"ticket number {i}" for i in range(1, 200)]
    assert list(rest["n"]) == [3] * 199 and list(rest["tags"].iloc[:1]) == [["ticket", "number", "1"]]
    assert len(posts(workspace)) == 201  # the failed row was asked twice


def test_a_batch_refuses_a_field_that_is_already_a_column(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    frame = pd.DataFrame({"label": ["x"]})
    with pytest.raises(ConfigurationError, match="schema's field 'label' would be a column"):
        dbmagic.batch("{{ label }}", frame, CHAT, client=client, progress=False, schema="label: str")
    assert posts(workspace) == []


def test_over_in_the_magic_returns_typed_columns(shell, workspace):
    shell.user_ns["tickets"] = pd.DataFrame({"text": ["a b", "c d e"]})
    assert shell.run_cell(f'%%dbllm -e {CHAT} --over tickets --schema "n: int, ok: bool" -o out\n{{{{ text }}}}').success
    out = shell.user_ns["out"]
    assert list(out["n"]) == [2, 3] and str(out["n"].dtype) == "Int64" and list(out["ok"]) == [True, False]


# -- tool calls ------------------------------------------------------------------------------------

def weather(city: str, unit: str = "C") -> str:
    """The weather in a city now.

    More words that are not the description."""
    return f"15 {unit} in {city}"


def test_tools_become_definitions_and_the_calls_are_shown_not_run(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    ran = []
    completion = client.complete("weather in Paris", endpoint=CHAT, tools=[lambda_free(ran)])
    assert posts(workspace)[-1].json["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "The weather in a city now.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string"}, "unit": {"type": "string", "default": "C"}}}}}]
    [call] = completion.tool_calls
    assert (call.name, call.arguments, call.ran) == ("weather", {"city": "weather in Paris"}, False)
    assert completion.finish_reason == "tool_calls" and ran == [] and len(posts(workspace)) == 1


def lambda_free(ran):
    def weather(city: str, unit: str = "C") -> str:
        """The weather in a city now."""
        ran.append(city)
        return f"15 {unit} in {city}"
    return weather


@pytest.mark.parametrize("endpoint", [CHAT, RESPONSES])
@pytest.mark.parametrize("stream", [False, True])
def test_run_tools_sends_the_results_back(workspace, endpoint, stream):
    client = Client(host=workspace.host, token=workspace.token)
    call = client.call(client.prepare("weather in Paris", endpoint, tools=[weather], run_tools=True, stream=stream))
    completion = call.wait()
    assert completion.text == "Echo: weather in Paris | weather -> 15 C in weather in Paris"
    [step] = completion.steps
    assert step.why == "tools" and step.tool_calls[0].output == "15 C in weather in Paris"
    first, second = posts(workspace)
    if endpoint == CHAT:
        asked = second.json["messages"][1]
        assert asked["role"] == "assistant" and asked["tool_calls"][0]["function"]["name"] == "weather"
        assert second.json["messages"][2] == {"role": "tool", "tool_call_id": asked["tool_calls"][0]["id"],
                                              "content": "15 C in weather in Paris"}
    else:
        item, result = second.json["input"][1:]
        assert item["type"] == "function_call" and len(item["id"]) == 64  # cut, as the Foundation Model APIs want
        assert result == {"type": "function_call_output", "call_id": item["call_id"],
                          "output": "15 C in weather in Paris"}


def test_the_loop_stops_at_max_steps(shell, workspace):
    workspace.add_endpoint(Endpoint("looping", "llm/v1/chat", tool_loop=True))
    shell.run_cell("runs = []\ndef lookup(q: str) -> int:\n    '''Look q up.'''\n    runs.append(q)\n    return len(runs)\n")
    result = shell.run_cell("%%dbllm -e looping --tools lookup --run-tools --max-steps 3 -o answer\nlookup this")
    assert result.success
    assert len(posts(workspace, "looping")) == 3 and shell.user_ns["runs"] == ["lookup this", "lookup this"]
    last = shell.user_ns["_dbllm"]
    assert [s.why for s in last.steps] == ["tools", "tools"] and len(last.pending_tool_calls) == 1
    shown = shell.display_pub.outputs[-1]["data"]["text/markdown"]
    assert "not run: the call stopped at --max-steps 3" in shown
    assert "1. ran lookup(q='lookup this') → 1" in shown and "2. ran lookup(q='lookup this') → 2" in shown


def test_only_the_named_functions_run_with_checked_arguments(shell, workspace):
    shell.run_cell("import os\nsecret = 'kept'\ndef lookup(q: str, n: int = 1) -> str:\n    '''Look.'''\n"
                   "    return q * n\n")
    for asked, said in (({"name": "os", "arguments": {}}, "there is no tool 'os'; the tools are lookup"),
                        ({"name": "secret", "arguments": {}}, "there is no tool 'secret'"),
                        ({"name": "lookup", "arguments": {"q": "x", "n": "lots"}},
                         "the arguments do not fit lookup's signature: n: Input should be a valid integer"),
                        ({"name": "lookup", "arguments": {"q": "x", "rm": "-rf"}}, "rm: Extra inputs are not permitted")):
        workspace.clear()
        workspace.fail(CHAT, tool_call=asked)
        assert shell.run_cell(f"%%dbllm -e {CHAT} --tools lookup --run-tools\nhi").success
        sent = posts(workspace)[-1].json["messages"][-1]
        assert sent["role"] == "tool" and json.loads(sent["content"]) == {"error": json.loads(sent["content"])["error"]}
        assert said in sent["content"]
        assert said in shell.user_ns["_dbllm"].steps[0].tool_calls[0].error


def test_databricks_quirks_strict_claude_content_and_item_ids(workspace):
    claude = Endpoint("claude", "llm/v1/chat", model="databricks-claude-sonnet-4-5")
    gpt = Endpoint("gpt", "llm/v1/chat", model="databricks-gpt-oss-120b")
    workspace.add_endpoint(claude)
    workspace.add_endpoint(gpt)
    client = Client(host=workspace.host, token=workspace.token)
    strict = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}]

    def add_strict(**request):
        return {**request, "tools": strict}

    # strict is taken out for a model that is not a GPT (the local workspace refuses it, as Databricks does) ...
    client.complete("x", endpoint="claude", transform_input=add_strict, tools=[weather], run_tools=True)
    first, second = posts(workspace, "claude")
    assert "strict" not in first.json["tools"][0]["function"]
    # ... and an assistant turn with tool calls and no text gets a content Claude accepts
    assert second.json["messages"][1]["content"] == " " and second.json["messages"][1]["tool_calls"]
    client.complete("x", endpoint="gpt", transform_input=add_strict)
    assert posts(workspace, "gpt")[-1].json["tools"][0]["function"]["strict"] is True  # kept for a GPT


def test_tools_on_a_kind_that_cannot_take_them_are_refused_before_sending(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    with pytest.raises(ConfigurationError, match="--tools needs a chat endpoint or a Responses agent"):
        client.complete("x", endpoint=COMPLETIONS, tools=[weather])
    with pytest.raises(ConfigurationError, match="tools takes functions"):
        client.complete("x", endpoint=CHAT, tools=[Ticket])
    assert posts(workspace) == []


def test_the_magic_shows_the_calls_asked_for(shell, workspace):
    shell.run_cell("def weather(city: str) -> str:\n    '''Weather.'''\n    return 'sunny'\n")
    assert shell.run_cell(f"%%dbllm -e {CHAT} --tools weather\nweather in Paris").success
    shown = shell.display_pub.outputs[-1]["data"]
    assert "**The model asks for this tool call:**" in shown["text/markdown"]
    assert '| weather | {"city": "weather in Paris"} |' in shown["text/markdown"]
    assert shell.user_ns["_dbllm"].tool_calls[0].arguments == {"city": "weather in Paris"}
    bad = shell.run_cell(f"%%dbllm -e {CHAT} --tools nope\nx")
    assert not bad.success and "the notebook has no function 'nope'" in str(bad.error_in_exec)


def test_an_agent_s_own_tool_calls_are_read_as_already_run():
    from dbmagic.call.answers import parse_response
    from dbmagic.call.wire import RESPONSES as KIND

    parsed = parse_response(KIND, {"output": [
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "search", "arguments": '{"q": "x"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "found"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done"}]}]})
    [call] = parsed.tool_calls
    assert (call.name, call.arguments, call.ran, call.output, parsed.text) == ("search", {"q": "x"}, True, "found", "Done")


def test_a_schema_error_that_quotes_a_hostile_answer_holds_no_secret():
    from dbmagic.testing import MemoryHandler, reply

    token = "dapi-schema-secret-0123456789"

    def echo_the_token(sent):
        return reply(200, {"choices": [{"message": {"role": "assistant", "content": json.dumps({"n": token})},
                                        "finish_reason": "stop"}]})

    client = Client(host="https://example.cloud.databricks.com", token=token, handler=MemoryHandler(echo_the_token))
    with pytest.raises(SchemaError) as refused:
        client.complete("x", endpoint="e", task="chat", schema="n: int", schema_retries=0)
    assert token not in str(refused.value) and token not in refused.value.problem
    assert "'***' is not of type 'integer'" in str(refused.value)


def test_a_stop_while_a_tool_runs_sends_nothing_more_and_keeps_the_steps(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    calls = []

    def slow(q: str) -> str:
        """Stops the call that runs it (as the panel's Stop would, from another thread)."""
        calls[0].cancel()
        return "late"

    call = client.call(client.prepare("q", CHAT, tools=[slow], run_tools=True))
    calls.append(call)
    completion = call.wait()
    assert completion.finish_reason == "stopped" and completion.is_partial
    assert [s.why for s in completion.steps] == ["tools"] and completion.steps[0].tool_calls[0].output == "late"
    assert len(posts(workspace)) == 1
