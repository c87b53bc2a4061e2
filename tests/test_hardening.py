"""Hardening, round three: third-party text and other people's files are data. Each test names the
item of the issue it covers; each failed on main before the change it tests (the note says how)."""

from __future__ import annotations

import http.server
import json
import re
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
    schema = dbmagic.call.schema.schema_of({"$defs": defs, "$ref": "#/$defs/a0"})
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


# -- 2. the cache and checkpoints belong to whoever wrote them ---------------------------------------

ANOTHER_USER = '''
import json, sys
import dbmagic
from dbmagic import Client
client = Client(host=sys.argv[1], token=sys.argv[2])
shared = sys.argv[4] == "shared"
result = dbmagic.batch("{{ row }}", ["q1", "q2", "q3"], "%s", client=client, progress=False, checkpoint=sys.argv[3],
                       shared_checkpoint=shared)
print(json.dumps({"texts": result.texts, "errors": result.errors, "summary": result.summary(),
                  "from_checkpoint": result.from_checkpoint}))
''' % CHAT


def as_another_user(workspace, tmp_path, token, checkpoint, shared=False):
    """A batch run by another user, in a process of its own with a home of its own (another person's
    machine or notebook: their dbmagic keeps its ledger key in their own home)."""
    import os
    import subprocess
    import sys

    home = tmp_path / f"home-{token[-6:]}"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABRICKS_")} | {"HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", ANOTHER_USER, workspace.host, token, str(checkpoint),
                           "shared" if shared else "own"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_another_users_answers_are_never_served_from_a_shared_folder(workspace, tmp_path):
    """Item 2: on main user B, who gets 403 on the endpoint, was served user A's answers with zero requests."""
    folder = tmp_path / "team-folder"
    client = Client(host=workspace.host, token=workspace.token)
    first = dbmagic.batch("{{ row }}", ["q1", "q2", "q3"], CHAT, client=client, progress=False, checkpoint=folder)
    assert first.failed == [] and len(invocations(workspace)) == 3
    b = workspace.add_user("b.user@dbmagic.test")
    workspace.deny(CHAT, "b.user@dbmagic.test")
    seen = as_another_user(workspace, tmp_path, b, folder)
    assert seen["texts"] == [None, None, None] and all("No permission" in e for e in seen["errors"])
    assert [r.status for r in invocations(workspace)[3:]] == [403, 403, 403]  # sent, and refused: never served
    assert "3 records in the checkpoint not used (3 another user's)" in seen["summary"]
    # a folder shared on purpose: the other principal's answers are served, nothing sent
    shared = as_another_user(workspace, tmp_path, b, folder, shared=True)
    assert shared["texts"] == ["Echo: q1", "Echo: q2", "Echo: q3"] and shared["from_checkpoint"] == 3
    assert len(invocations(workspace)) == 6


def test_a_rotated_token_is_the_same_principal(workspace, tmp_path):
    folder = tmp_path / "mine"
    first = dbmagic.batch("{{ row }}", ["q1", "q2"], CHAT, client=Client(host=workspace.host, token=workspace.token),
                          progress=False, checkpoint=folder)
    rotated = Client(host=workspace.host, token=workspace.new_token())  # a notebook's next short-lived token
    again = dbmagic.batch("{{ row }}", ["q1", "q2"], CHAT, client=rotated, progress=False, checkpoint=folder)
    assert again.texts == first.texts and again.from_checkpoint == 2 and len(invocations(workspace)) == 2
    me = [r for r in workspace.requests if r.path == "/api/2.0/preview/scim/v2/Me"]
    assert len(me) == 2  # once per client: who it is does not change with the token


def planted(folder, record):
    """Write ``record`` as a line of a file of the folder, as someone who can write the folder could."""
    path = folder / "zz-planted.jsonl"
    with open(path, "a") as out:
        out.write(json.dumps(record) + "\n")


def test_a_planted_or_edited_record_is_never_served_and_is_counted(workspace, tmp_path):
    """Item 2: on main a copied record with other text, or one for a request never sent (its key is
    computable), was served as cached=True; with --insert it became the next cell."""
    from dbmagic.call.ledger import identity

    folder = tmp_path / "ck"
    client = Client(host=workspace.host, token=workspace.token)
    dbmagic.batch("{{ row }}", ["q1"], CHAT, client=client, progress=False, checkpoint=folder)
    mine = [json.loads(line) for f in folder.glob("*.jsonl") for line in f.read_text().splitlines()]
    answer = next(r for r in mine if "text" in r)
    planted(folder, {**answer, "text": "import os; os.system('curl evil')", "at": answer["at"] + 1})  # edited
    url = answer["url"]
    body = {"messages": [{"role": "user", "content": "q2"}]}
    planted(folder, {**answer, "id": identity(url, body), "text": "PLANTED", "mac": "0" * 64})  # never sent
    again = dbmagic.batch("{{ row }}", ["q1", "q2"], CHAT, client=client, progress=False, checkpoint=folder)
    assert again.texts == ["Echo: q1", "Echo: q2"]  # q1 from its own record, q2 sent
    assert [r.json["messages"][-1]["content"] for r in invocations(workspace)] == ["q1", "q2"]
    assert "1 records in the checkpoint not used (1 not written by your dbmagic" in again.summary()


def test_the_cache_serves_only_its_own_principal(workspace, tmp_path):
    folder = tmp_path / "cache"
    dbmagic.use_cache(folder)
    try:
        mine = Client(host=workspace.host, token=workspace.token)
        assert mine.complete("hello", endpoint=CHAT).text == "Echo: hello"
        assert mine.complete("hello", endpoint=CHAT).cached
        other = Client(host=workspace.host, token=workspace.add_user("c.user@dbmagic.test"))
        assert not other.complete("hello", endpoint=CHAT).cached  # sent: C has no answer of its own here
        assert len(invocations(workspace)) == 2
    finally:
        dbmagic.use_cache(None)


def test_new_files_are_0600_and_folders_0700(workspace, tmp_path):
    folder = tmp_path / "made" / "for" / "this"
    dbmagic.batch("{{ row }}", ["q1"], CHAT, client=Client(host=workspace.host, token=workspace.token),
                  progress=False, checkpoint=folder)
    for made in (tmp_path / "made", tmp_path / "made" / "for", folder):
        assert made.stat().st_mode & 0o777 == 0o700
    assert {f.stat().st_mode & 0o777 for f in folder.glob("*.jsonl")} == {0o600}
    key = tmp_path / "home" / ".config" / "dbmagic" / "ledger.key"
    assert key.stat().st_mode & 0o777 == 0o600 and key.parent.stat().st_mode & 0o777 == 0o700


# -- 3. the ledger reads any folder and writes any answer --------------------------------------------

def test_bad_files_are_skipped_and_counted_never_followed(workspace, tmp_path):
    """Item 3: on main each of these crashed or hung every batch and cache use of the folder."""
    import os

    folder = tmp_path / "ck"
    client = Client(host=workspace.host, token=workspace.token)
    dbmagic.batch("{{ row }}", ["q1"], CHAT, client=client, progress=False, checkpoint=folder)
    (folder / "a-cut.jsonl").write_bytes('{"v": 2, "text": "caf\u00e9'.encode()[:-1] + b"\n")  # cut in a character
    (folder / "b-deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    good = next(json.loads(line) for f in folder.glob("2*.jsonl") for line in f.read_text().splitlines()
                if "text" in json.loads(line))
    (folder / "c-typed.jsonl").write_text(json.dumps({**good, "latency_ms": "fast"}) + "\n")
    os.mkfifo(folder / "d-fifo.jsonl")
    os.symlink("/dev/zero", folder / "e-zero.jsonl")
    os.symlink(tmp_path / "nowhere", folder / "f-dangling.jsonl")
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(dbmagic.batch(
        "{{ row }}", ["q1", "q2"], CHAT, client=client, progress=False, checkpoint=folder)), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the batch hung on the folder"
    result = outcome[0]
    assert result.texts == ["Echo: q1", "Echo: q2"] and result.from_checkpoint == 1
    assert "6 unreadable lines or files of the checkpoint skipped" in result.summary()
    dbmagic.use_cache(folder)
    try:
        from IPython.core.interactiveshell import InteractiveShell  # noqa: F401 (the magic's describe and clear)
        store = dbmagic.call.ledger.cache()
        assert "6 unreadable" in store.describe()["skipped"]
        assert store.clear() >= 1 and (folder / "e-zero.jsonl").is_symlink()  # what dbmagic did not write stays
    finally:
        dbmagic.use_cache(None)


def test_an_answer_with_a_lone_surrogate_is_written_and_read_back(workspace, tmp_path):
    """Item 3: on main the paid call raised while writing it, and a checkpointed batch lost every answer
    on every rerun."""
    folder = tmp_path / "ck"
    client = Client(host=workspace.host, token=workspace.token)
    cut = "A model cut off mid-emoji \ud83d"
    workspace.fail(CHAT, text=cut)
    first = dbmagic.batch("{{ row }}", ["q1", "q2"], CHAT, client=client, progress=False, concurrency=1,
                          checkpoint=folder)
    assert first.texts == [cut, "Echo: q2"] and first.failed == []
    again = dbmagic.batch("{{ row }}", ["q1", "q2"], CHAT, client=client, progress=False, checkpoint=folder)
    assert again.texts == first.texts and again.from_checkpoint == 2 and len(invocations(workspace)) == 2


BATCH_AT_ONCE = '''
import json, sys
import dbmagic
from dbmagic import Client
client = Client(host=sys.argv[1], token=sys.argv[2])
rows = [f"row {i}" for i in range(int(sys.argv[4]))]
result = dbmagic.batch("{{ row }}", rows, "slowish", client=client, progress=False, checkpoint=sys.argv[3],
                       concurrency=8)
print(json.dumps({"texts": result.texts}))
'''


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_two_batches_on_one_checkpoint_at_once_send_each_request_once(workspace, tmp_path, how):
    """Item 3: on main two batches on one checkpoint at once sent 200 requests for 100 rows."""
    import subprocess
    import sys

    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("slowish", "llm/v1/chat", latency=0.02))
    folder, n = tmp_path / "ck", 100
    rows = [f"row {i}" for i in range(n)]
    if how == "threads":
        client = Client(host=workspace.host, token=workspace.token)
        a = dbmagic.batch("{{ row }}", rows, "slowish", client=client, progress=False, checkpoint=folder,
                          concurrency=8, background=True)
        b = dbmagic.batch("{{ row }}", rows, "slowish", client=client, progress=False, checkpoint=folder,
                          concurrency=8, background=True)
        texts = [a.result(timeout=120).texts, b.result(timeout=120).texts]
    else:
        env = {"HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
        runs = [subprocess.Popen([sys.executable, "-c", BATCH_AT_ONCE, workspace.host, workspace.token, str(folder),
                                  str(n)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        texts = []
        for run in runs:
            out, err = run.communicate(timeout=120)
            assert run.returncode == 0, err[-2000:]
            texts.append(json.loads(out.strip().splitlines()[-1])["texts"])
    assert texts[0] == texts[1] == [f"Echo: row {i}" for i in range(n)]
    sent = [r.json["messages"][-1]["content"] for r in invocations(workspace, "slowish")]
    assert sorted(sent) == sorted(rows)  # each request once, whichever batch sent it


# -- 4. server text is scrubbed wherever it goes, the answer included --------------------------------

@pytest.fixture
def echoing(workspace):
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("echo-proxy", "llm/v1/chat", echo_headers=True))
    workspace.add_endpoint(Endpoint("echo-model", None, "CUSTOM_MODEL", echo_headers=True))
    return workspace


@pytest.mark.parametrize("split", [None, 3, 7])
def test_an_echoed_token_never_reaches_the_cell_the_checkpoint_or_the_value(shell, echoing, tmp_path, split):
    """Item 4: on main an app or proxy that echoes headers put the token into the cell output, the
    cache and checkpoint files, MLflow traces and judge rationales. ``split``: the answer streamed in
    pieces of that many characters, so the token arrives split across events."""
    token = echoing.token
    if split:
        echoing.fail("echo-proxy", chunk_chars=split)
    shell.run_cell_magic("dbllm", "-e echo-proxy -o said", "hello")
    said = shell.user_ns["said"]
    assert "Authorization: Bearer ***" in said and token not in said
    shown = repr(shell.display_pub.outputs)
    assert token not in shown and token[:20] not in shown and "Bearer ***" in shown
    result = dbmagic.batch("{{ row }}", ["a", "b"], "echo-proxy", client=Client(host=echoing.host, token=token),
                           progress=False, checkpoint=tmp_path / "ck")
    assert all("Bearer ***" in t and token not in t for t in result.texts)
    assert token not in "".join(f.read_text() for f in (tmp_path / "ck").glob("*.jsonl"))


def test_tool_arguments_and_custom_model_values_are_scrubbed(client, echoing):
    token = echoing.token
    echoing.fail(CHAT, tool_call={"name": "lookup", "arguments": {"q": f"send it to {token}"}})

    def lookup(q: str) -> str:
        return q

    call = client.complete("look it up", endpoint=CHAT, tools=[lookup])
    assert call.tool_calls[0].arguments == {"q": "send it to ***"} and token not in json.dumps(call.raw)
    echoing.fail(CHAT, tool_call={"name": "lookup", "arguments": {"q": f"send it to {token}"}}, chunk_chars=4)
    streamed = client.stream("look it up", endpoint=CHAT, tools=[lookup])
    list(streamed)
    assert streamed.completion.tool_calls[0].arguments == {"q": "send it to ***"}
    value = client.complete("predict", endpoint="echo-model").value
    assert token not in json.dumps(value) and "Bearer ***" in json.dumps(value)


def test_a_bearer_value_in_any_case_is_scrubbed_from_an_answer(client, workspace):
    """The answer's check for a ``Bearer`` value looked for "earer" and "EARER" only, so a server
    text with ``bEaReR <value>`` kept its value."""
    workspace.fail(CHAT, text="send bEaReR abc.def-12345 with it")
    assert client.complete("x", endpoint=CHAT).text == "send bEaReR *** with it"
    workspace.fail(CHAT, text="send bEaReR abc.def-12345 with it", chunk_chars=3)
    assert client.stream("x", endpoint=CHAT).wait().text == "send bEaReR *** with it"


def test_a_secret_that_json_escapes_is_scrubbed_from_a_value():
    """An answer is first looked at as JSON text; a secret with a quote, a backslash or a control
    character is written escaped there, so the value is walked for it instead."""
    from dbmagic.errors import scrub_value

    secret = 'pa"ss\\word-12345'
    answer = {"choices": [{"message": {"content": f"it is {secret}"}}], secret: 1}
    assert scrub_value(answer, [secret]) == {"choices": [{"message": {"content": "it is ***"}}], "***": 1}
    untouched = {"choices": [{"message": {"content": "nothing here"}}]}
    assert scrub_value(untouched, ["dapi0123456789"]) is untouched  # nothing to scrub: nothing copied


def test_a_cut_stream_keeps_no_half_of_a_token(client, workspace):
    workspace.fail(CHAT, text=f"the token is {workspace.token} end", chunk_chars=4, cut_after=6)
    call = client.stream("x", endpoint=CHAT)
    with pytest.raises(dbmagic.StreamInterrupted) as info:
        list(call)
    kept = info.value.partial
    assert kept.startswith("the token is ") and workspace.token[:10] not in kept and kept.endswith("***")


# -- 5. limits that limit ----------------------------------------------------------------------------

def test_a_timeout_is_a_deadline_for_a_trickled_body(client, workspace):
    """Item 5: on main timeout=2 held a call 14-15 s against a body trickled a byte at a time."""
    workspace.fail(CHAT, trickle=0.02)  # about 300 bytes: 6 s
    started = time.monotonic()
    with pytest.raises(dbmagic.RequestTimeout, match="within the call's timeout of 1 s"):
        client.complete("x", endpoint=CHAT, timeout=1)
    assert time.monotonic() - started < 2.5


def test_a_timeout_is_a_deadline_for_a_stream_kept_alive_by_comments(client, workspace):
    """Item 5: SSE comments kept a stream alive past its timeout on main."""
    workspace.fail(CHAT, keepalive=0.1, keepalive_for=6)
    call = client.stream("x", endpoint=CHAT, timeout=1)
    started = time.monotonic()
    with pytest.raises(dbmagic.StreamInterrupted, match="timeout of 1 s passed"):
        list(call)
    assert time.monotonic() - started < 2.5


def test_a_gzip_bomb_is_refused_at_the_answer_cap(client, workspace):
    """Item 5: on main a 380 KB gzip body became a 400 MB answer."""
    workspace.fail(CHAT, gzip_bomb=100 << 20)
    with pytest.raises(dbmagic.BadResponse, match="larger than 8 MB"):
        client.complete("x", endpoint=CHAT, max_answer_mb=8)
    assert client.complete("after it", endpoint=CHAT).text == "Echo: after it"  # the client is fine


def test_a_10_mb_streamed_answer_is_put_together_in_linear_time(client, workspace):
    """Item 5: on main a streamed answer was built by += (10 MB did not finish in 60 s)."""
    text = "word " * (2 << 20)  # 10 MB
    workspace.fail(CHAT, text=text, chunk_chars=1024)
    started = time.monotonic()
    call = client.stream("x", endpoint=CHAT)
    for _ in call:
        pass
    assert call.completion.text == text
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("usage, concurrency", [("no", 16), ("low", 16), ("yes", 64)])
def test_a_token_budget_is_a_bound_whatever_the_endpoint_reports(workspace, usage, concurrency):
    """Item 5: on main max_tokens_total never tripped when the endpoint reported no usage or a low
    total (all 100 of 100 rows sent), and overshot 11x at concurrency 16, 43x at 64."""
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("counted", "llm/v1/chat", latency=0.01, usage=usage))
    client = Client(host=workspace.host, token=workspace.token)
    rows = [f"row {i} " + "word " * 20 for i in range(100)]
    result = dbmagic.batch("{{ row }}", rows, "counted", client=client, progress=False, concurrency=concurrency,
                           max_tokens_total=1000, max_tokens=30)
    sent = invocations(workspace, "counted")
    answers = [t for t in result.texts if t is not None]
    assert 0 < len(sent) < 100 and len(answers) == len(sent)
    estimate = sum(dbmagic.batching.budget.tokens_in(json.dumps(r.json, ensure_ascii=False)) + dbmagic.batching.budget.tokens_in(t)
                   for r, t in zip(sent, answers, strict=True))
    counted = result.usage.total if usage == "yes" else estimate
    assert counted <= 1000  # what was sent fits the budget, however many were in flight
    if usage != "yes":
        assert "counted against the budget by estimate" in result.summary()


def test_one_answer_runs_at_most_max_tool_runs_tools(client, workspace):
    """Item 5: on main one answer ran a tool 2,000 times (max_steps counts round trips only)."""
    runs = []

    def ping(n: int = 0) -> str:
        runs.append(n)
        return "pong"

    calls = [{"name": "ping", "arguments": {"n": i}} for i in range(2000)]
    from dbmagic.testing import MemoryHandler, reply

    def respond(sent):
        tool_calls = [{"id": f"c{i}", "type": "function", "function": {"name": c["name"],
                                                                        "arguments": json.dumps(c["arguments"])}}
                      for i, c in enumerate(calls)]
        return reply(200, {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": tool_calls},
                                        "finish_reason": "tool_calls"}]})

    memory = Client(host="https://adb-1.2.azuredatabricks.net", token="t", handler=MemoryHandler(respond))
    completion = memory.complete("ping a lot", endpoint="e", task="chat", tools=[ping], run_tools=True)
    assert runs == [] and len(completion.pending_tool_calls) == 2000  # shown, not run: past --max-tool-runs
    del calls[50:]  # an answer asking for 50 at a time: 2 rounds fit in 120 runs, the third does not
    few = memory.complete("ping a lot", endpoint="e", task="chat", tools=[ping], run_tools=True, max_tool_runs=120)
    assert len(runs) == 100 and len(few.steps) == 2 and len(few.pending_tool_calls) == 50


def test_a_batch_runs_a_notebook_function_one_call_at_a_time_unless_marked_thread_safe(workspace):
    """Item 5: on main a batch ran one notebook function in 16 threads at once, undocumented."""
    client = Client(host=workspace.host, token=workspace.token)
    inside, most = [0], [0]
    guard = threading.Lock()

    def lookup(item: str) -> str:
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        with guard:
            inside[0] -= 1
        return f"{item}: 3 in stock"

    result = dbmagic.batch("Check {{ row }}", [f"item{i}" for i in range(16)], CHAT, client=client, progress=False,
                           concurrency=16, tools=[lookup], run_tools=True)
    assert result.failed == [] and most[0] == 1
    most[0] = 0
    result = dbmagic.batch("Check {{ row }}", [f"item{i}" for i in range(16)], CHAT, client=client, progress=False,
                           concurrency=16, tools=[dbmagic.call.tools.thread_safe(lookup)], run_tools=True)
    assert result.failed == [] and most[0] > 1


# -- 6. smaller ------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["body", "event", "arguments"])
def test_deep_json_from_the_server_is_a_dbmagic_error(client, where):
    """Item 6: on main deep JSON in a body, an SSE event or tool arguments escaped as a bare RecursionError."""
    from dbmagic.testing import MemoryHandler, events, reply

    deep = "[" * 100_000 + "]" * 100_000

    def respond(sent):
        if where == "body":
            return reply(200, body=('{"choices": [{"message": {"content": ' + deep + '}}]}').encode())
        if where == "event":
            return events(b'{"choices": [{"delta": {"content": ' + deep.encode() + b'}}]}')
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
        return reply(200, {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                        "finish_reason": "tool_calls"}]})

    memory = Client(host="https://adb-1.2.azuredatabricks.net", token="memory-token-123", handler=MemoryHandler(respond))
    if where == "event":
        with pytest.raises(dbmagic.StreamInterrupted, match="nested too deeply"):
            list(memory.stream("x", endpoint="e", task="chat"))
    elif where == "body":
        with pytest.raises(dbmagic.BadResponse, match="nested too deeply"):
            memory.complete("x", endpoint="e", task="chat")
    else:
        def f(x: int = 0) -> int:
            return x

        call = memory.complete("x", endpoint="e", task="chat", tools=[f]).tool_calls[0]
        assert call.arguments is None and "nested too deeply" in call.problem


def test_a_verbose_traceback_shows_no_notebook_variable(shell, workspace, capsys):
    """Item 6: on main, under %xmode Verbose the traceback printed the magic's namespace local: every
    notebook variable."""
    shell.run_line_magic("xmode", "Verbose")
    shell.user_ns["private_notes"] = "NOTEBOOK-PRIVATE-VALUE"
    shell.run_cell("def leave(**request):\n    raise KeyboardInterrupt('stop here')\n")
    shell.run_cell(f"%%dbllm -e {CHAT} --transform-input leave\nHello")
    shell.user_ns["rows"] = ["a", "b"]
    shell.run_cell(f"%%dbllm -e {CHAT} --over rows --transform-input leave\n{{{{ row }}}}")
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "KeyboardInterrupt" in out and "Notebook(" in out  # the traceback, with the namespace as a summary
    assert "NOTEBOOK-PRIVATE-VALUE" not in out


def test_a_cached_answer_keeps_its_tool_calls(client, workspace, tmp_path):
    """Item 6: on main a cached answer lost its tool calls."""
    def weather(city: str) -> str:
        return "sunny"

    dbmagic.use_cache(tmp_path / "cache")
    try:
        first = client.complete("Weather in Paris?", endpoint=CHAT, tools=[weather])
        again = client.complete("Weather in Paris?", endpoint=CHAT, tools=[weather])
    finally:
        dbmagic.use_cache(None)
    assert again.cached and [(c.name, c.arguments) for c in again.tool_calls] == \
        [(c.name, c.arguments) for c in first.tool_calls] != []


def test_only_an_apps_own_subdomain_gets_a_token(client):
    """Item 6: on main the bare apex databricksapps.com was accepted."""
    from dbmagic.transport.apps import app_url_or_none as _app_url_or_none

    assert _app_url_or_none("https://databricksapps.com", client.credentials.host) is None
    assert _app_url_or_none("https://agent-1.aws.databricksapps.com", client.credentials.host) is not None


def test_cache_show_and_clear_survive_odd_entries(shell, workspace, tmp_path, capsys):
    """Item 6: on main %dbllm cache clear crashed on a dangling symlink."""
    import os

    folder = tmp_path / "cache"
    shell.run_line_magic("config", f'DbLLM.cache = "{folder}"')
    try:
        shell.run_line_magic("dbllm", f"-e {CHAT} hello")
        os.symlink(tmp_path / "nowhere", folder / "dangling.jsonl")
        os.mkfifo(folder / "fifo.jsonl")
        shell.run_line_magic("dbllm", "cache")
        shell.run_line_magic("dbllm", "cache clear")
        assert "Cleared the cache: 1 answers dropped" in capsys.readouterr().out
        assert (folder / "dangling.jsonl").is_symlink() and list(folder.glob("2*.jsonl")) == []
    finally:
        shell.run_line_magic("config", "DbLLM.cache = None")
