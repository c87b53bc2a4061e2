"""A new user's first hour, round two: each test names the item of the issue it covers, and failed
on main. What is about the kernel (a cell's reply status, the cells queued behind it, Ctrl-C) runs
in a real kernel."""

from __future__ import annotations

import json
import re
import time

import pytest
from IPython.core.error import UsageError

import dbmagic
from dbmagic import Client
from dbmagic.testing import Endpoint

from .conftest import CHAT
from .kernel import outcome, real_kernel, run, run_queued


def invocations(workspace, endpoint=CHAT):
    return [r for r in workspace.requests if r.path == f"/serving-endpoints/{endpoint}/invocations"]


# -- 1. the README's first cells, as written ------------------------------------------------------------

def test_a_comment_on_the_magic_line_is_a_comment(shell, workspace, capsys):
    """Item 1: on main `%dbllm whoami   # ...` raised a UsageError offering to send the comment as a
    prompt, and a one-line prompt sent its comment to the model."""
    shell.run_line_magic("dbllm", "whoami   # workspace host, credential source and auth type")
    assert "credential" in repr(shell.display_pub.outputs[-1]) or "source" in repr(shell.display_pub.outputs[-1])
    shell.run_line_magic("dbllm", f"-e {CHAT} What is 2+2?      # a one-line prompt")
    shell.run_line_magic("dbllm", f"-e {CHAT} Is C# or F# better for tag #1?")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream   # the chat endpoint", "Hello")
    sent = [r.json["messages"][-1]["content"] for r in invocations(workspace)]
    assert sent == ["What is 2+2?", "Is C# or F# better for tag #1?", "Hello"]


def test_a_refused_config_is_repaired_with_none(shell, workspace):
    """Item 2: on main, after `%config DbLLM.transform_input = ""` (refused), `= None`, as the error
    suggests, changed nothing and every cell kept failing."""
    shell.run_line_magic("config", 'DbLLM.transform_input = ""')
    with pytest.raises(UsageError, match="was refused"):
        shell.run_line_magic("dbllm", f"-e {CHAT} hello")
    shell.run_line_magic("config", "DbLLM.transform_input = None")
    shell.run_line_magic("dbllm", f"-e {CHAT} hello")
    assert shell.user_ns["_dbllm"].text == "Echo: hello"


# -- 3. a cell that did nothing fails (in a real kernel: Run All stops) -----------------------------------

@pytest.fixture
def kernel(workspace, tmp_path):
    workspace.add_endpoint(Endpoint("steady", "llm/v1/chat", latency=0.4))
    with real_kernel({**workspace.environ(), "HOME": str(tmp_path / "home")}, str(tmp_path)) as client:
        status, said = run(client, "%load_ext dbmagic\nimport pandas as pd")
        assert status == "ok", said
        yield client


def test_cells_that_did_nothing_fail_and_stop_the_cells_queued_behind(kernel, workspace):
    """Item 3: on main a comparison where every column failed and --over where every row got a 400
    reported ok to the kernel, so the next queued cells ran."""
    workspace.fail(CHAT, 400, times=2)
    workspace.fail("local-completions", 400)
    compared, after = run_queued(kernel, f"%%dbllm -e {CHAT} -e local-completions\nHello", "print('ran')")
    assert compared[0] == "error" and "Every compared call failed (2 of 2" in compared[1]
    assert after[0] == "aborted"
    workspace.fail(CHAT, 400, times=3)
    over, after = run_queued(kernel, "rows = ['a', 'b', 'c']", "")[0], None
    over, after = run_queued(kernel, f"%%dbllm -e {CHAT} --over rows\n{{{{ row }}}}", "print('ran')")
    assert over[0] == "error" and "Every row of --over rows failed (3 BadRequest)" in over[1]
    assert "The commonest, 3 times:" in over[1] and "refused the request" in over[1]
    assert after[0] == "aborted"
    status, said = run(kernel, "print(_dbllm.summary())")
    assert status == "ok" and "3 failed (3 BadRequest)" in said  # the result is kept all the same


def test_fail_on_error_fails_on_any_failed_row_and_the_summary_says_why(kernel, workspace):
    workspace.fail(CHAT, 400)
    status, said = run(kernel, "rows = ['a', 'b', 'c']\n")
    status, said = run(kernel, f"%%dbllm -e {CHAT} --over rows --concurrency 1\n{{{{ row }}}}")
    assert status == "ok" and "2 answered, 1 failed (1 BadRequest)" in said
    workspace.fail(CHAT, 400)
    status, said = run(kernel, f"%%dbllm -e {CHAT} --over rows --concurrency 1 --fail-on-error\n{{{{ row }}}}")
    assert status == "error" and "1 of 3 rows of --over rows failed and --fail-on-error is on" in said


def test_ctrl_c_during_over_keeps_what_arrived_and_fails_the_cell(kernel, workspace):
    """Item 3: on main Ctrl-C during --over reported ok (the next queued cells ran) and the rows never
    sent had no answer and no error."""
    run(kernel, "rows = [f'r{i}' for i in range(12)]")
    over = kernel.execute("%%dbllm -e steady --over rows --concurrency 2\n{{ row }}")
    after = kernel.execute("print('ran')", stop_on_error=True)
    deadline = time.monotonic() + 10
    while len([r for r in workspace.requests if r.path.endswith("/steady/invocations")]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    from jupyter_client import KernelManager  # noqa: F401 (the kernel's own manager interrupts it)

    kernel.parent.interrupt_kernel()
    status, said = outcome(kernel, over)
    assert status == "error" and "KeyboardInterrupt" in said
    assert outcome(kernel, after)[0] == "aborted"
    status, said = run(kernel, "r = _dbllm\nprint(len(r.texts), sum(t is not None for t in r.texts), r.summary())")
    assert status == "ok"
    total, answered, summary = said.split(" ", 2)
    assert total == "12" and 2 <= int(answered) < 12 and "not sent (interrupted)" in summary
    status, said = run(kernel, "print(all(e for t, e in zip(_dbllm.texts, _dbllm.errors) if t is None))")
    assert said.strip() == "True"  # every row without an answer says why


# -- 5. checked before paying ---------------------------------------------------------------------------

def test_an_unknown_judge_is_refused_before_any_row_is_sent(shell, workspace):
    """Item 5: on main `--judge politeness` (no such judge) was refused after every row was sent."""
    pytest.importorskip("mlflow")
    shell.user_ns["rows"] = ["a", "b"]
    with pytest.raises(UsageError, match="no scorer named 'politeness'"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --judge politeness", "{{ row }}")
    assert invocations(workspace) == []


def test_a_builtin_judge_without_a_reachable_model_is_refused_before_sending(shell, workspace, monkeypatch):
    """Item 5: on main `--judge Safety` without a reachable judge model gave all-None columns, the
    reason only in a log line."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    shell.user_ns["rows"] = ["a", "b"]
    with pytest.raises(UsageError, match=r"judges with 'openai:/gpt-4.1-mini'.*OPENAI_API_KEY is not set.*"
                                         r"Safety\(model="):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --judge Safety", "{{ row }}")
    assert invocations(workspace) == []


@pytest.mark.parametrize("rows", [["a", "b"], [{"text": "a"}], "series"])
def test_over_a_list_or_series_checks_the_templates_names_first(shell, workspace, rows):
    """Item 5: on main --over a Series or a list with an undefined name was not refused up front."""
    import pandas as pd

    shell.user_ns["rows"] = pd.Series(["a", "b"]) if rows == "series" else rows
    with pytest.raises(UsageError, match="The template uses missing_name, which the rows do not have"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows", "{{ missing_name }}")
    assert invocations(workspace) == []


# -- 6. paths -----------------------------------------------------------------------------------------

def test_a_checkpoint_path_takes_names_and_a_volume_path_is_never_made_here(shell, workspace, tmp_path):
    """Item 6: on main `--checkpoint {ck}` wrote to a folder literally named `{ck}`, and a /Volumes
    path made /Volumes at the root of a laptop."""
    from pathlib import Path

    shell.user_ns.update(rows=["a"], ck=str(tmp_path / "runs"), run_id="7")
    shell.run_cell_magic("dbllm", f'-e {CHAT} --over rows --checkpoint "{{{{ ck }}}}/{{{{ run_id }}}}"', "{{ row }}")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --checkpoint {{{{ck}}}}/8", "{{ row }}")
    assert list((tmp_path / "runs" / "7").glob("*.jsonl")) and list((tmp_path / "runs" / "8").glob("*.jsonl"))
    with pytest.raises(UsageError, match="a path holds no { or }"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --checkpoint {{ck}}", "{{ row }}")
    assert not list(Path.cwd().glob("{ck}"))
    if Path("/Volumes").exists():
        pytest.skip("this machine has a /Volumes")
    with pytest.raises(UsageError, match="is a path on Databricks.*this machine has no /Volumes"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows --checkpoint /Volumes/main/default/work/t",
                             "{{ row }}")
    assert not Path("/Volumes").exists()


# -- 7. traces are readable when the cell ends ----------------------------------------------------------

def test_a_traced_cells_traces_are_readable_in_the_next_cell(shell, workspace, tmp_path):
    """Item 7: on main search_traces() right after a traced cell returned nothing for seconds."""
    mlflow = pytest.importorskip("mlflow")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:  # the artifacts beside the store (MLflow's default is ./mlruns, the checkout)
        experiment_id = mlflow.create_experiment(f"first-hour-{tmp_path.name}",
                                                 artifact_location=(tmp_path / "artifacts").as_uri())
        experiment = mlflow.set_experiment(experiment_id=experiment_id)
        shell.run_line_magic("dbllm", "trace on")
        shell.run_line_magic("dbllm", f"-e {CHAT} --no-stream hello")
        found = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")  # no flush here
        assert len(found) == 1
        shell.user_ns["rows"] = ["a", "b"]
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over rows", "{{ row }}")
        found = mlflow.search_traces(locations=[experiment.experiment_id], return_type="list")
        assert len(found) == 4  # and the batch's: a trace a row, and its summary
    finally:
        shell.run_line_magic("dbllm", "trace off")
        mlflow.set_tracking_uri(before)  # None would be ./mlflow.db in the checkout


# -- 8. messages ----------------------------------------------------------------------------------------

def test_messages_a_newcomer_reads(client, workspace):
    """Item 8: tokens read as in and out (not "14 → 15", which reads as a decrease); "Could not reach
    ... ()" had empty parentheses; a 500 or a 504 did not say the request may have run."""
    completion = client.complete("one two three", endpoint=CHAT)
    assert re.fullmatch(r"\d+ tokens in, \d+ out", completion.usage.describe())
    for status in (500, 504):
        workspace.fail(CHAT, status)
        with pytest.raises(dbmagic.StatusError, match="may have run"):
            client.complete("x", endpoint=CHAT)
    from dbmagic.transport.http import TransportFailure, _transport_error

    assert "()" not in str(_transport_error(TransportFailure("connect"), "endpoint 'x'", "https://h", 1.0))


def test_a_failing_transform_says_where_its_traceback_is(shell, workspace):
    shell.run_cell("def broken(**request):\n    raise ValueError('no')\n")
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("dbllm", f"-e {CHAT} --transform-input broken", "x")
    assert "traceback is above" not in str(info.value) and "its traceback is shown" in str(info.value)


def test_the_panel_copy_follows_the_fields_and_shows_code_as_code(shell, workspace):
    """Item 8: on main the Copy-as-cell box kept a stale cell, errors showed raw backticks, and the
    Reset conversation button was cut."""
    from dbmagic.frontends.panel import Panel

    panel = Panel(shell)
    panel.endpoint.value = CHAT
    panel.prompt.value = "first"
    panel.copy_as_cell()
    assert panel.cell_text.value.endswith("\nfirst")
    panel.prompt.value = "second"
    panel.controls["temperature"].value = "0.3"
    assert panel.cell_text.value.endswith("\nsecond") and "--temperature=0.3" in panel.cell_text.value
    panel._set_status("Run `%dbllm endpoints` first", error=True)
    assert "<code>%dbllm endpoints</code>" in panel.status.value and "`" not in panel.status.value
    assert panel.reset_button.layout.width == "auto" and panel.compare_endpoints.rows >= 8


# -- 9. reached for and missing -------------------------------------------------------------------------

def test_every_answer_of_n_is_surfaced(shell, workspace, client):
    """Item 9: on main with -n 3 only the first answer was surfaced."""
    completion = client.complete("hi", endpoint=CHAT, n=3)
    assert completion.choices == ["Echo: hi", "Echo: hi [2]", "Echo: hi [3]"] and completion.text == "Echo: hi"
    streamed = client.stream("hi", endpoint=CHAT, n=3)
    assert "".join(streamed) == "Echo: hi" and streamed.completion.choices == completion.choices
    shell.run_cell_magic("dbllm", f"-e {CHAT} -n 3", "hi")
    shown = shell.display_pub.outputs[-1]["data"]["text/markdown"]
    assert "**Answer 3 of 3:**" in shown and "Echo: hi [3]" in shown


def test_a_service_principal_in_code_reaches_endpoints_and_apps(workspace):
    """Item 9: on main there was no Client(client_id=, client_secret=) for a service principal."""
    secret = workspace.add_service_principal("sp-etl")
    client = Client(host=workspace.host, client_id="sp-etl", client_secret=secret)
    assert client.complete("hi", endpoint=CHAT).text == "Echo: hi" and client.credentials.auth_type == "oauth-m2m"
    assert secret not in repr(client) + repr(client.credentials) + json.dumps(client.whoami())
    app = workspace.add_app("etl-agent")
    assert client.complete("hi", endpoint="apps/etl-agent").text == "Echo: hi" and app.requests[-1].credential == "oauth"
    with pytest.raises(dbmagic.ConfigurationError, match="client_secret= is missing"):
        _ = Client(host=workspace.host, client_id="sp-etl").credentials


def test_a_vs_code_login_reaches_an_app(workspace, monkeypatch):
    """Item 9: on main a VS Code login could not reach an app although the README said it could."""
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_AUTH_TYPE", "metadata-service")
    monkeypatch.setenv("DATABRICKS_METADATA_SERVICE_URL", workspace.metadata_service_url)
    app = workspace.add_app("support-agent")
    client = Client()
    assert client.whoami()["databricks apps"] == "the VS Code extension's OAuth token"
    assert client.complete("hi", endpoint="apps/support-agent").text == "Echo: hi"
    assert app.requests[-1].credential == "oauth"
