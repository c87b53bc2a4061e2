"""Request bodies per endpoint kind, answer parsing, and the SSE decoder (pure functions)."""

from __future__ import annotations

import pytest

from dbmagic.call import answers as _answers
from dbmagic.call import wire as _wire


@pytest.mark.parametrize("task, kind", [
    ("llm/v1/chat", "chat"), ("llm/v1/completions", "completions"), ("llm/v1/embeddings", "embeddings"),
    (None, "custom"), ("agent/v2/chat", "chat_agent"), ("agent/v1/responses", "responses"),
    ("agent/v1/chat", "chat"), ("chat", "chat"), ("responses", "responses"), ("something/else", "custom"),
])
def test_kind_for_task(task, kind):
    assert _wire.kind_for(task) == kind


def test_seed_request_leaves_unset_parameters_out():
    assert _wire.seed_request("Hi", {"temperature": 0.0, "max_tokens": None, "stop": ["."]}) == {
        "prompt": "Hi", "temperature": 0.0, "stop": ["."]}


def test_chat_body_builds_messages_with_system_and_history():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    body = _wire.build_body("chat", {"prompt": "c", "temperature": 0.1}, system="S", history=history, stream=True)
    assert body == {"messages": [{"role": "system", "content": "S"}, *history, {"role": "user", "content": "c"}],
                    "temperature": 0.1, "stream": True}


def test_chat_body_keeps_messages_a_transform_built():
    messages = [{"role": "user", "content": "mine"}]
    assert _wire.build_body("chat", {"prompt": "ignored", "messages": messages}, system="S") == {"messages": messages}


def test_other_kinds_bodies():
    assert _wire.build_body("completions", {"prompt": "p", "stop": ["."]}, stream=True) == {
        "prompt": "p", "stop": ["."], "stream": True}
    assert _wire.build_body("embeddings", {"prompt": ["a", "b"]}, stream=True) == {"input": ["a", "b"]}
    assert _wire.build_body("custom", {"prompt": "p", "temperature": 0}) == {
        "dataframe_records": [{"prompt": "p", "temperature": 0}]}
    assert _wire.build_body("custom", {"inputs": [1, 2]}) == {"inputs": [1, 2]}
    assert _wire.build_body("proxy", {"prompt": "p", "stop": ["x"]}) == {"prompt": "p", "stop": ["x"]}


def test_parse_chat_content_parts_and_custom_predictions():
    data = {"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}}]}
    assert _answers.parse_response("chat", data).text == "ab"
    assert _answers.parse_response("custom", {"predictions": [{"x": 1}, {"x": 2}]}).value == {"x": 1}
    assert _answers.parse_response("custom", {"predictions": {"x": 1}}).value == {"x": 1}
    assert _answers.parse_response("proxy", {"a": [1]}).text == '{"a": [1]}'


def test_parse_wrong_shape_is_a_wire_error():
    with pytest.raises(_answers.WireError, match="a chat answer without the expected fields"):
        _answers.parse_response("chat", {"predictions": ["x"]})


def test_chunk_shapes():
    reader = _answers.ChunkReader()
    assert reader.read({"choices": [{"delta": {"content": "x"}, "finish_reason": None}]}) == ("x", None, None)
    assert reader.read({"choices": [{"text": "y", "finish_reason": "stop"}], "usage": {"t": 1}}) == (
        "y", _answers.Usage(), "stop")  # a usage with no count dbmagic knows
    assert reader.read({"choices": [{"text": "z"}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}) == (
        "z", _answers.Usage(2, 1, 3), None)
    assert reader.read({"type": "response.completed", "response": {"usage": {"input_tokens": 4, "output_tokens": 2}}}
                       ) == ("", _answers.Usage(4, 2, 6), "stop")  # the Responses API's last event
    assert reader.read({"delta": {"role": "assistant", "content": "agent", "id": "m1"}}) == ("agent", None, None)
    assert reader.read({"trace_id": "tr-1"}) == ("", None, None)


def test_responses_events_show_deltas_once():
    item = {"type": "message", "id": "msg_1", "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello"}]}
    reader = _answers.ChunkReader()
    texts = [reader.read(e)[0] for e in (
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "Hel"},
        {"type": "response.output_text.delta", "item_id": "msg_1", "delta": "lo"},
        {"type": "response.output_item.done", "item": item})]
    assert texts == ["Hel", "lo", ""]  # the closing item repeats the text: not shown twice
    # an agent that sends only whole items (no deltas) still shows its text, tool calls show none
    reader = _answers.ChunkReader()
    assert reader.read({"type": "response.output_item.done", "item": {"type": "function_call", "id": "fc_1"}})[0] == ""
    assert reader.read({"type": "response.output_item.done", "item": item})[0] == "Hello"
    assert reader.read({"type": "response.completed"})[2] == "stop"


def test_agent_bodies_carry_system_and_history():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    body = _wire.build_body("responses", {"prompt": "c", "temperature": 0.1}, system="S", history=history, stream=True)
    assert body == {"input": [{"role": "system", "content": "S"}, *history, {"role": "user", "content": "c"}],
                    "temperature": 0.1, "stream": True}
    assert _wire.build_body("chat_agent", {"prompt": "c"}, history=history) == {
        "messages": [*history, {"role": "user", "content": "c"}]}
    # a transform's own shape is sent as it is: never wrapped in dataframe_records
    assert _wire.build_body("responses", {"prompt": "x", "input": [{"role": "user", "content": "mine"}]}) == {
        "input": [{"role": "user", "content": "mine"}]}
    assert _wire.build_body("responses", {"prompt": "x", "messages": [{"role": "user", "content": "m"}]}) == {
        "input": [{"role": "user", "content": "m"}]}
    assert _wire.user_turn("responses", body) == "c"


def test_parse_agent_answers():
    data = {"object": "response", "output": [
        {"type": "function_call", "id": "fc_1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "fc_1", "output": "42"},
        {"type": "message", "role": "assistant", "id": "msg_1",
         "content": [{"type": "output_text", "text": "The answer "}, {"type": "output_text", "text": "is 42."}]}]}
    assert _answers.parse_response("responses", data).text == "The answer is 42."
    data = {"messages": [{"role": "assistant", "content": "thinking", "id": "m0"},
                         {"role": "tool", "content": "42", "id": "t1"},
                         {"role": "assistant", "content": "It is 42.", "id": "m1"}]}
    assert _answers.parse_response("chat_agent", data).text == "It is 42."
    assert _answers.parse_response("custom", {"outputs": ["o1", "o2"]}).value == "o1"
    with pytest.raises(_answers.WireError, match="a chat_agent answer without the expected fields"):
        _answers.parse_response("chat_agent", {"messages": [{"role": "user", "content": "x"}]})


STREAM = (
    b": a comment the server may send\r\n"
    b"data: {\"a\": 1}\r\n\r\n"
    b"event: message\n"
    b"data: line one\n"
    b"data: line two\n\n"
    b"data:[DONE]\n\n"
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_sse_decoder_any_split(size):
    decoder = _answers.SSEDecoder()
    events = []
    for i in range(0, len(STREAM), size):
        events.extend(decoder.feed(STREAM[i:i + size]))
    events.extend(decoder.close())
    assert events == ['{"a": 1}', "line one\nline two", "[DONE]"]
    assert decoder.truncated is False


def test_sse_decoder_reports_a_partial_last_line():
    decoder = _answers.SSEDecoder()
    assert list(decoder.feed(b'data: {"a": 1}\n\ndata: {"b"')) == ['{"a": 1}']
    assert decoder.close() == []
    assert decoder.truncated is True
