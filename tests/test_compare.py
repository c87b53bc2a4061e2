"""Comparing endpoints and settings side by side in one cell, against the local workspace."""

from __future__ import annotations

import pandas as pd
import pytest
from IPython.core.error import UsageError

from dbmagic.batching.result import Comparison

from .conftest import CHAT, COMPLETIONS, EMBEDDINGS

AGENT = "local-responses-agent"


def invocations(ws):
    return [r for r in ws.requests if r.path.endswith("/invocations")]


def final(shell):
    return shell.display_pub.outputs[-1]


def test_endpoints_are_asked_at_the_same_time_in_the_order_given(shell, workspace):
    # each request is held until all three have arrived: one after the other would get a 409
    workspace.fail((CHAT, COMPLETIONS, AGENT), gather=3, times=3, gather_timeout=5)
    shell.run_cell_magic("dbllm", f"-e {COMPLETIONS} -e {CHAT} -e {AGENT} -o cmp", "Hello")
    cmp = shell.user_ns["cmp"]
    assert isinstance(cmp, Comparison) and shell.user_ns["_dbllm"] is cmp
    assert list(cmp) == [COMPLETIONS, CHAT, AGENT]
    assert [cmp[k].text for k in cmp] == ["Echo: Hello"] * 3
    table = final(shell)["data"]["text/html"]
    assert table.index(f"<th>{COMPLETIONS}</th>") < table.index(f"<th>{CHAT}</th>") < table.index(f"<th>{AGENT}</th>")
    models = [c["served_model"] for c in final(shell)["metadata"]["dbmagic"]["compare"]]
    assert models == ["local-instruct", "meta-llama-3.3-70b-instruct", None]
    assert [c["endpoint"] for c in final(shell)["metadata"]["dbmagic"]["compare"]] == [
        COMPLETIONS, CHAT, AGENT]  # the names, as data (on main the label "endpoint 'x'")


def test_one_endpoint_failing_does_not_hide_the_others(shell, workspace):
    shell.run_cell_magic("dbllm", f"--compare nope,{CHAT} -o cmp", "Hi")
    cmp = shell.user_ns["cmp"]
    assert "endpoint 'nope' was not found" in str(cmp["nope"]) and cmp[CHAT].text == "Echo: Hi"
    html = final(shell)["data"]["text/html"]
    assert "⚠ endpoint &#x27;nope&#x27; was not found" in html and "Echo: Hi" in html


def test_a_sweep_of_settings_and_a_grid(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {CHAT} -t 0 -t 0.8 -o sweep", "Hi")
    assert list(shell.user_ns["sweep"]) == ["t=0.0", "t=0.8"]
    assert sorted(r.json["temperature"] for r in invocations(workspace)) == [0.0, 0.8]
    workspace.requests.clear()
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e {COMPLETIONS} --max-tokens 1 --max-tokens 3 -o grid", "one two three")
    assert list(shell.user_ns["grid"]) == [f"{CHAT} · max_tokens=1", f"{CHAT} · max_tokens=3",
                                           f"{COMPLETIONS} · max_tokens=1", f"{COMPLETIONS} · max_tokens=3"]
    assert shell.user_ns["grid"][f"{COMPLETIONS} · max_tokens=3"].text == "Echo: one two"
    assert len(invocations(workspace)) == 4


def test_more_than_sixteen_calls_is_refused_before_sending(shell, workspace):
    endpoints = " ".join(f"-e e{i}" for i in range(5))
    with pytest.raises(UsageError, match=r"Comparing 5 endpoint x 4 temperature makes 20 calls side by side; at most 16"):
        shell.run_cell_magic("dbllm", f"{endpoints} -t 0 -t 0.5 -t 1 -t 1.5", "Hi")
    assert workspace.requests == []


def test_repeat_gives_median_latency_and_how_often_answers_differ(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e {COMPLETIONS} --repeat 3 -o cmp", "Hi")
    cmp = shell.user_ns["cmp"]
    assert [len(cmp.runs[k]) for k in cmp] == [3, 3] and len(invocations(workspace)) == 6
    table = cmp.to_pandas()
    assert list(table.columns) == [CHAT, COMPLETIONS]
    assert table.loc["distinct_answers"].tolist() == [1, 1] and table.loc["runs"].tolist() == [3, 3]
    latencies = sorted(r.latency for r in cmp.runs[CHAT])
    assert table.loc["latency_ms", CHAT] == round(latencies[1] * 1000, 1)
    assert "distinct answers" in final(shell)["data"]["text/html"]


def test_answers_stream_into_their_columns(shell, workspace):
    workspace.chunk_delay = 0.05
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e {AGENT}", "one two three four")
    htmls = [o["data"]["text/html"] for o in shell.display_pub.outputs if "text/html" in o["data"]]
    assert any(" …" in h for h in htmls[:-1])  # partial answers were shown while streaming
    assert htmls[-1].count("Echo: one two three four") == 2


def test_compare_over_a_dataframe_gives_one_column_per_endpoint(shell, workspace, capsys):
    shell.user_ns["df"] = pd.DataFrame({"text": ["a", "b"]})
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e {COMPLETIONS} --over df -o out", "Say {{ text }}")
    out = shell.user_ns["out"]
    assert list(out.columns) == ["text", f"answer:{CHAT}", f"error:{CHAT}", f"answer:{COMPLETIONS}",
                                 f"error:{COMPLETIONS}"]
    assert out[f"answer:{COMPLETIONS}"].tolist() == ["Echo: Say a", "Echo: Say b"]
    assert capsys.readouterr().out.count("2 rows in") == 2


def test_chat_is_refused_and_dry_run_shows_each_request(shell, workspace):
    with pytest.raises(UsageError, match="drop --chat"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} -e {COMPLETIONS} --chat", "Hi")
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e {COMPLETIONS} --dry-run", "Hi")
    shown = [o["data"]["text/plain"] for o in shell.display_pub.outputs[-2:]]
    assert '"messages"' in shown[0] and '"prompt": "Hi"' in shown[1]
    assert invocations(workspace) == []


def test_long_swept_values_keep_a_column_each_and_compare_is_not_dropped(shell, workspace):
    """On main two --system values alike in their first 21 characters made one column, and
    `--compare A --compare B` kept only B."""
    long_a, long_b = "You are a careful assistant. Answer in French.", "You are a careful assistant. Answer in German."
    shell.run_cell_magic("dbllm", f'-e {CHAT} --system "{long_a}" --system "{long_b}" --no-stream -o both', "x")
    result = shell.user_ns["both"]
    assert len(result) == 2 and len(set(result)) == 2
    assert sorted(result[label].text for label in result) == [f"[{long_a}] Echo: x", f"[{long_b}] Echo: x"]
    shell.user_ns["rows"] = ["r"]
    shell.run_cell_magic("dbllm", f'-e {CHAT} --system "{long_a}" --system "{long_b}" --over rows -o table',
                         "{{ row }}")
    assert len(shell.user_ns["table"]) == 2
    with pytest.raises(UsageError, match="--compare: given twice.*--compare A,B"):
        shell.run_cell_magic("dbllm", f"--compare {CHAT} --compare {EMBEDDINGS}", "x")
    with pytest.raises(UsageError, match="--timeout: given twice"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --timeout 5 --timeout 9", "x")
