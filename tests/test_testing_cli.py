"""``python -m dbmagic.testing``: a local workspace from the shell, usable by the exports it prints."""

from __future__ import annotations

import signal
import subprocess
import sys

from dbmagic import Client

from .conftest import CHAT


def test_command_line_workspace_serves_until_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "dbmagic.testing", "--chunk-delay", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        env = {}
        for line in proc.stdout:
            if line.strip().startswith("export "):
                name, value = line.strip()[len("export "):].split("=", 1)
                env[name] = value
            if line.startswith("Ctrl-C stops it."):
                break
        assert set(env) == {"DATABRICKS_HOST", "DATABRICKS_TOKEN"}
        client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"])
        assert "".join(client.stream("from the shell", endpoint=CHAT)) == "Echo: from the shell"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
