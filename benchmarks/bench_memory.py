"""Memory of a batch, side by side in one run with bare threads that keep only the answers (by hand, not in CI).

    python benchmarks/bench_memory.py [--rows 100000] [--concurrency 16]

The workspace runs in another process (``python -m dbmagic.testing``), so only the client's memory
is measured, with tracemalloc: what the run allocated at its peak, and what it still holds once it
returned (the result kept, garbage collected). Both read the same DataFrame of 200-character
prompts, which is made before measuring (so "beyond the input frame"). Printed beside them: the
size of the output columns themselves (the answer and error columns ``to_pandas`` adds, measured by
pandas with ``deep=True``). Target: dbmagic.batch holds at most 2x its output columns.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import requests

import dbmagic
from dbmagic import Client
from dbmagic.batching.run import run
from dbmagic.testing import in_another_process

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import threads  # noqa: E402

CHAT = "databricks-meta-llama-3-3-70b-instruct"


def measured(run):
    """``(result, peak bytes, retained bytes, seconds)`` of ``run()``, by tracemalloc."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - started
    gc.collect()
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, peak - before, retained - before, seconds


def bare_threads(url: str, token: str, prompts: list[str], n: int) -> list[str | None]:
    """``n`` threads over one Session, keeping each answer's text in its row's place."""
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=n))
    headers = {"Authorization": f"Bearer {token}"}
    answers: list[str | None] = [None] * len(prompts)

    def one(i: int) -> None:
        response = session.post(url, json={"messages": [{"role": "user", "content": prompts[i]}]}, headers=headers)
        answers[i] = response.json()["choices"][0]["message"]["content"]

    threads(n, one, list(range(len(prompts))))
    session.close()
    return answers


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    frame = pd.DataFrame({"text": [f"{i:08d} " + "lorem ipsum dolor sit amet " * 7 for i in range(args.rows)]})
    frame["text"] = frame["text"].str.slice(0, 200).str.strip()
    prompts = frame["text"].tolist()
    with in_another_process() as env:
        client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"])
        client.endpoint(CHAT)
        # a first small batch of each, so that imports and first-use caches are not counted
        dbmagic.batch("{{ text }}", frame.head(50), CHAT, client=client, progress=False)
        bare_threads(f"{env['DATABRICKS_HOST']}/serving-endpoints/{CHAT}/invocations", env["DATABRICKS_TOKEN"],
                     prompts[:50], args.concurrency)

        answers, bare_peak, bare_kept, bare_s = measured(lambda: bare_threads(
            f"{env['DATABRICKS_HOST']}/serving-endpoints/{CHAT}/invocations", env["DATABRICKS_TOKEN"], prompts,
            args.concurrency))
        assert all(a is not None for a in answers)
        out, peak, kept, seconds = measured(lambda: dbmagic.batch(
            "{{ text }}", frame, CHAT, client=client, progress=False, concurrency=args.concurrency))
        assert out["error"].isna().all() and out["answer"].tolist() == answers
        kept_result, result_peak, result_kept, _ = measured(lambda: run(
            "{{ text }}", frame, CHAT, client=client, progress=False, concurrency=args.concurrency))
        assert kept_result.texts == answers
        client.close()
        columns = out[["answer", "error"]].memory_usage(deep=True, index=False).sum()
        n = args.rows
        print(f"{n:,} rows of 200-character prompts, concurrency {args.concurrency}, workspace in another process "
              f"(tracemalloc; bytes a row):")
        print(f"  output columns (answer, error)      {columns / n:8.0f}")
        print(f"  bare threads keeping the answers    peak {bare_peak / n:8.0f}, kept {bare_kept / n:8.0f}  "
              f"({n / bare_s:,.0f} rows/s)")
        print(f"  dbmagic.batch (DataFrame returned)  peak {peak / n:8.0f}, kept {kept / n:8.0f}  ({n / seconds:,.0f} rows/s)")
        print(f"  BatchResult (what --over keeps)     peak {result_peak / n:8.0f}, kept {result_kept / n:8.0f}")
        print(f"  dbmagic.batch / output columns      peak {peak / columns:8.2f}x, kept {kept / columns:6.2f}x")
        print(f"  BatchResult / output columns        peak {result_peak / columns:8.2f}x, kept {result_kept / columns:6.2f}x")
        print(f"  dbmagic.batch / bare threads        peak {peak / bare_peak:8.2f}x, kept {kept / bare_kept:6.2f}x")


if __name__ == "__main__":
    main()
