"""Client overhead and import cost, measured side by side in one run (by hand, not in CI).

    python benchmarks/bench_client.py [--calls 500] [--imports 30]

Prints:
- the client's median per-call latency as a ratio to a reused ``requests.Session.post`` of the
  same body to the same local workspace (target <= 1.10x), with the HTTP requests and new
  connections the client makes per call (target: exactly 1 and 0);
- ``python -c "import dbmagic"`` as a ratio to ``python -c "import requests"`` (target <= 1.5x),
  and the same for ``from dbmagic import Client`` (which loads requests).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import requests

from dbmagic import Client
from dbmagic.testing import LocalWorkspace

ENDPOINT = "databricks-meta-llama-3-3-70b-instruct"


def per_call(calls: int) -> None:
    with LocalWorkspace() as ws:
        client = Client(host=ws.host, token=ws.token)
        session = requests.Session()
        url = f"{ws.host}/serving-endpoints/{ENDPOINT}/invocations"
        headers = {"Authorization": f"Bearer {ws.token}"}
        body = {"messages": [{"role": "user", "content": "How are you?"}], "temperature": 0.1}

        def raw() -> str:
            r = session.post(url, json=body, headers=headers, timeout=(10, 300))
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        def ours() -> str:
            return client.complete("How are you?", endpoint=ENDPOINT, temperature=0.1).text

        for _ in range(50):  # warm both: connections, endpoint metadata, caches
            raw()
            ours()
        ws.clear()
        times: dict[str, list[float]] = {"raw": [], "client": []}
        for i in range(calls):  # interleaved, alternating who goes first, so drift hits both alike
            order = (("raw", raw), ("client", ours)) if i % 2 == 0 else (("client", ours), ("raw", raw))
            for name, fn in order:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        ws.clear()
        for _ in range(calls):
            ours()
        requests_per_call = len(ws.requests) / calls
        connections_per_call = ws.connections / calls
        raw_med, ours_med = statistics.median(times["raw"]), statistics.median(times["client"])
        print(f"per call over {calls} calls (median): requests.Session.post {raw_med * 1e6:.0f} us, "
              f"dbmagic Client.complete {ours_med * 1e6:.0f} us -> ratio {ours_med / raw_med:.3f}x")
        print(f"client HTTP requests per call: {requests_per_call:.3f}; "
              f"new connections per call: {connections_per_call:.3f}")


def imports(runs: int) -> None:
    statements = {
        "import requests": "import requests",
        "import dbmagic": "import dbmagic",
        "from dbmagic import Client": "from dbmagic import Client",
    }
    times: dict[str, list[float]] = {k: [] for k in statements}
    for _ in range(runs):
        for name, code in statements.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["import requests"])
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"python -c {name!r}: {med * 1000:.1f} ms (whole process, median of {runs}) -> "
              f"{med / base:.2f}x import requests")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--imports", type=int, default=30)
    args = parser.parse_args()
    per_call(args.calls)
    imports(args.imports)


if __name__ == "__main__":
    main()
