"""``python -m dbmagic.testing``: a local workspace from the shell, usable by the exports it prints."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

import dbmagic
from dbmagic import Client

from .conftest import CHAT


def start(*args: str) -> tuple[subprocess.Popen, dict[str, str]]:
    """The command line workspace, and the variables it tells the user to export."""
    proc = subprocess.Popen([sys.executable, "-m", "dbmagic.testing", *args], stdout=subprocess.PIPE, text=True)
    env = {}
    for line in proc.stdout:
        if line.strip().startswith("export "):
            name, value = line.strip()[len("export "):].split("=", 1)
            env[name] = value
        if line.startswith("Ctrl-C stops it."):
            break
    return proc, env


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0


def test_command_line_workspace_serves_until_ctrl_c():
    proc, env = start("--chunk-delay", "0")
    try:
        assert set(env) == {"DATABRICKS_HOST", "DATABRICKS_TOKEN"}
        client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"])
        assert "".join(client.stream("from the shell", endpoint=CHAT)) == "Echo: from the shell"
    finally:
        stop(proc)


def test_command_line_latency_and_rate_limit():
    proc, env = start("--latency", "0.2", "--rate-limit", "2", "--no-retry-after")
    try:
        client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"],
                        retry=dbmagic.RetryPolicy(attempts=1))
        assert client.complete("one", endpoint=CHAT, task="chat").latency >= 0.2
        client.complete("two", endpoint=CHAT, task="chat")
        with pytest.raises(dbmagic.RateLimited) as info:  # a third request within the second
            client.complete("three", endpoint=CHAT, task="chat")
        assert info.value.retry_after is None and info.value.status == 429
    finally:
        stop(proc)
