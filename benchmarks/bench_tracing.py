"""What MLflow tracing costs, measured side by side in one run against the local workspace (by hand).

    python benchmarks/bench_tracing.py [--calls 60] [--rows 500] [--rounds 3]

Needs the ``mlflow`` extra. Traces go to a temporary sqlite store (as in the tests). Prints:
- per call at 50 ms server latency, a chat endpoint: tracing off and on, interleaved call by call
  (target: on <= 1.10x off), the trace of each call carrying what MLflow's autologgers write;
- a 500-row batch at 50 ms, concurrency 16: rows per second with tracing off and on, interleaved
  run by run, medians (target: on >= 0.9x off): one trace a row, each saved as it ends.

The workspace runs in its own process (``python -m dbmagic.testing``), so its threads do not share
this process's interpreter lock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import served  # noqa: E402

CHAT = "databricks-meta-llama-3-3-70b-instruct"


def per_call_off_and_on(client, endpoint: str, calls: int) -> tuple[float, float]:
    """Median seconds a call takes with tracing off and on, interleaved call by call."""
    import dbmagic

    off, on = [], []
    for _ in range(calls):
        start = time.perf_counter()
        client.complete("Hi", endpoint=endpoint)
        off.append(time.perf_counter() - start)
        dbmagic.autolog()
        start = time.perf_counter()
        client.complete("Hi", endpoint=endpoint)
        on.append(time.perf_counter() - start)
        dbmagic.autolog(disable=True)
    return statistics.median(off), statistics.median(on)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="dbmagic-bench-tracing-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "32")
    os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", "")  # no price catalog to download
    import mlflow

    import dbmagic

    mlflow.create_experiment("bench-tracing", artifact_location=f"{Path(folder).as_uri()}/artifacts")
    mlflow.set_experiment("bench-tracing")  # its store and artifacts in the temporary folder, not ./mlruns
    print(f"{time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"mlflow {mlflow.__version__}", flush=True)
    with served("--latency", "0.05") as client:
        client.endpoint(CHAT)
        dbmagic.autolog()  # MLflow's first trace sets up its store: not part of what is measured
        client.complete("warm up", endpoint=CHAT)
        dbmagic.autolog(disable=True)
        a, b = per_call_off_and_on(client, CHAT, args.calls)
        print(f"per call at 50 ms, tracing off / on: {a * 1000:.1f} / {b * 1000:.1f} ms -> {b / a:.3f}x")
        prompts = [f"row {i}" for i in range(args.rows)]
        rates: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                if mode == "on":
                    dbmagic.autolog()
                start = time.perf_counter()
                result = dbmagic.batch("{{ row }}", prompts, endpoint=CHAT, concurrency=16, client=client,
                                       progress=False)
                rates[mode].append(args.rows / (time.perf_counter() - start))
                dbmagic.autolog(disable=True)
                assert not result.failed
        mlflow.flush_trace_async_logging()
        a, b = statistics.median(rates["off"]), statistics.median(rates["on"])
        print(f"batch of {args.rows} at 50 ms, concurrency 16, tracing off / on: {a:.1f} / {b:.1f} rows/s "
              f"-> {b / a:.3f}x (rounds: off {[round(r, 1) for r in rates['off']]}, "
              f"on {[round(r, 1) for r in rates['on']]})")


if __name__ == "__main__":
    main()
