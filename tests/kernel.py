"""A real kernel for the tests about what a notebook's kernel sees: reply status, queued cells, Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def real_kernel(env: dict[str, str], cwd: str) -> Iterator[Any]:
    """A python3 kernel (this interpreter's) with ``env`` added to a clean environment (no real
    ``DATABRICKS_*``), started in ``cwd``; yields its client."""
    from jupyter_client.manager import start_new_kernel

    full = {k: v for k, v in os.environ.items() if not k.startswith("DATABRICKS_")}
    full.update(PYSPARK_PYTHON=sys.executable, **env)
    manager, client = start_new_kernel(kernel_name="python3", env=full, cwd=cwd)
    try:
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def outcome(client: Any, msg_id: str, timeout: float = 120) -> tuple[str, str]:
    """``(reply status, what the cell printed and its error)`` of the cell ``msg_id``, as a front end
    gets them: ``ok``, ``error``, or ``aborted`` for a cell queued behind an error."""
    said = []
    while True:
        msg = client.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            said.append(content["text"])
        elif kind == "error":
            said.append(f"{content['ename']}: {content['evalue']}")
        elif kind == "status" and content["execution_state"] == "idle":
            break
    reply = client.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = client.get_shell_msg(timeout=timeout)
    return reply["content"]["status"], "".join(said)


def run(client: Any, code: str, timeout: float = 300) -> tuple[str, str]:
    return outcome(client, client.execute(code), timeout)


def run_queued(client: Any, *codes: str, timeout: float = 120) -> list[tuple[str, str]]:
    """Cells queued one after the other (as Run All queues them), each's ``(status, said)``."""
    ids = [client.execute(code, stop_on_error=True) for code in codes]
    return [outcome(client, msg_id, timeout) for msg_id in ids]
