"""The call ledger (dbmagic.call.ledger) under a batch's checkpoint: rows it answers are not sent again,
in this process, after a SIGKILL and from another process, asserted on the local workspace's log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

import dbmagic
from dbmagic import Client, ConfigurationError
from dbmagic.call.ledger import Ledger
from dbmagic.testing import Endpoint

from .conftest import CHAT


def answered(workspace, endpoint=CHAT):
    """The prompts the endpoint answered (200), in order."""
    return [r.json["messages"][-1]["content"] for r in workspace.requests
            if r.path == f"/serving-endpoints/{endpoint}/invocations" and r.status == 200]


def test_a_checkpoint_answers_the_rows_it_holds_and_a_request_is_sent_once(workspace, tmp_path):
    client = Client(host=workspace.host, token=workspace.token)
    rows = [f"r{i}" for i in range(8)] + ["r0", "r1"]  # two rows repeat a request
    first = dbmagic.batch("{{ row }}", rows, CHAT, client=client, progress=False, checkpoint=tmp_path / "ck")
    assert first.texts == [f"Echo: {r}" for r in rows]
    assert sorted(answered(workspace)) == sorted(f"r{i}" for i in range(8))  # r0 and r1 sent once each
    again = dbmagic.batch("{{ row }}", rows, CHAT, client=client, progress=False, checkpoint=tmp_path / "ck")
    assert again.texts == first.texts and len(answered(workspace)) == 8  # nothing sent the second time
    assert again.from_checkpoint == 10 and all(c.cached for c in again) and again.usage == first.usage
    assert "(10 from the checkpoint, not sent)" in again.summary()
    other = dbmagic.batch("Say {{ row }}", rows[:3], CHAT, client=client, progress=False, checkpoint=tmp_path / "ck")
    assert other.from_checkpoint == 0 and len(answered(workspace)) == 11  # another template: other requests
    records = [json.loads(line) for f in sorted((tmp_path / "ck").glob("*.jsonl")) for line in f.read_text().splitlines()]
    answers = [r for r in records if "claim" not in r]  # each request was claimed, then answered
    assert len(answers) == 11 == len(records) - 11 and workspace.token not in json.dumps(records)


def test_a_checkpoint_keeps_values_read_by_a_schema_and_transforms_run_again(workspace, tmp_path):
    client = Client(host=workspace.host, token=workspace.token)
    schema = "n: int, word: str"
    first = dbmagic.batch("{{ row }}", ["one two", "three"], CHAT, client=client, progress=False, schema=schema,
                          checkpoint=tmp_path / "ck")
    again = dbmagic.batch("{{ row }}", ["one two", "three"], CHAT, client=client, progress=False, schema=schema,
                          checkpoint=tmp_path / "ck", transform_output=lambda v: {**v, "seen": True})
    assert [v["n"] for v in again.values] == [v["n"] for v in first.values] and all(v["seen"] for v in again.values)
    assert again.from_checkpoint == 2 and len(answered(workspace)) == 2


def test_a_failed_row_is_recorded_and_sent_again(workspace, tmp_path):
    client = Client(host=workspace.host, token=workspace.token)
    workspace.fail(CHAT, 400)
    first = dbmagic.batch("{{ row }}", ["a", "b"], CHAT, client=client, progress=False, concurrency=1,
                          checkpoint=tmp_path / "ck")
    assert len(first.failed) == 1
    ledger = Ledger(tmp_path / "ck")
    assert ledger.records == 2 and len(ledger.answers) == 1
    again = dbmagic.batch("{{ row }}", ["a", "b"], CHAT, client=client, progress=False, checkpoint=tmp_path / "ck")
    assert again.failed == [] and again.from_checkpoint == 1


def test_resume_no_longer_keeps_answers_to_another_template(workspace):
    """On main, resume= compared only the number of rows: a result of another template was taken as answers."""
    client = Client(host=workspace.host, token=workspace.token)
    first = dbmagic.batch("Summarise {{ row }}", ["a", "b"], CHAT, client=client, progress=False)
    again = dbmagic.batch("Translate {{ row }}", ["a", "b"], CHAT, client=client, progress=False, resume=first)
    assert again.texts == ["Echo: Translate a", "Echo: Translate b"]
    same = dbmagic.batch("Translate {{ row }}", ["a", "b"], CHAT, client=client, progress=False, resume=again)
    assert same.texts == again.texts and len(answered(workspace)) == 4  # the matching answers kept, none sent


def test_a_checkpoint_that_is_a_file_is_refused(tmp_path, workspace):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is a file: a checkpoint is a folder"):
        dbmagic.batch("{{ row }}", ["a"], CHAT, progress=False, checkpoint=tmp_path / "file",
                      client=Client(host=workspace.host, token=workspace.token))
    assert answered(workspace) == []


def test_the_magic_takes_a_checkpoint(shell, workspace, tmp_path):
    shell.user_ns["rows"] = pd.DataFrame({"text": ["x", "y"]})
    line = f"-e {CHAT} --over rows --checkpoint {tmp_path / 'ck'} -o out"
    shell.run_cell_magic("dbllm", line, "{{ text }}")
    shell.run_cell_magic("dbllm", line, "{{ text }}")
    assert list(shell.user_ns["out"]["answer"]) == ["Echo: x", "Echo: y"] and len(answered(workspace)) == 2
    assert shell.user_ns["_dbllm"].from_checkpoint == 2


RUN = textwrap.dedent("""
    import json, sys, dbmagic
    from dbmagic import Client
    rows = [f"row {i}" for i in range(int(sys.argv[2]))]
    result = dbmagic.batch("{{ row }}", rows, "slow", client=Client(), progress=False, concurrency=4,
                           checkpoint=sys.argv[1])
    print(json.dumps({"texts": result.texts, "reused": result.from_checkpoint}))
""")


def test_a_batch_killed_halfway_loses_nothing_and_a_new_process_sends_only_the_rest(workspace, tmp_path):
    workspace.add_endpoint(Endpoint("slow", "llm/v1/chat", latency=0.05))
    n, checkpoint = 60, str(tmp_path / "ck")
    env = {**os.environ, **workspace.environ()}
    child = subprocess.Popen([sys.executable, "-c", RUN, checkpoint, str(n)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(answered(workspace, "slow")) < n // 2 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    before = len(answered(workspace, "slow"))
    assert n // 2 <= before < n, "the kill came too late to prove anything"
    finished = subprocess.run([sys.executable, "-c", RUN, checkpoint, str(n)], env=env, capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    out = json.loads(finished.stdout.strip().splitlines()[-1])
    assert out["texts"] == [f"Echo: row {i}" for i in range(n)]  # complete and in order
    sent = answered(workspace, "slow")
    twice = [p for p in set(sent) if sent.count(p) > 1]
    assert set(sent) == {f"row {i}" for i in range(n)} and len(twice) <= 4  # at most the calls in flight at the kill
    assert out["reused"] >= before - 4


def test_a_budget_stops_sending_and_keeps_every_finished_row(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(20)], CHAT, client=client, progress=False,
                           concurrency=4, max_tokens_total=150, max_tokens=8)
    answered_rows = [i for i, t in enumerate(result.texts) if t is not None]
    assert answered_rows and answered_rows == list(range(len(answered_rows))) and len(answered_rows) < 20
    assert result.texts[:len(answered_rows)] == [f"Echo: r{i}" for i in answered_rows]
    assert all(e.startswith("Not sent: the batch reached its budget of 150 tokens")
               for e in result.errors[len(answered_rows):])
    assert result.usage.total <= 150 and len(answered(workspace)) == len(answered_rows)  # a bound, not a hope
    with pytest.raises(ConfigurationError, match="max_tokens_total must be"):
        dbmagic.batch("{{ row }}", ["a"], CHAT, client=client, progress=False, max_tokens_total=0)
    with pytest.raises(ConfigurationError, match="One row alone may cost more than the budget"):
        dbmagic.batch("{{ row }}", ["a"], CHAT, client=client, progress=False, max_tokens_total=100)


def test_a_batch_dry_run_counts_rows_and_tokens_and_sends_nothing(shell, workspace, capsys):
    shell.user_ns["rows"] = pd.DataFrame({"text": ["a" * 40, "b" * 40, None]})
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --dry-run", "Say {{ text }}")
    said = capsys.readouterr().out
    assert "--over rows: 2 rows would be sent (1 kept back by a missing value), about 22 input tokens" in said
    assert answered(workspace) == []


# -- the cache: the same request answered from the ledger -----------------------------------------------

@pytest.fixture
def cache_dir(tmp_path):
    yield tmp_path / "cache"
    dbmagic.use_cache(None)


def test_the_cache_answers_the_same_request_and_not_a_warm_one_unless_always(workspace, cache_dir):
    client = Client(host=workspace.host, token=workspace.token)
    dbmagic.use_cache(cache_dir)
    first = client.complete("Hi", endpoint=CHAT, temperature=0)
    again = client.complete("Hi", endpoint=CHAT, temperature=0)
    assert (again.text, again.cached, first.cached) == (first.text, True, False) and len(answered(workspace)) == 1
    streamed = client.stream("Hi", endpoint=CHAT, temperature=0)  # streamed or not: the same request
    assert list(streamed) == ["Echo: Hi"] and streamed.completion.cached and len(answered(workspace)) == 1
    warm = [client.complete("Hi", endpoint=CHAT, temperature=0.7) for _ in range(2)]
    assert not any(c.cached for c in warm) and len(answered(workspace)) == 3  # sent each time, not recorded
    dbmagic.use_cache(cache_dir, mode="always")
    assert not client.complete("Hi", endpoint=CHAT, temperature=0.7).cached  # now recorded ...
    assert client.complete("Hi", endpoint=CHAT, temperature=0.7).cached and len(answered(workspace)) == 4


def test_run_all_twice_with_the_cache_makes_no_request_the_second_time(workspace, cache_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cells = ["import os\n%load_ext dbmagic\n%config DbLLM.cache = os.environ['DBMAGIC_TEST_CACHE']",
             f"%%dbllm -e {CHAT} -o said\nSummarise our refund policy.",
             "import pandas as pd\ntickets = pd.DataFrame({'text': ['a', 'b', 'c']})",
             f"%%dbllm -e {CHAT} --over tickets -o labelled\nLabel: {{{{ text }}}}",
             "print(said, list(labelled['answer']))"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    env = {**os.environ, **workspace.environ(), "DBMAGIC_TEST_CACHE": str(cache_dir)}
    outputs = []
    for _ in range(2):
        ran = nbclient.NotebookClient(nbformat.from_dict(json.loads(json.dumps(nb))), timeout=60,
                                      kernel_name="python3")
        executed = ran.execute(env=env)
        outputs.append(executed.cells[-1].outputs[0]["text"])
        if len(outputs) == 1:
            first_run = len(answered(workspace))
    assert first_run == 4 and len(answered(workspace)) == 4  # Run All again: zero requests
    assert outputs[0] == outputs[1] == "Echo: Summarise our refund policy. ['Echo: Label: a', 'Echo: Label: b', " \
                                       "'Echo: Label: c']\n"


def test_the_cache_in_the_cell_its_trace_and_its_subcommand(shell, workspace, cache_dir, capsys):
    shell.run_line_magic("config", f"DbLLM.cache = {str(cache_dir)!r}")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "Hello")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "Hello")
    assert len(answered(workspace)) == 1
    assert shell.display_pub.outputs[-1]["metadata"]["dbmagic"]["cached"] is True
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream --cache off", "Hello")
    assert len(answered(workspace)) == 2
    shell.run_line_magic("dbllm", "cache")
    shown = shell.display_pub.outputs[-1]["data"]["text/plain"]
    assert str(cache_dir) in shown and "answers" in shown
    shell.run_line_magic("dbllm", "cache clear")
    assert "Cleared the cache: 1 answers dropped" in capsys.readouterr().out
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "Hello")
    assert len(answered(workspace)) == 3
    shell.run_line_magic("config", "DbLLM.cache = None")


def test_ctrl_c_keeps_the_answers_on_their_way_in_the_checkpoint_too(workspace, tmp_path):
    import _thread
    import threading

    workspace.add_endpoint(Endpoint("steady", "llm/v1/chat", latency=0.5))
    client = Client(host=workspace.host, token=workspace.token)
    timer = threading.Timer(0.75, _thread.interrupt_main)  # the second pair is on its way
    timer.start()
    try:
        first = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(8)], "steady", client=client, progress=False,
                              concurrency=2, checkpoint=tmp_path / "ck")
    finally:
        timer.cancel()
    assert first.interrupted and len(Ledger(tmp_path / "ck").answers) == 4 == len(answered(workspace, "steady"))


# -- background runs ------------------------------------------------------------------------------------

def test_a_background_batch_returns_at_once_and_ends_as_a_foreground_one(workspace):
    workspace.add_endpoint(Endpoint("steady", "llm/v1/chat", latency=0.1))
    client = Client(host=workspace.host, token=workspace.token)
    rows = pd.DataFrame({"text": [f"t{i}" for i in range(10)]})
    started = time.monotonic()
    handle = dbmagic.batch("{{ text }}", rows, "steady", client=client, progress=False, concurrency=2,
                           background=True)
    assert time.monotonic() - started < 0.5 and not handle.done  # a batch of about 0.5 s: still running
    assert repr(handle).startswith("BackgroundBatch(") and ("running" in repr(handle) or "starting" in repr(handle))
    background = handle.result(timeout=30)
    assert handle.done and "10 answered" in handle.progress()
    foreground = dbmagic.batch("{{ text }}", rows, "steady", client=client, progress=False, concurrency=2)
    assert background.equals(foreground)


def test_a_background_batch_cancelled_keeps_what_was_sent(workspace):
    workspace.add_endpoint(Endpoint("steady", "llm/v1/chat", latency=0.3))
    client = Client(host=workspace.host, token=workspace.token)
    handle = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(20)], "steady", client=client, progress=False,
                           concurrency=2, background=True)
    time.sleep(0.45)  # the second pair is on its way
    handle.cancel()
    result = handle.result(timeout=10)
    assert result.interrupted and result.texts[:4] == [f"Echo: r{i}" for i in range(4)]
    assert len(answered(workspace, "steady")) == 4 and result.missing == list(range(4, 20))


def test_two_batches_at_once_on_one_endpoint_share_its_pace(workspace):
    workspace.add_endpoint(Endpoint("limited", "llm/v1/chat", latency=0.02, rate_limit=8, retry_after=False))
    client = Client(host=workspace.host, token=workspace.token)
    a = dbmagic.batch("a {{ row }}", list(range(16)), "limited", client=client, progress=False, concurrency=4,
                      background=True)
    b = dbmagic.batch("b {{ row }}", list(range(16)), "limited", client=client, progress=False, concurrency=4,
                      background=True)
    a.result(timeout=60), b.result(timeout=60)
    first, second = a.batch_result, b.batch_result
    assert first.failed == [] == second.failed and first.limiter is second.limiter  # one pace for both
    log = [r for r in workspace.requests if r.path.endswith("/limited/invocations")]
    accepted = [r.at for r in log if r.status == 200]
    assert len(accepted) == 32
    # within the endpoint's limit: no second holds more than 8 accepted requests (the server's own rule),
    # and the refused ones stay a minority: the two batches paced each other instead of each hammering
    assert [r.status for r in log].count(429) < len(accepted)


RUN_IN_KERNEL = """
import dbmagic
from dbmagic import Client
handle = dbmagic.batch("{{ row }}", [f"k{i}" for i in range(12)], "steady", client=Client(), progress=False,
                       concurrency=2, background=True)
"""


def test_a_background_batch_lets_other_cells_run_in_a_real_kernel(workspace):
    jupyter_client = pytest.importorskip("jupyter_client")
    workspace.add_endpoint(Endpoint("steady", "llm/v1/chat", latency=0.25))
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3", env={**os.environ, **workspace.environ()})
    try:
        def run(code):
            msg_id = kc.execute(code)
            out = []
            while True:
                msg = kc.get_iopub_msg(timeout=60)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])
                if msg["msg_type"] == "error":
                    raise AssertionError("\n".join(msg["content"]["traceback"]))
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    return "".join(out)

        run(RUN_IN_KERNEL)
        assert run("print(1 + 1, handle.done)") == "2 False\n"  # a cell ran while the batch was running
        assert run("print(handle.result(timeout=30).texts[-1], handle.done)") == "Echo: k11 True\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_magic_runs_a_batch_in_the_background(shell, workspace):
    workspace.add_endpoint(Endpoint("steady", "llm/v1/chat", latency=0.1))
    shell.user_ns["rows"] = pd.DataFrame({"text": ["x", "y", "z"]})
    shell.run_cell_magic("dbllm", "-e steady --over rows --background -o run", "{{ text }}")
    handle = shell.user_ns["run"]
    assert shell.user_ns["_dbllm"] is handle
    assert list(handle.result(timeout=30)["answer"]) == ["Echo: x", "Echo: y", "Echo: z"]
    with pytest.raises(Exception, match="are for a batch: use them with --over"):
        shell.run_cell_magic("dbllm", "-e steady --background", "one")


def test_a_cost_budget_prices_answers_as_mlflow_does_and_refuses_a_model_without_a_price(workspace):
    pytest.importorskip("mlflow")
    client = Client(host=workspace.host, token=workspace.token)
    # the tests' price catalog (tests/model_catalog): 0.5 USD an input token, 1.5 an output token
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(10)], CHAT, client=client, progress=False,
                           concurrency=2, max_cost=60, max_tokens=5)
    sent = len(answered(workspace))
    cost = sum(0.5 * c.usage.input + 1.5 * c.usage.output for c in result if isinstance(c, dbmagic.Completion))
    assert 0 < sent < 10 and cost <= 60 and result.texts[sent - 1] is not None  # a bound: nothing past it sent
    assert result.errors[-1].startswith("Not sent: the batch reached its budget of $60.0000")
    with pytest.raises(ConfigurationError, match="MLflow has no price for local-instruct"):
        dbmagic.batch("{{ row }}", ["a"], "local-completions", client=client, progress=False, max_cost=1)
    with pytest.raises(ConfigurationError, match="one budget"):
        dbmagic.batch("{{ row }}", ["a"], CHAT, client=client, progress=False, max_cost=1, max_tokens_total=5)
    assert len(answered(workspace)) == sent


def test_a_reused_answer_goes_through_transform_output_once(workspace, tmp_path):
    client = Client(host=workspace.host, token=workspace.token)
    loud = dict(transform_output=lambda v: v + "!", client=client, progress=False, checkpoint=tmp_path / "ck")
    first = dbmagic.batch("{{ row }}", ["a"], CHAT, **loud)
    again = dbmagic.batch("{{ row }}", ["a"], CHAT, **loud)
    assert first.values == again.values == ["Echo: a!"] and again.from_checkpoint == 1
    vectors = dbmagic.batch("{{ row }}", ["x"], "databricks-gte-large-en", client=client, progress=False,
                            checkpoint=tmp_path / "ck")
    reused = dbmagic.batch("{{ row }}", ["x"], "databricks-gte-large-en", client=client, progress=False,
                           checkpoint=tmp_path / "ck")
    assert reused.values == vectors.values and reused.from_checkpoint == 1  # an embedding's own value


def test_a_checkpoint_written_faster_than_a_file_a_second_keeps_every_row(tmp_path):
    """A writer closes its file every ROTATE records and starts another. On main the next file's
    name (time to the second, process, writer) was the last one's when both came within a second,
    and the batch died with FileExistsError. In memory, 2,500 answers take well under a second."""
    from dbmagic.call.ledger import ROTATE
    from dbmagic.testing import MemoryHandler, reply

    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}]}

    def respond(sent):
        if sent.url.endswith("/invocations"):
            return reply(200, answer)
        return reply(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "not here"})

    handler = MemoryHandler(respond)
    client = Client(host="https://adb-1.2.azuredatabricks.net", token="dapi-memory-token-1234", handler=handler)
    rows = [f"row {i}" for i in range(2 * ROTATE + 500)]
    first = dbmagic.batch("{{ row }}", rows, "memory-chat", client=client, progress=False, task="chat",
                          checkpoint=tmp_path / "ck")
    assert first.failed == [] and len(Ledger(tmp_path / "ck").answers) == len(rows)
    assert len(list((tmp_path / "ck").glob("*.jsonl"))) >= 3
    sent = len(handler.sent)
    again = dbmagic.batch("{{ row }}", rows, "memory-chat", client=client, progress=False, task="chat",
                          checkpoint=tmp_path / "ck")
    assert again.from_checkpoint == len(rows) and not [s for s in handler.sent[sent:] if s.url.endswith("/invocations")]
