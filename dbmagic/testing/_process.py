"""`in_another_process`: ``python -m dbmagic.testing`` in a process of its own, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator

READY = "Ctrl-C stops it."  # the last line ``python -m dbmagic.testing`` prints before it serves


@contextlib.contextmanager
def in_another_process(*args: str) -> Iterator[dict[str, str]]:
    """``python -m dbmagic.testing ARGS`` in another process (so that its threads do not share this
    interpreter's lock, as for a benchmark), yielding the variables it prints to export; Ctrl-C
    (SIGINT) ends it, and it must end cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "dbmagic.testing", *args], stdout=subprocess.PIPE, text=True)
    env: dict[str, str] = {}
    try:
        for line in proc.stdout or ():
            if line.strip().startswith("export "):
                name, value = line.strip()[len("export "):].split("=", 1)
                env[name] = value
            if line.startswith(READY):
                break
        yield env
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:  # never left running behind (it would hold this process's pipe)
            proc.kill()
            proc.wait()
            raise RuntimeError("python -m dbmagic.testing did not end within 10 s of Ctrl-C; it was killed") from None
        if code != 0:
            raise RuntimeError(f"python -m dbmagic.testing ended with exit code {code}")
