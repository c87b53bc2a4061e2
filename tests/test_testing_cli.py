"""``python -m dbmagic.testing``: a local workspace from the shell, usable by the exports it prints."""

from __future__ import annotations

import pytest

import dbmagic
from dbmagic import Client
from dbmagic.testing import in_another_process

from .conftest import CHAT


def test_command_line_workspace_serves_until_ctrl_c():
    with in_another_process("--chunk-delay", "0") as env:  # Ctrl-C must end it with exit code 0
        assert set(env) == {"DATABRICKS_HOST", "DATABRICKS_TOKEN"}
        client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"])
        assert "".join(client.stream("from the shell", endpoint=CHAT)) == "Echo: from the shell"


def test_command_line_latency_and_rate_limit():
    with in_another_process("--latency", "0.2", "--rate-limit", "2", "--no-retry-after") as env:
        client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"],
                        retry=dbmagic.RetryPolicy(attempts=1))
        assert client.complete("one", endpoint=CHAT, task="chat").latency >= 0.2
        client.complete("two", endpoint=CHAT, task="chat")
        with pytest.raises(dbmagic.RateLimited) as info:  # a third request within the second
            client.complete("three", endpoint=CHAT, task="chat")
        assert info.value.retry_after is None and info.value.status == 429


def test_help_reads_as_plain_text():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dbmagic.testing", "--help"], capture_output=True, text=True, check=True)
    assert "``" not in out.stdout and "run a local workspace until Ctrl-C" in " ".join(out.stdout.split())
