"""A soak: 10,000 calls in a row through one client, memory and descriptors at start and end (by hand).

    python benchmarks/bench_soak.py [--calls 10000]

The workspace runs in its own process, so what is measured is the client's. Prints resident memory
(VmRSS) and open file descriptors after a warm-up, every quarter, and at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import served  # noqa: E402

ENDPOINT = "databricks-meta-llama-3-3-70b-instruct"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    args = parser.parse_args()
    with served() as client:
        for _ in range(200):  # warm: the pool, caches, lazy imports
            client.complete("warm", endpoint=ENDPOINT)
        start_rss, start_fds, started = rss_kib(), fds(), time.perf_counter()
        print(f"after warm-up: {start_rss / 1024:.1f} MiB resident, {start_fds} open descriptors")
        for i in range(1, args.calls + 1):
            client.complete(f"call {i}", endpoint=ENDPOINT)
            if i % (args.calls // 4) == 0:
                print(f"after {i:>6} calls: {rss_kib() / 1024:.1f} MiB resident, {fds()} open descriptors")
        seconds = time.perf_counter() - started
    print(f"{args.calls} calls in {seconds:.1f} s; memory {start_rss / 1024:.1f} -> {rss_kib() / 1024:.1f} MiB, "
          f"descriptors {start_fds} -> {fds()}")


if __name__ == "__main__":
    main()
