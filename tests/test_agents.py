"""Agent endpoints over real HTTP: ResponsesAgent, ChatAgent, legacy agent chat, custom `outputs`."""

from __future__ import annotations

import pytest

import dbmagic
from dbmagic.testing import Endpoint, LocalWorkspace

from .conftest import CHAT

RESPONSES, CHAT_AGENT, LEGACY = "local-responses-agent", "local-chat-agent", "local-legacy-agent"


def posts(workspace):
    return [r for r in workspace.requests if r.method == "POST"]


def test_responses_agent_whole_answer_with_system_and_history(client, workspace):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Echo: Hi"}]
    completion = client.complete("And now?", endpoint=RESPONSES, system="Be brief.", history=history)
    assert posts(workspace)[-1].json == {"input": [{"role": "system", "content": "Be brief."}, *history,
                                                   {"role": "user", "content": "And now?"}]}
    assert completion.text == "[Be brief.] Echo: And now?"
    assert completion.kind == "responses"
    assert completion.usage == dbmagic.Usage(input=7, output=5, total=12)


@pytest.mark.parametrize("mode", ["chunked", "close"])
def test_responses_agent_streams_string_deltas_once(mode):
    with LocalWorkspace(stream_mode=mode) as ws:
        from dbmagic import Client

        client = Client(host=ws.host, token=ws.token)
        stream = client.stream("one two three", endpoint=RESPONSES)
        assert list(stream) == ["Echo:", " one", " two", " three"]  # output_item.done adds nothing
        assert stream.completion.text == "Echo: one two three"
        assert ws.requests[-1].json == {"input": [{"role": "user", "content": "one two three"}], "stream": True}


def test_chat_agent_whole_and_streamed(client, workspace):
    completion = client.complete("hello there", endpoint=CHAT_AGENT, system="S")
    assert completion.text == "[S] Echo: hello there" and completion.kind == "chat_agent"
    assert posts(workspace)[-1].json == {"messages": [{"role": "system", "content": "S"},
                                                      {"role": "user", "content": "hello there"}]}
    stream = client.stream("hello there", endpoint=CHAT_AGENT)
    assert list(stream) == ["Echo:", " hello", " there"]
    assert stream.completion.text == "Echo: hello there"


def test_legacy_agent_chat_is_chat(workspace, client):
    workspace.add_endpoint(Endpoint(LEGACY, "agent/v1/chat", "CUSTOM_MODEL"))
    assert client.complete("hey", endpoint=LEGACY).text == "Echo: hey"
    assert posts(workspace)[-1].json == {"messages": [{"role": "user", "content": "hey"}]}
    assert "".join(client.stream("hey you", endpoint=LEGACY)) == "Echo: hey you"


def test_input_transform_may_return_the_agents_own_shape(client, workspace):
    def own(**request):
        return {"input": [{"role": "user", "content": request["prompt"].upper()}], "custom_inputs": {"k": 1}}

    assert client.complete("shout", endpoint=RESPONSES, transform_input=own).text == "Echo: SHOUT"
    assert posts(workspace)[-1].json == {"input": [{"role": "user", "content": "SHOUT"}], "custom_inputs": {"k": 1}}


def test_custom_model_answering_outputs(client, workspace):
    workspace.add_endpoint(Endpoint("outputs-model", None, "CUSTOM_MODEL", output_key="outputs",
                                    predict=lambda records: [f"scored {r['prompt']}" for r in records]))
    assert client.complete("x", endpoint="outputs-model").value == "scored x"


def test_chat_cells_system_streaming_and_endpoints_for_agents(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {RESPONSES} --chat --system 'Be brief.'", "first")
    shell.run_cell_magic("dbllm", f"-e {RESPONSES} --chat", "second")
    sent = posts(workspace)[-1].json
    assert sent["input"] == [{"role": "user", "content": "first"},
                             {"role": "assistant", "content": "[Be brief.] Echo: first"},
                             {"role": "user", "content": "second"}]
    assert sent["stream"] is True
    assert shell.display_pub.outputs[-1]["data"]["text/plain"] == "Echo: second"
    shell.run_cell_magic("dbllm", f"-e {CHAT_AGENT} --chat", "agent two")
    assert posts(workspace)[-1].json["messages"][-1] == {"role": "user", "content": "agent two"}
    shell.run_line_magic("dbllm", "endpoints")
    table = shell.display_pub.outputs[-1]["data"]["text/markdown"]
    assert f"| {RESPONSES} | agent/v1/responses | READY |" in table
    assert f"| {CHAT_AGENT} | agent/v2/chat | READY |" in table
    assert CHAT in table


def test_panel_talks_to_an_agent_and_keeps_its_conversation(shell, workspace):
    from dbmagic.frontends.panel import Panel

    p = Panel(shell)
    p.endpoint.value = RESPONSES
    p.chat.value = True
    for prompt in ("one", "two"):
        p.prompt.value = prompt
        p.send()
        p.wait()
    assert posts(workspace)[-1].json["input"] == [{"role": "user", "content": "one"},
                                                  {"role": "assistant", "content": "Echo: one"},
                                                  {"role": "user", "content": "two"}]
    assert p.output.outputs[-1]["data"]["text/markdown"] == "Echo: two"
    assert "Echo: one" in p.history.value
