"""Batch throughput, measured side by side in one run against the local workspace (by hand, not in CI).

    python benchmarks/bench_batch.py [--rows 500] [--no-spark]

Prints rows per second for:
- 500 prompts at 50 ms server latency, concurrency 16: dbmagic.batch next to bare threads over one
  ``requests.Session`` (target: batch >= 0.95x bare threads), with the workspace in another process
  and in this one (where the server's threads share the interpreter lock with the client), and the
  sequential figure;
- an endpoint limited to 20 requests/s (the local workspace answers 429 past it, with
  ``Retry-After`` and then without): dbmagic.batch (adaptive) next to a fixed concurrency of 16
  threads calling ``Client.complete`` (target: >= 90% of the limit with zero failed rows);
- the same 500 rows with a schema (``"label: str, n: int, score: float, tags: list[str], reason: str?"``,
  then a pydantic model) next to the same batch without one (target: >= 0.95x: parsing and validating
  each answer must not become the bottleneck);
- an endpoint limited in input tokens, then output tokens, a second (target: >= 90% of the limit,
  0 failed rows);
- embeddings and a custom model, 2,000 rows at 20 ms, concurrency 8: rows packed per request (the
  default) next to one row a request (target: >= 10x);
- Spark local[2], 1,000 rows at 50 ms, two partitions and one (needs the spark extra).

The workspace runs in its own process (``python -m dbmagic.testing``) unless the line says
"in-process": then the server's threads share the interpreter lock with the client being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Iterator

import requests

import dbmagic
from dbmagic import Client
from dbmagic.testing import in_another_process

CHAT = "databricks-meta-llama-3-3-70b-instruct"


@contextlib.contextmanager
def served(*args: str) -> Iterator[Client]:
    """A client of ``python -m dbmagic.testing ARGS`` running in another process."""
    with in_another_process(*args) as env:
        client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"])
        try:
            yield client
        finally:
            client.close()


def threads(n: int, work, items: list) -> float:
    """Seconds for ``n`` threads to run ``work(item)`` over ``items``."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        todo.put(item)

    def loop() -> None:
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            work(item)

    started = time.perf_counter()
    pool = [threading.Thread(target=loop) for _ in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - started


@contextlib.contextmanager
def in_process(*args: str) -> Iterator[Client]:
    """A client of a `LocalWorkspace` served from this process (``--latency`` is the only argument read)."""
    from dbmagic.testing import Endpoint, LocalWorkspace

    latency = float(args[args.index("--latency") + 1]) if "--latency" in args else 0.0
    with LocalWorkspace() as ws:
        ws.add_endpoint(Endpoint(CHAT, "llm/v1/chat", model="meta-llama-3.3-70b-instruct", latency=latency))
        client = Client(host=ws.host, token=ws.token)
        try:
            yield client
        finally:
            client.close()


def side_by_side(client: Client, prompts: list[str]) -> tuple[float, float]:
    """Rows per second of dbmagic.batch and of bare threads over one Session, interleaved three times
    (medians), so that both meet the same machine."""
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=16))
    creds = client.credentials
    url, headers = f"{creds.host}/serving-endpoints/{CHAT}/invocations", {"Authorization": f"Bearer {creds.token.reveal()}"}
    batch_runs, bare_runs = [], []
    for _ in range(3):
        started = time.perf_counter()
        result = dbmagic.batch("{{ row }}", prompts, endpoint=CHAT, concurrency=16, client=client, progress=False)
        batch_runs.append(len(prompts) / (time.perf_counter() - started))
        assert not result.failed
        bare_runs.append(len(prompts) / threads(16, lambda p: session.post(
            url, json={"messages": [{"role": "user", "content": p}]}, headers=headers).raise_for_status(), prompts))
    return statistics.median(batch_runs), statistics.median(bare_runs)


def throughput(rows: int) -> None:
    prompts = [f"row {i}" for i in range(rows)]
    ideal = 16 / 0.05
    print(f"{rows} prompts at 50 ms, concurrency 16 (ideal {ideal:.0f} rows/s; medians of 3 interleaved runs):")
    for label, serve in (("workspace in another process", served), ("workspace in-process", in_process)):
        with serve("--latency", "0.05") as client:
            client.endpoint(CHAT)
            batch, bare = side_by_side(client, prompts)
            if serve is served:
                sequential_rows = prompts[:100]
                started = time.perf_counter()
                for p in sequential_rows:
                    client.complete(p, endpoint=CHAT)
                sequential = len(sequential_rows) / (time.perf_counter() - started)
        print(f"  {label}:")
        print(f"    dbmagic.batch                 {batch:6.1f} rows/s  {batch / ideal:6.1%} of ideal")
        print(f"    bare threads + one Session    {bare:6.1f} rows/s  {bare / ideal:6.1%} of ideal")
        print(f"    batch / bare threads          {batch / bare:6.2f}x")
    print(f"  sequential Client.complete      {sequential:6.1f} rows/s")


def with_a_schema(rows: int) -> None:
    """dbmagic.batch with a schema next to the same batch without one, interleaved (medians of 3)."""
    from pydantic import BaseModel

    class Ticket(BaseModel):
        label: str
        n: int
        score: float
        tags: list[str]
        reason: str | None = None

    prompts = [f"ticket number {i} about the printer" for i in range(rows)]
    schemas = (("the short form", "label: str, n: int, score: float, tags: list[str], reason: str?"),
               ("a pydantic model", Ticket))
    print(f"{rows} prompts at 50 ms, concurrency 16, with a schema and without (medians of 3 interleaved runs; "
          "workspace in another process):")
    with served("--latency", "0.05") as client:
        client.endpoint(CHAT)
        for label, schema in schemas:
            plain, typed = [], []
            for _ in range(3):
                started = time.perf_counter()
                result = dbmagic.batch("{{ row }}", prompts, endpoint=CHAT, concurrency=16, client=client,
                                       progress=False)
                plain.append(rows / (time.perf_counter() - started))
                assert not result.failed
                started = time.perf_counter()
                result = dbmagic.batch("{{ row }}", prompts, endpoint=CHAT, concurrency=16, client=client,
                                       progress=False, schema=schema)
                typed.append(rows / (time.perf_counter() - started))
                assert not result.failed and result.values[0] is not None
            a, b = statistics.median(typed), statistics.median(plain)
            print(f"  {label:18s} with {a:6.1f} rows/s, without {b:6.1f} rows/s: {a / b:5.2f}x")


def rate_limited(rows: int) -> None:
    prompts = [f"row {i}" for i in range(rows)]
    for label, extra in (("with Retry-After", ()), ("without Retry-After", ("--no-retry-after",))):
        with served("--latency", "0.05", "--rate-limit", "20", *extra) as client:
            client.endpoint(CHAT)
            time.sleep(1.1)  # an empty window
            started = time.perf_counter()
            result = dbmagic.batch("{{ row }}", prompts, endpoint=CHAT, concurrency=16, client=client,
                                   progress=False)
            adaptive = (rows - len(result.failed)) / (time.perf_counter() - started)
            time.sleep(1.1)
            failed: list[int] = []

            def one(p: str, failed: list[int] = failed) -> None:
                try:
                    client.complete(p, endpoint=CHAT)
                except dbmagic.RateLimited:
                    failed.append(1)

            fixed = (rows - len(failed)) / threads(16, one, prompts)
        print(f"{rows} prompts, endpoint limited to 20 requests/s, 429s {label}:")
        print(f"  dbmagic.batch (adaptive, cap 16)   {adaptive:5.1f} rows/s  {adaptive / 20:6.1%} of the limit, "
              f"{len(result.failed)} failed rows")
        print(f"  16 threads of Client.complete      {fixed:5.1f} rows/s  {fixed / 20:6.1%} of the limit, "
              f"{len(failed)} failed rows")


def spark_session(master: str):
    """A local Spark session on loopback only, its executors on this Python."""
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    session = (SparkSession.builder.master(master).config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false").config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    return session


def spark() -> None:
    try:
        import pyspark  # noqa: F401
    except ImportError:
        print("Spark: pyspark not installed (pip install 'dbmagic[spark]')")
        return

    session = spark_session("local[2]")
    with served("--latency", "0.05") as client:
        spark_runs(session, client)
    session.stop()


def spark_runs(session, client: Client) -> None:
    import dbmagic.batching.spark

    sdf = session.createDataFrame([(i, f"row {i}") for i in range(1000)], "id INT, text STRING").cache()
    sdf.count()
    dbmagic.batching.spark.complete(sdf.limit(10), "{{ text }}", endpoint=CHAT, client=client).count()  # workers warm
    print("Spark local[2], 1,000 rows at 50 ms, concurrency_per_task 8:")
    for partitions in (2, 1):
        frame = sdf.repartition(partitions)
        frame.count()
        started = time.perf_counter()
        out = dbmagic.batching.spark.complete(frame, "{{ text }}", endpoint=CHAT, client=client, concurrency_per_task=8)
        errors = out.filter("error IS NOT NULL").count()
        seconds = time.perf_counter() - started
        print(f"  {partitions} partition{'s' if partitions > 1 else ' '}   {1000 / seconds:6.1f} rows/s "
              f"(ideal {8 * partitions / 0.05:.0f}), {errors} failed rows")


def packed(rows: int = 2000) -> None:
    """Rows packed per request (default) next to one row a request, same concurrency (8), 20 ms of
    server latency, the workspace in another process; medians of 3 interleaved runs."""
    texts = [f"document number {i}: a short passage to embed" for i in range(rows)]
    print(f"{rows} rows at 20 ms, concurrency 8, packed (default, 100 a request) vs one row a request:")
    with served("--latency", "0.02") as client:
        for label, endpoint in (("embeddings (input list)", "databricks-gte-large-en"),
                                ("custom model (dataframe_records)", "local-custom-model")):
            client.endpoint(endpoint)
            rates: dict[int, list[float]] = {1: [], 100: []}
            for _ in range(3):
                for size in (1, 100):
                    started = time.perf_counter()
                    result = dbmagic.batch("{{ row }}", texts, endpoint, client=client, progress=False, concurrency=8,
                                           rows_per_request=size)
                    rates[size].append(rows / (time.perf_counter() - started))
                    assert not result.failed
            one, many = statistics.median(rates[1]), statistics.median(rates[100])
            print(f"  {label:34} one a request {one:8.1f} rows/s   packed {many:9.1f} rows/s   {many / one:5.1f}x")


def token_limited(rows: int = 300, limit: int = 400, window: str = "second") -> None:
    """An endpoint limited in input, then output, tokens: ``limit`` tokens a second, counted over a
    ``window``: a second (the local workspace's quick stand-in) or a minute (Databricks' ITPM and OTPM:
    ``limit * 60`` a minute; give it rows for several minutes), 429s without Retry-After."""
    from dbmagic.testing import Endpoint, LocalWorkspace

    prompts = [" ".join(f"w{i}" for i in range(20)) + f" row {j}" for j in range(rows)]  # 22 tokens in, 23 out
    print(f"{rows} rows against a limit of {limit} tokens/s counted a {window}, 50 ms, concurrency 16, 429s without "
          "Retry-After:")
    for kind in ("input", "output"):
        with LocalWorkspace(endpoints=[Endpoint("tokens", "llm/v1/chat", latency=0.05,
                                                token_limit=limit * (60 if window == "minute" else 1),
                                                token_kind=kind, token_window=window, retry_after=False)]) as ws:
            client = Client(host=ws.host, token=ws.token)
            client.endpoint("tokens")
            started = time.perf_counter()
            result = dbmagic.batch("{{ row }}", prompts, "tokens", client=client, progress=False, concurrency=16)
            seconds = time.perf_counter() - started
            spent = result.usage.input if kind == "input" else result.usage.output
            limited = sum(1 for r in ws.requests if r.path.endswith("/invocations") and r.status == 429)
            print(f"  {kind} tokens: {spent / seconds:6.1f} tokens/s, {spent / seconds / limit:6.1%} of the limit, "
                  f"{limited} 429s, {len(result.failed)} failed")
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--no-spark", action="store_true")
    parser.add_argument("--only-schema", action="store_true", help="run only the schema comparison")
    parser.add_argument("--only-packed", action="store_true", help="run only the packed-rows comparison")
    parser.add_argument("--only-tokens", action="store_true", help="run only the token-limited endpoint")
    parser.add_argument("--token-window", choices=("second", "minute"), default="second",
                        help="with --only-tokens: the window the limit counts over (minute: give --rows 5000)")
    args = parser.parse_args()
    if args.only_tokens:
        return token_limited(args.rows if args.token_window == "minute" else 300, window=args.token_window)
    if args.only_schema:
        return with_a_schema(args.rows)
    if args.only_packed:
        return packed()
    throughput(args.rows)
    packed()
    token_limited()
    with_a_schema(args.rows)
    rate_limited(200)
    if not args.no_spark:
        spark()


if __name__ == "__main__":
    main()
