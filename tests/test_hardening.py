"""Hardening, round three: third-party text and other people's files are data. Each test names the
item of the issue it covers; each failed on main before the change it tests (the note says how)."""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

import dbmagic
from dbmagic import Client, SchemaError, SettingError

from .conftest import CHAT, COMPLETIONS


def invocations(workspace, endpoint=CHAT):
    return [r for r in workspace.requests if r.path == f"/serving-endpoints/{endpoint}/invocations"]


@pytest.fixture
def bait(tmp_path):
    """A JSON file and a loopback URL a schema might point at; what they hold must never be read."""
    secret_file = tmp_path / "private.json"
    secret_file.write_text(json.dumps({"type": "string", "description": "PRIVATE-FILE-CONTENT"}))
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.path)
            body = json.dumps({"type": "string", "description": "PRIVATE-URL-CONTENT"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield secret_file.as_uri(), f"http://127.0.0.1:{server.server_address[1]}/schema.json", hits
    server.shutdown()
    server.server_close()


# -- 1. a schema is data -------------------------------------------------------------------------------

def _with_ref(ref):
    return {"type": "object", "properties": {"label": {"$ref": ref}}, "required": ["label"]}


@pytest.mark.parametrize("which", ["file", "url", "relative"])
def test_a_schema_ref_outside_the_schema_is_refused_before_sending_and_nothing_is_read(
        client, workspace, bait, capsys, which):
    """Item 1: on main jsonschema read the file and GET the URL after the paid call, and quoted them."""
    file_uri, url, hits = bait
    ref = {"file": file_uri, "url": url, "relative": "other.json#/$defs/x"}[which]
    with pytest.raises(SettingError) as info:
        client.complete("Label this", endpoint=CHAT, schema=_with_ref(ref))
    assert "outside the schema" in str(info.value) and "never reads files or URLs" in str(info.value)
    assert invocations(workspace) == [] and hits == []
    assert "PRIVATE" not in str(info.value) + capsys.readouterr().out


@pytest.mark.parametrize("schema, words", [
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "goes round in a circle"),
    ({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}},
      "type": "object", "properties": {"x": {"$ref": "#/$defs/a"}}}, "goes round in a circle"),
    ({"$ref": "#"}, "goes round in a circle"),
    (_with_ref("#/$defs/missing"), "which is not in the schema"),
    (_with_ref("#nowhere"), "which is not in the schema"),
    ({"type": "object", "properties": {"x": {"type": "string", "pattern": "(a)\\1"}}}, "back-references"),
    ({"type": "object", "properties": {"x": {"type": "string", "pattern": "(?=a)a"}}}, "look-around"),
    ({"type": "object", "properties": {"x": {"$id": "https://elsewhere.example/x.json", "type": "string"}}},
     "its own $id"),
])
def test_a_schema_that_cannot_be_checked_is_refused_before_sending(client, workspace, schema, words):
    """Item 1: on main cycles and unresolvable references passed check_schema and failed after the
    paid call (RecursionError, jsonschema's internals); patterns were Python's backtracking re."""
    with pytest.raises(SettingError) as info:
        client.complete("Label this", endpoint=CHAT, schema=schema)
    assert words in str(info.value)
    assert invocations(workspace) == []


def test_a_recursive_schema_that_reads_the_answer_as_it_goes_is_fine(client):
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["name"]}}, "$ref": "#/$defs/node"}
    value = client.complete('Name "root"', endpoint=CHAT, schema=tree).value
    assert value["name"] == "root"


def test_a_catastrophic_pattern_is_checked_in_linear_time(client, workspace):
    """Item 1: on main ``^([a-z]+ ?)*$`` against a 31-character answer held the kernel for hours
    (Python's re backtracks; Ctrl-C cannot stop it). RE2 answers at once: the answer does not fit."""
    schema = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^([a-z]+ ?)*$"}},
              "required": ["word"]}
    outcome: list = []

    def ask():
        try:
            client.complete('Answer "' + "a" * 30 + '!"', endpoint=CHAT, schema=schema, schema_retries=0)
        except SchemaError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=ask, daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the pattern did not finish"
    assert outcome and outcome[0].field == "word" and "does not match" in outcome[0].problem
    assert time.monotonic() - started < 20
    assert len(invocations(workspace)) == 1


def test_checking_an_answer_is_bounded_in_time(client, workspace):
    """Item 1: a schema whose checking explodes (a chain of anyOf whose branches both fail deep down:
    2^24 paths through a deep answer) stops after the bound with a SchemaError naming the problem,
    instead of holding the kernel."""
    defs = {f"a{i}": {"anyOf": [{"type": "array", "items": {"$ref": f"#/$defs/a{i + 1}"}},
                                {"type": "array", "items": {"$ref": f"#/$defs/a{i + 1}"}}]} for i in range(24)}
    defs["a24"] = {"type": "string"}
    schema = dbmagic.schema.schema_of({"$defs": defs, "$ref": "#/$defs/a0"})
    value: object = 1
    for _ in range(24):
        value = [value]
    started = time.monotonic()
    with pytest.raises(SchemaError) as info:
        schema.validate(value, text=json.dumps(value), target="the test")
    assert "checking took longer than 1 s" in str(info.value)
    assert time.monotonic() - started < 5


def test_a_schema_too_large_to_check_is_refused(client, workspace):
    node: dict = {"type": "string"}
    for _ in range(40):  # one dict in two places, 40 times: 2^40 values as JSON
        node = {"anyOf": [node, node]}
    with pytest.raises(SettingError, match="too large"):
        client.complete("x", endpoint=CHAT, schema=node)
    assert invocations(workspace) == []


def test_a_registry_style_schema_sends_with_local_references(client, workspace):
    """A pydantic-style schema (local $defs references) still goes on the wire as it is."""
    schema = {"$defs": {"Label": {"type": "string", "enum": ["pos", "neg"]}}, "type": "object",
              "properties": {"label": {"$ref": "#/$defs/Label"}}, "required": ["label"]}
    value = client.complete("Label this", endpoint=CHAT, schema=schema).value
    assert value["label"] in ("pos", "neg")
    assert invocations(workspace)[-1].json["response_format"]["json_schema"]["schema"] == schema


def test_the_completions_instruction_path_refuses_the_same(client, workspace, bait):
    file_uri, _, hits = bait
    with pytest.raises(SettingError):
        client.complete("Label this", endpoint=COMPLETIONS, schema=_with_ref(file_uri))
    assert invocations(workspace, COMPLETIONS) == [] and hits == []
