"""Prompts over a cluster, against a rate-limited endpoint (by hand, not in CI).

    python benchmarks/bench_cluster.py [--rows 300] [--limit 20] [--partitions 4,16,64]

Spark local[4] (four tasks at once) over ``--rows`` rows in 4, 16 and 64 partitions, against an
endpoint of the local workspace (in this process, so its request log is read) that admits
``--limit`` requests a second and answers the rest 429 without ``Retry-After``; next to
`dbmagic.batch` over the same rows on the driver. Prints the share of the limit reached (rows a
second over the limit, over the wall time), the 429s and the failed rows (target: >= 90% of the
limit, 0 failed), and what part of the wall time went before the first request (Spark starting the
job) and the share over the requests' own span (the pacing alone).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import spark_session  # noqa: E402

from dbmagic import Client  # noqa: E402
from dbmagic.testing import Endpoint, LocalWorkspace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--limit", type=float, default=20)
    parser.add_argument("--partitions", default="4,16,64")
    parser.add_argument("--retry-after", action="store_true", help="429s carry Retry-After")
    args = parser.parse_args()
    import dbmagic.batching.spark

    spark = spark_session("local[4]")
    name = "limited"
    with LocalWorkspace(endpoints=[Endpoint(name, "llm/v1/chat", latency=0.05, rate_limit=args.limit,
                                            retry_after=args.retry_after)]) as ws:
        client = Client(host=ws.host, token=ws.token)
        rows = [(i, f"row {i}") for i in range(args.rows)]
        print(f"{time.strftime('%Y-%m-%d')}: {args.rows} rows, endpoint limit {args.limit:g}/s, 50 ms, 429s "
              f"{'with' if args.retry_after else 'without'} Retry-After, concurrency 4 a task, local[4]")

        def report(label: str, started: float, failed: int) -> None:
            seconds = time.monotonic() - started
            log = [r for r in ws.requests if r.path.endswith("/invocations")]
            rate = args.rows / seconds
            first = min(r.at for r in log) - started  # before it: Spark's job and task start, not pacing
            span = max(r.at for r in log) - min(r.at for r in log)
            print(f"  {label:28} {rate:6.1f} rows/s  {rate / args.limit:6.1%} of the limit  "
                  f"{sum(1 for r in log if r.status == 429):5d} 429s  {failed} failed  "
                  f"(first request after {first:.2f} s; {args.rows / span / args.limit:.1%} over the requests' span)")

        sdf = spark.createDataFrame(rows, "id INT, text STRING")
        dbmagic.batching.spark.complete(sdf.limit(8).repartition(4), "{{ text }}", endpoint=name,
                                        client=client).count()  # warm: a Python worker for each of the 4 slots
        time.sleep(1.5)
        for partitions in [int(p) for p in args.partitions.split(",")]:
            frame = sdf.repartition(partitions).cache()
            frame.count()
            time.sleep(1.5)  # the limit's window empty again
            ws.clear()
            started = time.monotonic()
            out = dbmagic.batching.spark.complete(frame, "{{ text }}", endpoint=name, client=client,
                                                  concurrency_per_task=4)
            failed = out.filter("error IS NOT NULL").count()
            report(f"Spark, {partitions} partitions", started, failed)
        time.sleep(1.5)
        ws.clear()
        started = time.monotonic()
        result = dbmagic.batch("{{ row }}", [t for _, t in rows], name, client=client, progress=False, concurrency=16)
        report("dbmagic.batch, concurrency 16", started, len(result.failed))
    spark.stop()


if __name__ == "__main__":
    main()
