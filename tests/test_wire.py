"""Request bodies per endpoint kind, answer parsing, and the SSE decoder (pure functions)."""

from __future__ import annotations

import pytest

from dbmagic import _wire


@pytest.mark.parametrize("task, kind", [
    ("llm/v1/chat", "chat"), ("llm/v1/completions", "completions"), ("llm/v1/embeddings", "embeddings"),
    (None, "custom"), ("agent/v2/chat", "chat"), ("chat", "chat"), ("something/else", "custom"),
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
    assert _wire.parse_response("chat", data).text == "ab"
    assert _wire.parse_response("custom", {"predictions": [{"x": 1}, {"x": 2}]}).value == {"x": 1}
    assert _wire.parse_response("custom", {"predictions": {"x": 1}}).value == {"x": 1}
    assert _wire.parse_response("proxy", {"a": [1]}).text == '{"a": [1]}'


def test_parse_wrong_shape_is_a_wire_error():
    with pytest.raises(_wire.WireError, match="a chat answer without the expected fields"):
        _wire.parse_response("chat", {"predictions": ["x"]})


def test_chunk_delta_shapes():
    assert _wire.chunk_delta({"choices": [{"delta": {"content": "x"}, "finish_reason": None}]}) == ("x", None, None)
    assert _wire.chunk_delta({"choices": [{"text": "y", "finish_reason": "stop"}], "usage": {"t": 1}}) == (
        "y", {"t": 1}, "stop")
    assert _wire.chunk_delta({"delta": {"content": "agent"}}) == ("agent", None, None)


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
    decoder = _wire.SSEDecoder()
    events = []
    for i in range(0, len(STREAM), size):
        events.extend(decoder.feed(STREAM[i:i + size]))
    events.extend(decoder.close())
    assert events == ['{"a": 1}', "line one\nline two", "[DONE]"]
    assert decoder.truncated is False


def test_sse_decoder_reports_a_partial_last_line():
    decoder = _wire.SSEDecoder()
    assert list(decoder.feed(b'data: {"a": 1}\n\ndata: {"b"')) == ['{"a": 1}']
    assert decoder.close() == []
    assert decoder.truncated is True
