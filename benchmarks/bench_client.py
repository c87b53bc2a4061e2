"""Client overhead and import cost, measured side by side in one run (by hand, not in CI).

    python benchmarks/bench_client.py [--calls 500] [--imports 30]

Prints:
- the client's median per-call latency as a ratio to a reused ``requests.Session.post`` of the
  same body to the same local workspace (target <= 1.10x), for a serving endpoint and for a Unity
  AI Gateway model service (each against its own raw post), with the HTTP requests and new
  connections per call (target: exactly 1 and 0); and the same for ``mlflow.deployments`` when
  it is installed;
- ``python -c "import dbmagic"`` as a ratio to ``python -c "import requests"`` (target <= 1.5x),
  and the same for ``from dbmagic import Client`` (which loads requests).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import requests
from _processes import median_process_times  # noqa: E402

from dbmagic import Client
from dbmagic.testing import LocalWorkspace

ENDPOINT = "databricks-meta-llama-3-3-70b-instruct"
SERVICE = "system.ai.claude-sonnet-4-5"  # a Unity AI Gateway model service (each is compared to its own raw post)


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

        service_url = f"{ws.host}/ai-gateway/mlflow/v1/chat/completions"
        service_body = {"model": SERVICE, **body}

        def raw_service() -> str:
            r = session.post(service_url, json=service_body, headers=headers, timeout=(10, 300))
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        def ours_service() -> str:
            return client.complete("How are you?", endpoint=SERVICE, temperature=0.1).text

        contenders = {"requests.Session.post": raw, "dbmagic Client.complete": ours,
                      "Session.post, model service": raw_service, "Client.complete, model service": ours_service}
        try:  # a peer, when installed (pip install mlflow-skinny): measured in the same loop
            os.environ.update(ws.environ())
            from mlflow.deployments import get_deploy_client

            deploy = get_deploy_client("databricks")
            contenders["mlflow.deployments predict"] = lambda: deploy.predict(endpoint=ENDPOINT, inputs=body)
        except ImportError:
            print("(mlflow not installed: pip install mlflow-skinny to compare with mlflow.deployments)")

        for _ in range(50):  # warm all: connections, endpoint metadata, caches
            for fn in contenders.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        order = list(contenders.items())
        for i in range(calls):  # interleaved, rotating who goes first, so drift hits all alike
            for name, fn in order[i % len(order):] + order[:i % len(order)]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        bases = {"model service": statistics.median(times["Session.post, model service"])}
        for name, fn in contenders.items():
            base = bases.get(name.rsplit(", ", 1)[-1], statistics.median(times["requests.Session.post"]))
            ws.clear()
            for _ in range(100):
                fn()
            med = statistics.median(times[name])
            print(f"{name:28s} median {med * 1e6:6.0f} us over {calls} calls -> {med / base:.3f}x; "
                  f"HTTP requests per call {len(ws.requests) / 100:.2f}, new connections per call "
                  f"{ws.connections / 100:.2f}")


def imports(runs: int) -> None:
    statements = {
        "import requests": "import requests",
        "import dbmagic": "import dbmagic",
        "from dbmagic import Client": "from dbmagic import Client",
    }
    medians = median_process_times(statements, runs)
    base = medians["import requests"]
    for name, med in medians.items():
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
