"""The client over real HTTP: every endpoint kind, transforms, streams, errors, and what was sent."""

from __future__ import annotations

import re

import pytest

import dbmagic
from dbmagic import (
    BadResponse,
    Client,
    ConfigurationError,
    EndpointNotFound,
    RequestError,
    StatusError,
    StreamInterrupted,
    TransformError,
)
from dbmagic.errors import error_class
from dbmagic.testing import Endpoint, LocalWorkspace
from dbmagic.transport.credentials import Credentials

from .conftest import (
    CHAT,
    CLUSTER,
    COMPLETIONS,
    CUSTOM,
    EMBEDDINGS,
    LANGCHAIN_TRANSFORMS,
    PORT,
)


def last(workspace):
    return workspace.requests[-1]


# -- the seed's own transforms (LangChain's documentation page) ------------------------------------

_seed: dict = {}
exec(LANGCHAIN_TRANSFORMS, _seed)
transform_input, transform_output = _seed["transform_input"], _seed["transform_output"]


# -- each endpoint kind --------------------------------------------------------------------------

def test_chat(client, workspace):
    workspace.fail(CHAT, delay=0.2)  # the server takes 0.2 s: the latency measures it
    completion = client.complete("How are you?", endpoint=CHAT, system="Be brief.", temperature=0.1,
                                 max_tokens=256, stop=["\n\n"], n=1, extra_params={"top_k": 5})
    assert completion.text == "[Be brief.] Echo: How are you?"
    assert completion.kind == "chat"
    assert completion.usage == dbmagic.Usage(input=5, output=6, total=11)
    assert completion.served_model == "meta-llama-3.3-70b-instruct"
    assert completion.request_id.startswith("local-")
    assert 0.2 <= completion.latency < 1.5
    sent = last(workspace)
    assert sent.path == f"/serving-endpoints/{CHAT}/invocations"
    assert sent.headers["Authorization"] == "Bearer ***" and sent.authorized
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.json == {"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "How are you?"}],
                         "temperature": 0.1, "max_tokens": 256, "stop": ["\n\n"], "n": 1,
                         "top_k": 5}  # extra_params merge into the request, as LangChain's do


def test_chat_history_is_sent_before_the_prompt(client, workspace):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Echo: Hi"}]
    client.complete("Again", endpoint=CHAT, history=history)
    assert last(workspace).json["messages"] == [*history, {"role": "user", "content": "Again"}]


def test_stop_and_max_tokens_take_effect(client):
    assert client.complete("one. two. three", endpoint=CHAT, stop=".").text == "Echo: one"
    completion = client.complete("a b c d e", endpoint=COMPLETIONS, max_tokens=3)
    assert (completion.text, completion.finish_reason) == ("Echo: a b", "length")


def test_completions(client, workspace):
    completion = client.complete("Once upon", endpoint=COMPLETIONS, temperature=0.0, stop=["."])
    assert completion.text == "Echo: Once upon"
    assert last(workspace).json == {"prompt": "Once upon", "temperature": 0.0, "stop": ["."]}


def test_embeddings(client, workspace):
    completion = client.complete(["alpha", "beta"], endpoint=EMBEDDINGS)
    assert last(workspace).json == {"input": ["alpha", "beta"]}
    assert len(completion.value) == 2 and len(completion.value[0]) == 8
    assert completion.text == "2 embeddings of dimension 8"
    assert completion.value[0] != completion.value[1]


def test_custom_model_sends_dataframe_records_and_takes_the_first_prediction(client, workspace):
    completion = client.complete("How are you?", endpoint=CUSTOM, temperature=0.2)
    assert last(workspace).json == {"dataframe_records": [{"prompt": "How are you?", "temperature": 0.2}]}
    assert completion.value == "Echo: How are you?"
    assert completion.raw == {"predictions": ["Echo: How are you?"]}


def test_custom_model_with_structured_predictions(workspace, client):
    workspace.add_endpoint(Endpoint("scorer", None, "CUSTOM_MODEL",
                                    predict=lambda rows: [{"score": len(r["prompt"])} for r in rows]))
    completion = client.complete("four", endpoint="scorer", transform_output=lambda p: p["score"] * 10)
    assert completion.value == 40
    assert completion.text == '{"score": 4}'


def test_driver_proxy_app(client, workspace):
    completion = client.complete("How are you?", cluster_id=CLUSTER, port=PORT, stop=["?"])
    assert completion.value == "Echo: How are you"
    # the org id was asked of the workspace once, then taken from its answers' headers
    assert [r.path for r in workspace.requests] == ["/.well-known/databricks-config",
                                                   f"/driver-proxy-api/o/{workspace.workspace_id}/{CLUSTER}/{PORT}"]
    assert last(workspace).json == {"prompt": "How are you?", "stop": ["?"]}
    client.complete("again", cluster_id=CLUSTER, port=PORT)
    assert len(workspace.requests) == 3


def test_org_id_from_the_workspace_once_from_the_host_or_zero(workspace, clock):
    client = Client(host=workspace.host, token=workspace.token, clock=clock)
    workspace.workspace_id = "777"
    client.complete("x", cluster_id=CLUSTER, port=PORT)
    client.complete("y", cluster_id=CLUSTER, port=PORT)
    assert last(workspace).path == f"/driver-proxy-api/o/777/{CLUSTER}/{PORT}"
    assert [r.path for r in workspace.requests].count("/.well-known/databricks-config") == 1  # asked once
    from dbmagic.transport.credentials import org_id_from_host

    assert org_id_from_host("https://1234567890123456.7.gcp.databricks.com") == "1234567890123456"
    assert org_id_from_host("https://adb-42.3.azuredatabricks.net") == "42"
    assert org_id_from_host("https://dbc-a1b2.cloud.databricks.com") is None
    quiet = Client(host=workspace.host, token=workspace.token, clock=clock, retry=dbmagic.RetryPolicy(attempts=1))
    workspace.fail("/.well-known/databricks-config", 404)
    workspace.workspace_id = ""  # a workspace that names no org id anywhere
    quiet.complete("x", cluster_id=CLUSTER, port=PORT)
    assert last(workspace).path == f"/driver-proxy-api/o/0/{CLUSTER}/{PORT}"


def test_proxy_app_with_its_own_contract_needs_a_transform_output(client, workspace):
    workspace.add_proxy_app("0101-000000-other", 8080, lambda body: {"answer": body["prompt"][::-1], "score": 0.5})
    completion = client.complete("abc", cluster_id="0101-000000-other", port=8080,
                                 transform_output=lambda value: value["answer"])
    assert completion.value == "cba"
    assert completion.raw == {"answer": "cba", "score": 0.5}


def test_proxy_org_and_cluster_from_the_notebook_context_or_azure_host(workspace):
    in_notebook = Client(credentials=Credentials(workspace.host, "notebook context", _token=workspace.token,
                                                 workspace_id="5555", cluster_id=CLUSTER))
    assert in_notebook.complete("x", port=PORT).text == "Echo: x"
    assert last(workspace).path == f"/driver-proxy-api/o/5555/{CLUSTER}/{PORT}"
    azure = Client(host="https://adb-1234567890123456.7.azuredatabricks.net", token="t")
    prepared = azure.prepare("x", cluster_id="c-1", port=8080)
    assert prepared.url == "https://adb-1234567890123456.7.azuredatabricks.net/driver-proxy-api/o/1234567890123456/c-1/8080"


def test_proxy_without_cluster_outside_a_notebook(client):
    with pytest.raises(ConfigurationError, match="needs the cluster id: pass cluster_id="):
        client.complete("x", port=PORT)


def test_unknown_task_override(client, workspace):
    with pytest.raises(ConfigurationError, match=r"task must be one of chat, completions, embeddings, responses, chat_agent, custom .*got 'chta'"):
        client.complete("x", endpoint=CHAT, task="chta")
    assert workspace.requests == []


@pytest.mark.parametrize("options", [{"endpoint": "../../api/2.0/serving-endpoints"}, {"endpoint": ".."},
                                     {"cluster_id": "../../api", "port": PORT}, {"cluster_id": CLUSTER, "port": PORT,
                                                                                "org_id": "1/../.."}])
def test_a_name_cannot_reach_another_path(client, workspace, options):
    with pytest.raises(ConfigurationError, match=r"must be a plain name \(no '/'"):
        client.complete("x", task="chat", **options)
    assert workspace.requests == []


def test_options_are_checked_before_sending(client, workspace):
    for options, message in [({"temperature": float("nan")}, "temperature must be a finite number; got nan"),
                             ({"max_tokens": 0}, "max_tokens must be at least 1; got 0"),
                             ({"extra_params": {"top_p": float("inf")}}, "extra_params must hold JSON values only"),
                             ({"stop": [1]}, "stop must be a list of strings"),
                             ({"n": 0}, "n must be at least 1 and at most 16; got 0"),
                             ({"endpoint": "e" * 10_000}, "endpoint must be at most 255 characters; got 'eee")]:
        with pytest.raises(ConfigurationError, match=re.escape(message)) as info:
            client.complete("x", **{"endpoint": CHAT, **options})
        assert len(str(info.value)) < 300  # a 10,000-character name makes no 20,000-character message
    with pytest.raises(ConfigurationError, match="timeout must be above 0"):
        client.complete("x", endpoint=CHAT, timeout=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_p'.*request fields go in extra_params="):
        client.complete("x", endpoint=CHAT, top_p=0.9)
    assert [r for r in workspace.requests if r.method == "POST"] == []


def test_help_shows_the_call_options():
    import inspect

    for method in (Client.prepare, Client.complete, Client.stream):
        parameters = inspect.signature(method).parameters
        assert {"temperature", "max_tokens", "stop", "extra_params", "system", "history"} <= set(parameters)
        assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def test_no_target(client):
    with pytest.raises(ConfigurationError, match="No endpoint given: pass endpoint="):
        client.complete("x")


def test_task_override_skips_the_lookup_and_changes_the_shape(client, workspace):
    with pytest.raises(RequestError):  # the custom model rejects a chat body: the override was used
        client.complete("x", endpoint=CUSTOM, task="llm/v1/chat")
    assert [r.path for r in workspace.requests] == [f"/serving-endpoints/{CUSTOM}/invocations"]
    assert last(workspace).json == {"messages": [{"role": "user", "content": "x"}]}


def test_endpoint_metadata_is_cached_and_one_request_per_call(client, workspace):
    for i in range(5):
        client.complete(f"call {i}", endpoint=CHAT)
    paths = [r.path for r in workspace.requests]
    assert paths[0] == f"/api/2.0/serving-endpoints/{CHAT}"
    assert paths[1:] == [f"/serving-endpoints/{CHAT}/invocations"] * 5
    assert workspace.connections == 1
    assert client.endpoint(CHAT).kind == "chat" and len(workspace.requests) == 6
    client.endpoint(CHAT, refresh=True)
    assert workspace.requests[-1].path == f"/api/2.0/serving-endpoints/{CHAT}"


def test_endpoints_listing(client):
    infos = {e.name: e for e in client.endpoints()}
    assert infos[CHAT].kind == "chat" and infos[CHAT].state == "READY"
    assert infos[EMBEDDINGS].kind == "embeddings"
    assert infos[CUSTOM].kind == "custom" and infos[CUSTOM].endpoint_type == "CUSTOM_MODEL"
    assert infos[COMPLETIONS].served == ("local-instruct",)


def test_dry_run_sends_nothing_and_shows_the_transformed_request(client, workspace):
    prepared = client.prepare("Hi", endpoint=COMPLETIONS, transform_input=transform_input, temperature=0.5)
    assert prepared.describe() == {
        "method": "POST",
        "url": f"{workspace.host}/serving-endpoints/{COMPLETIONS}/invocations",
        "headers": {"Authorization": "Bearer ***", "Content-Type": "application/json"},
        "json": {"prompt": "Hi\n    Be Concise.\n    ", "temperature": 0.5},
    }
    assert all(not r.path.endswith("invocations") for r in workspace.requests)


# -- transforms ------------------------------------------------------------------------------------

def test_langchain_transforms_work_unchanged(client, workspace):
    completion = client.complete("How are you?", endpoint=CHAT, transform_input=transform_input,
                                 transform_output=transform_output)
    assert last(workspace).json["messages"][-1]["content"] == "How are you?\n    Be Concise.\n    "
    assert completion.value == completion.text == "ECHO: HOW ARE YOU?\n    BE CONCISE.\n    "
    assert completion.raw["choices"][0]["message"]["content"] == "Echo: How are you?\n    Be Concise.\n    "


def test_transform_input_may_build_messages(client, workspace):
    def as_messages(**request):
        return {"messages": [{"role": "user", "content": request["prompt"] + "!"}], "temperature": 0}

    assert client.complete("hey", endpoint=CHAT, system="ignored", transform_input=as_messages).text == "Echo: hey!"
    assert last(workspace).json == {"messages": [{"role": "user", "content": "hey!"}], "temperature": 0}


def test_transform_output_on_a_proxy_app_gets_the_json_value(client):
    assert client.complete("x", cluster_id=CLUSTER, port=PORT, transform_output=len).value == len("Echo: x")


def test_transform_that_raises_names_itself_and_keeps_the_cause(client, workspace):
    def broken(**request):
        return request["no_such_key"]

    with pytest.raises(TransformError, match=r"transform_input .*broken' raised KeyError: 'no_such_key'") as info:
        client.complete("x", endpoint=CHAT, transform_input=broken)
    assert isinstance(info.value.__cause__, KeyError)
    assert not any(r.path.endswith("invocations") for r in workspace.requests)


def test_transform_returning_the_wrong_type(client):
    def returns_text(**request):
        return request["prompt"]

    with pytest.raises(TransformError, match=r"returned str, not a dict.*return request"):
        client.complete("x", endpoint=CHAT, transform_input=returns_text)
    with pytest.raises(TransformError, match=r"transform_output 'int' raised ValueError"):
        client.complete("x", endpoint=CHAT, transform_output=int)


# -- streaming -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["chunked", "close"])
def test_stream_chat_token_by_token(mode):
    with LocalWorkspace(stream_mode=mode, chunk_delay=0.1) as ws:
        client = Client(host=ws.host, token=ws.token)
        stream = client.stream("one two three", endpoint=CHAT, max_tokens=10, transform_output=transform_output)
        pieces = list(stream)
        assert pieces == ["Echo:", " one", " two", " three"]
        assert ws.requests[-1].json["stream"] is True
        completion = stream.completion
        assert completion.text == "ECHO: ONE TWO THREE"
        assert completion.usage.output == 4
        assert completion.finish_reason == "stop"
        # the first piece is written at once, the other three 0.1 s apart: the first token came
        # well before the end, and the whole answer took the three pauses
        assert completion.time_to_first_token < 0.1 and completion.latency >= 0.3
        assert completion.latency - completion.time_to_first_token >= 0.25


def test_stream_completions(client, workspace):
    stream = client.stream("a b", endpoint=COMPLETIONS)
    assert "".join(stream) == "Echo: a b"
    assert last(workspace).json == {"prompt": "a b", "stream": True, "stream_options": {"include_usage": True}}


def test_stream_of_a_non_streaming_kind_gives_one_piece(client, workspace):
    stream = client.stream("hi", endpoint=CUSTOM)
    assert list(stream) == ["Echo: hi"]
    assert "stream" not in str(last(workspace).json)
    assert stream.completion.value == "Echo: hi"


@pytest.mark.parametrize("mode", ["chunked", "close"])
def test_cut_stream_keeps_what_arrived(mode):
    with LocalWorkspace(stream_mode=mode) as ws:
        client = Client(host=ws.host, token=ws.token)
        ws.fail(CHAT, cut_after=3)
        stream = client.stream("one two three four five", endpoint=CHAT)
        received = []
        with pytest.raises(StreamInterrupted, match=r"The stream from endpoint '.*' was cut: .*; "
                                                    r"13 characters arrived.*What arrived is kept") as info:
            for piece in stream:
                received.append(piece)
        assert received == ["Echo:", " one", " two"]
        assert info.value.partial == stream.text == "Echo: one two"


def test_malformed_stream_event(client, workspace):
    workspace.fail(CHAT, cut_after=1, malformed=True)
    stream = client.stream("one two", endpoint=CHAT)
    with pytest.raises(StreamInterrupted, match="an event that is not JSON") as info:
        list(stream)
    assert info.value.partial == "Echo:"


def test_error_event_mid_stream(client, workspace):
    workspace.fail(CHAT, cut_after=2, body={"error_code": "INTERNAL_ERROR", "message": "model crashed"})
    stream = client.stream("one two three", endpoint=CHAT)
    with pytest.raises(StreamInterrupted, match="an error mid-stream: model crashed") as info:
        list(stream)
    assert info.value.partial == "Echo: one"


def test_stream_close_stops_reading_and_keeps_text(workspace):
    workspace.chunk_delay = 0.01
    client = Client(host=workspace.host, token=workspace.token)
    stream = client.stream(" ".join(["word"] * 50), endpoint=CHAT)
    first = next(iter(stream))
    stream.close()
    assert first == "Echo:" and stream.text == "Echo:"
    assert list(stream) == []


# -- errors: every row of WIRE.md, every body shape, never the token ------------------------------

@pytest.mark.parametrize("status, code, cls_name, words, step", [
    (400, "INVALID_PARAMETER_VALUE", "BadRequest", "refused the request", "Fix the parameters named"),
    (401, None, "AuthenticationError", "did not accept the token", "set DATABRICKS_TOKEN"),
    (403, "PERMISSION_DENIED", "PermissionDenied", "No permission to query", "CAN_QUERY permission"),
    (404, "RESOURCE_DOES_NOT_EXIST", "EndpointNotFound", "was not found on", "`%dbllm endpoints`"),
    (429, "REQUEST_LIMIT_EXCEEDED", "RateLimited", "is rate limited", "lower the concurrency"),
    (500, None, "ServerError", "failed", "scaling up from zero"),
    (502, None, "ServerError", "failed", "scaling up from zero"),
    (503, "TEMPORARILY_UNAVAILABLE", "ServerError", "failed", "scaling up from zero"),
    (504, None, "EndpointTimeout", "timed out", "ask for fewer tokens"),
])
def test_error_rows(workspace, clock, status, code, cls_name, words, step):
    client = Client(host=workspace.host, token=workspace.token, clock=clock,
                    retry=dbmagic.RetryPolicy(attempts=1))
    body = {"message": "The server's own words."}
    if code:
        body["error_code"] = code
    workspace.fail(CHAT, status, body=body)
    with pytest.raises(RequestError) as info:
        client.complete("x", endpoint=CHAT, task="chat")
    error = info.value
    assert type(error).__name__ == cls_name
    assert (error.status, error.error_code) == (status, code)
    message = str(error)
    assert f"endpoint '{CHAT}'" in message and words in message
    assert "The server's own words." in message
    assert message.endswith(error.next_step) and step in error.next_step


@pytest.mark.parametrize("body, shown", [
    ({"error": "model overloaded"}, "model overloaded"),
    ("plain text failure", "plain text failure"),
    ("<html><body>Bad Gateway</body></html>", "the server sent an HTML error page"),
    ("<html><head><title>Error 500 Server Error</title></head><body><h2>HTTP ERROR 500</h2>"
     "<pre>java.lang.IllegalStateException: model &lt;m1&gt; failed</pre></body></html>",
     "an HTML error page: Error 500 Server Error — java.lang.IllegalStateException: model <m1> failed"),
    ("", "(400)"),
])
def test_error_body_shapes(client, workspace, body, shown):
    workspace.fail(CHAT, 400, body=body)
    with pytest.raises(RequestError) as info:
        client.complete("x", endpoint=CHAT)
    assert shown in str(info.value)


def test_unknown_endpoint(client):
    with pytest.raises(EndpointNotFound, match=r"endpoint 'nope' was not found on http://127.0.0.1:\d+ "
                                               r"\(404 RESOURCE_DOES_NOT_EXIST: Endpoint with name 'nope' does not "
                                               r"exist.\).*%dbllm endpoints"):
        client.complete("x", endpoint="nope")


def test_answer_that_is_not_json_or_has_the_wrong_shape(client, workspace):
    workspace.fail(CHAT, malformed=True)
    with pytest.raises(BadResponse, match="sent an answer that is not JSON"):
        client.complete("x", endpoint=CHAT)
    with pytest.raises(BadResponse, match="a chat answer without the expected fields.*transform_output"):
        client.complete("x", endpoint=EMBEDDINGS, task="chat", transform_input=lambda **r: {"input": "x"})


def test_token_never_appears_in_errors_even_when_the_server_echoes_it(client, workspace):
    workspace.fail(CHAT, 403, body={"error_code": "PERMISSION_DENIED", "message": f"token {workspace.token} denied"})
    with pytest.raises(RequestError) as info:
        client.complete("x", endpoint=CHAT)
    assert workspace.token not in str(info.value)
    assert workspace.token not in repr(info.value)
    assert workspace.token not in (info.value.server_message or "")
    assert "token *** denied" in str(info.value)


def test_wrong_token(workspace):
    client = Client(host=workspace.host, token="wrong-token")
    with pytest.raises(dbmagic.AuthenticationError, match="did not accept the token.*DATABRICKS_TOKEN") as info:
        client.endpoints()
    assert "wrong-token" not in str(info.value)


def test_error_class_prefers_error_code():
    assert error_class(400, "RESOURCE_DOES_NOT_EXIST") is EndpointNotFound
    assert error_class(418, None) is StatusError


# -- the shared client -----------------------------------------------------------------------------

def test_get_client_is_shared_and_configure_replaces_it(workspace, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
    first = dbmagic.get_client()
    assert dbmagic.get_client() is first
    assert first.credentials.source == "environment"
    second = dbmagic.configure(host=workspace.host, token=workspace.token)
    assert dbmagic.get_client() is second is not first
    assert second.credentials.source == "explicit arguments"


def test_client_without_credentials_fails_on_first_use_not_on_creation():
    client = Client()
    assert "not resolved" in repr(client)
    with pytest.raises(ConfigurationError, match="No Databricks credentials found"):
        client.complete("x", endpoint=CHAT)


def test_every_error_lives_in_errors_is_exported_and_drawn():
    import importlib
    import pkgutil

    import dbmagic.errors as errors

    for module in pkgutil.walk_packages(dbmagic.__path__, "dbmagic."):
        if module.name not in ("dbmagic.demo", "dbmagic.testing.__main__"):
            importlib.import_module(module.name)
    found, todo = set(), [errors.DbMagicError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    for cls in found:
        assert cls.__module__ == "dbmagic.errors", cls
        assert getattr(dbmagic, cls.__name__) is cls and cls.__name__ in dbmagic.__all__
        assert re.search(rf"── {cls.__name__} ", errors.__doc__) or cls is errors.DbMagicError, cls


def test_a_server_that_echoes_the_token_never_shows_it(client, workspace):
    token = workspace.token
    # at the cut: 490 characters, then the token, so that only its prefix would fit in 500
    workspace.fail(CHAT, 400, body="x" * 490 + f" {token} and Authorization: Bearer {token}")
    with pytest.raises(RequestError) as info:
        client.complete("x", endpoint=CHAT)
    assert token[:6] not in str(info.value).replace("dbmagic-local-", "")  # no prefix of its secret part
    assert token not in str(info.value) and "dbmagic-local" not in str(info.value)
    workspace.fail(CHAT, cut_after=1, body={"error": f"upstream said: Bearer {token} / {token}"})
    with pytest.raises(StreamInterrupted) as cut:
        list(client.stream("one two three", endpoint=CHAT))
    assert token not in str(cut.value) and "Bearer ***" in str(cut.value)
