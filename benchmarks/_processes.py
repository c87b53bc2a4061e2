"""Whole-process timings shared by the benchmarks."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time


def median_process_times(statements: dict[str, str], runs: int, python: str | None = None) -> dict[str, float]:
    """Median seconds of ``python -c CODE`` for each statement, interleaved run by run.

    Byte-code is cached as in a user's environment (pip compiles installed packages, and an editable
    install writes ``__pycache__`` on first import): PYTHONDONTWRITEBYTECODE, set on some machines,
    would time the compiler instead; one warm-up run each fills the cache.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    python = python or sys.executable
    for code in statements.values():
        subprocess.run([python, "-c", code], check=True, env=env, stderr=subprocess.DEVNULL)
    times: dict[str, list[float]] = {name: [] for name in statements}
    for _ in range(runs):
        for name, code in statements.items():
            start = time.perf_counter()
            subprocess.run([python, "-c", code], check=True, env=env, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}
