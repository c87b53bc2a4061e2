"""What a batch's checkpoint (the call ledger) costs, side by side in one run (by hand, not in CI).

    python benchmarks/bench_ledger.py [--rows 2000] [--rounds 3] [--resume-rows 10000]

Prints:
- 2,000 rows at 50 ms server latency, concurrency 16: rows per second with ``checkpoint=`` and
  without, interleaved run by run, medians (target: with >= 0.95x without); each run with a new
  checkpoint folder, so every row is sent;
- a resume: a checkpoint holding 9,000 of 10,000 rows, then the batch again: the seconds until its
  first request reaches the workspace (target: < 1 s), and that only the 1,000 missing rows are sent.

The workspace runs in its own process (``python -m dbmagic.testing``) for the throughput, in this
one for the resume (its request log is read).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import served  # noqa: E402

import dbmagic  # noqa: E402
from dbmagic import Client  # noqa: E402
from dbmagic.testing import LocalWorkspace  # noqa: E402

CHAT = "databricks-meta-llama-3-3-70b-instruct"


def throughput(rows: int, rounds: int) -> None:
    prompts = [f"row {i}" for i in range(rows)]
    rates: dict[str, list[float]] = {"without": [], "with": []}
    with served("--latency", "0.05") as client:
        client.endpoint(CHAT)
        for _ in range(rounds):
            for mode in ("without", "with"):
                folder = tempfile.mkdtemp(prefix="dbmagic-bench-ledger-") if mode == "with" else None
                start = time.perf_counter()
                result = dbmagic.batch("{{ row }}", prompts, CHAT, client=client, progress=False, concurrency=16,
                                       checkpoint=folder)
                rates[mode].append(rows / (time.perf_counter() - start))
                assert not result.failed and result.from_checkpoint == 0
    a, b = statistics.median(rates["without"]), statistics.median(rates["with"])
    print(f"{rows} rows at 50 ms, concurrency 16, checkpoint off / on: {a:.1f} / {b:.1f} rows/s -> {b / a:.3f}x "
          f"(rounds: off {[round(r, 1) for r in rates['without']]}, on {[round(r, 1) for r in rates['with']]})")


def resume(rows: int) -> None:
    folder = tempfile.mkdtemp(prefix="dbmagic-bench-resume-")
    prompts = [f"row {i}" for i in range(rows)]
    done = rows * 9 // 10
    with LocalWorkspace() as ws:
        client = Client(host=ws.host, token=ws.token)
        dbmagic.batch("{{ row }}", prompts[:done], CHAT, client=client, progress=False, concurrency=32,
                      checkpoint=folder)
        ws.clear()
        start = time.monotonic()
        result = dbmagic.batch("{{ row }}", prompts, CHAT, client=client, progress=False, concurrency=32,
                               checkpoint=folder)
        first = min(r.at for r in ws.requests if r.path.endswith("/invocations"))
        sent = sum(1 for r in ws.requests if r.path.endswith("/invocations"))
    print(f"resume of {rows} rows, {done} in the checkpoint: first request after {first - start:.3f} s; "
          f"{sent} sent, {result.from_checkpoint} from the checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resume-rows", type=int, default=10000)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}", flush=True)
    throughput(args.rows, args.rounds)
    resume(args.resume_rows)


if __name__ == "__main__":
    main()
