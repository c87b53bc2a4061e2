"""Property-based tests of the pure parts: whatever comes in, a result or a dbmagic error, never a
stray KeyError, TypeError, ValueError or RecursionError."""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from IPython.core.error import UsageError  # noqa: E402

from dbmagic import settings
from dbmagic.call import answers as _answers
from dbmagic.call import wire as _wire
from dbmagic.errors import DbMagicError, parse_error_body  # noqa: E402
from dbmagic.frontends.line import split_options  # noqa: E402
from dbmagic.prompts.templating import Template  # noqa: E402
from dbmagic.transport.credentials import normalize_host  # noqa: E402

FAST = hsettings(max_examples=int(__import__("os").environ.get("DBMAGIC_EXAMPLES", "300")), deadline=None)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=20)
line_text = st.lists(st.sampled_from(["-e", "x", "--stop", "'", '"', "\\", "-5", "--", "-t", "0.5", " ", "=", "{{",
                                      "--raw", "-p", "a=1", "--nope", "é", "\t"]), max_size=12).map(" ".join) | st.text(
    max_size=40)


@FAST
@given(line_text)
def test_option_splitting_gives_options_and_a_prompt_or_a_usage_error(line):
    try:
        argv, prompt = split_options(line)
    except UsageError:
        return
    assert isinstance(argv, list) and isinstance(prompt, str)
    assert prompt == "" or prompt in line


@FAST
@given(st.sampled_from([s for s in settings.SETTINGS if s.type is not bool]), st.text(max_size=40))
def test_every_setting_reads_any_text_or_says_what_it_takes(setting, text):
    try:
        if setting.type is dict:
            value = settings.parse_param(text)
        else:
            value = settings.from_text(setting.name, text)
    except DbMagicError:
        return
    assert value is not None


@FAST
@given(st.text(alphabet=st.sampled_from(list("{}%#()|.+-*/_ aA1'\"[]")), max_size=40),
       st.dictionaries(st.text(alphabet="abcx_", min_size=1, max_size=4), st.integers() | st.text(max_size=5),
                       max_size=3))
def test_templates_with_hostile_braces_and_names_render_or_explain(source, namespace):
    try:
        out = Template(source).render(namespace)
    except DbMagicError:
        return
    assert isinstance(out, str)


@FAST
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=5),
       st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10))
def test_sse_events_do_not_depend_on_how_the_bytes_were_split(datas, cuts):
    stream = b"".join(b"data: " + d.replace("\n", " ").replace("\r", " ").encode() + b"\n\n" for d in datas)
    whole = list(_answers.SSEDecoder().feed(stream))
    decoder, pieces, at, i = _answers.SSEDecoder(), [], 0, 0
    while at < len(stream):
        step = cuts[i % len(cuts)]
        pieces += list(decoder.feed(stream[at:at + step]))
        at, i = at + step, i + 1
    assert pieces == whole
    assert decoder.close() == []


@FAST
@given(st.sampled_from(_wire.KINDS), json_values)
def test_any_json_answer_parses_or_is_a_wire_error(kind, data):
    try:
        parsed = _answers.parse_response(kind, data)
    except _answers.WireError:
        return
    assert isinstance(parsed.text, str)


@FAST
@given(st.dictionaries(st.sampled_from(["type", "delta", "choices", "usage", "item", "item_id", "x"]), json_values,
                       max_size=4))
def test_any_streamed_event_reads_as_text_or_nothing(event):
    text, usage, finish = _answers.ChunkReader().read(event)
    assert isinstance(text, str)


@FAST
@given(st.text(max_size=80))
def test_any_host_string_is_a_host_or_a_configuration_error(text):
    try:
        host = normalize_host(text)
    except DbMagicError:
        return
    assert host.startswith(("https://", "http://")) and " " not in host and "@" not in host


long_messages = st.builds(lambda code, text: json.dumps({"error_code": code, "message": text}).encode(),
                          st.text(max_size=20), st.text(min_size=400, max_size=1500))


@FAST
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()) | long_messages)
def test_any_error_body_gives_a_code_and_a_message(body):
    code, message = parse_error_body(body)
    assert code is None or isinstance(code, str)
    assert message is None or (isinstance(message, str) and len(message) <= 500)


def test_a_long_json_error_message_is_cut_to_500_characters():
    """On main a 900-character JSON message came back whole: the property above rarely met one."""
    code, message = parse_error_body(json.dumps({"error_code": "BAD_REQUEST", "message": "m" * 900}))
    assert code == "BAD_REQUEST" and len(message) <= 500 and message.startswith("mmm")
