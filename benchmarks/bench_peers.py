"""One table of dbmagic against its peers, measured side by side in one run on loopback (by hand).

    python -m venv /tmp/peers && /tmp/peers/bin/pip install -e '.[mlflow]' -r benchmarks/requirements-peers.txt
    /tmp/peers/bin/python benchmarks/bench_peers.py [--calls 300] [--starts 15]

Rows (medians; a peer that is not installed is left out):
- import cost, whole process with byte-code cached: ``import dbmagic``, a shell with ``%load_ext
  dbmagic``, ``mlflow.deployments``, LangChain's ``Databricks``, against ``import requests`` and a
  bare shell; ``%load_ext jupyter_ai_magics`` in its own environment (``--jupyter-ai-python``),
  scaled by the ratio of the two environments' bare shells;
- per call against the local workspace's completions endpoint: latency, HTTP requests and new
  connections per call, for a
  reused ``requests.Session``, ``Client.complete`` (tracing off and on), ``mlflow.deployments``
  ``predict`` and LangChain's ``Databricks.invoke``;
- tracing's cost at 50 ms server latency;
- 200 prompts at 50 ms: ``dbmagic.batch`` against LangChain's ``batch`` (max_concurrency 16);
- first-token lag for chunked and close-delimited streams (``bench_magic``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _processes import median_process_times  # noqa: E402
from bench_batch import served  # noqa: E402
from bench_magic import first_token  # noqa: E402

import dbmagic  # noqa: E402
from dbmagic import Client  # noqa: E402
from dbmagic.testing import LocalWorkspace  # noqa: E402

# a completions endpoint: LangChain's legacy Databricks class sends {"prompt": ...}, which a chat
# endpoint refuses unless a transform_input_fn builds the messages
ENDPOINT = "local-completions"
SHELL = "from IPython.core.interactiveshell import InteractiveShell; ip = InteractiveShell.instance()"
rows: list[tuple[str, str, str]] = []


def row(what: str, figure: str, ratio: str = "") -> None:
    rows.append((what, figure, ratio))
    print(f"{what:58s} {figure:34s} {ratio}", flush=True)


def installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def imports(starts: int, jupyter_ai_python: str | None) -> None:
    statements = {"import requests": "import requests", "import dbmagic": "import dbmagic",
                  "bare shell": SHELL, "shell + %load_ext dbmagic": SHELL + "; ip.run_line_magic('load_ext', 'dbmagic')"}
    if installed("mlflow"):
        statements["import mlflow.deployments"] = "import mlflow.deployments"
    if installed("langchain_community"):
        statements["LangChain's Databricks"] = "from langchain_community.llms import Databricks"
    medians = median_process_times(statements, starts)
    if jupyter_ai_python:  # in its own environment (it pins an older LangChain): against its own bare shell
        theirs = median_process_times({"bare shell": SHELL, "shell + %load_ext jupyter_ai_magics":
                                       SHELL + "; ip.run_line_magic('load_ext', 'jupyter_ai_magics')"}, starts,
                                      python=jupyter_ai_python)
        medians["shell + %load_ext jupyter_ai_magics"] = theirs["shell + %load_ext jupyter_ai_magics"] * (
            medians["bare shell"] / theirs["bare shell"])
    for name, seconds in medians.items():
        base = medians["bare shell"] if name.startswith("shell") else medians["import requests"]
        against = "a bare shell" if name.startswith("shell") else "import requests"
        if name not in ("import requests", "bare shell"):
            row(f"import: {name}", f"{seconds * 1000:.0f} ms", f"{seconds / base:.2f}x {against}")
        else:
            row(f"import: {name}", f"{seconds * 1000:.0f} ms")


def per_call(calls: int) -> None:
    with LocalWorkspace() as ws:
        os.environ.update(ws.environ())
        body = {"prompt": "Hi"}
        session = requests.Session()
        url = f"{ws.host}/serving-endpoints/{ENDPOINT}/invocations"
        auth = {"Authorization": f"Bearer {ws.token}"}
        client = Client(host=ws.host, token=ws.token)
        contenders = {
            "requests.Session.post (reused)": lambda: session.post(url, json=body, headers=auth).raise_for_status(),
            "dbmagic Client.complete": lambda: client.complete("Hi", endpoint=ENDPOINT),
        }
        traced = Client(host=ws.host, token=ws.token)
        if installed("mlflow"):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
            mlflow.set_experiment("bench")

            def with_tracing() -> None:
                dbmagic.autolog()
                try:
                    traced.complete("Hi", endpoint=ENDPOINT)
                finally:
                    dbmagic.autolog(disable=True)

            contenders["dbmagic Client.complete, tracing on"] = with_tracing
            from mlflow.deployments import get_deploy_client

            deploy = get_deploy_client("databricks")
            contenders["mlflow.deployments predict"] = lambda: deploy.predict(endpoint=ENDPOINT, inputs=body)
        if installed("langchain_community"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from langchain_community.llms import Databricks

                llm = Databricks(endpoint_name=ENDPOINT)
            contenders["LangChain Databricks.invoke"] = lambda: llm.invoke("Hi")
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        counts: dict[str, list[int]] = {name: [0, 0] for name in contenders}
        for call in contenders.values():
            for _ in range(5):
                call()  # warm: connections, caches
        for _ in range(calls):  # interleaved, so that drift hits every contender alike
            for name, call in contenders.items():
                before = (len(ws.requests), ws.connections)
                start = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - start)
                counts[name][0] += len(ws.requests) - before[0]
                counts[name][1] += ws.connections - before[1]
        base = statistics.median(samples["requests.Session.post (reused)"])
        for name in contenders:
            med = statistics.median(samples[name])
            row(f"per call: {name}", f"{med * 1e6:.0f} us, {counts[name][0] / calls:.2f} req, "
                f"{counts[name][1] / calls:.2f} conn", f"{med / base:.2f}x a reused Session")


def tracing_at_latency(calls: int) -> None:
    if not installed("mlflow"):
        return
    from bench_tracing import per_call_off_and_on

    with served("--latency", "0.05") as client:
        client.endpoint(ENDPOINT)
        off, on = per_call_off_and_on(client, ENDPOINT, calls)
    row("per call at 50 ms: tracing off / on", f"{off * 1000:.1f} / {on * 1000:.1f} ms", f"{on / off:.3f}x")


def batch_throughput(n: int) -> None:
    prompts = [f"row {i}" for i in range(n)]
    with served("--latency", "0.05") as client:
        creds = client.credentials
        client.endpoint(ENDPOINT)
        start = time.perf_counter()
        dbmagic.batch("{{ row }}", prompts, endpoint=ENDPOINT, concurrency=16, client=client, progress=False)
        ours = n / (time.perf_counter() - start)
        row(f"batch: {n} prompts at 50 ms, dbmagic.batch (16)", f"{ours:.1f} rows/s")
        if installed("langchain_community"):
            os.environ.update({"DATABRICKS_HOST": creds.host, "DATABRICKS_TOKEN": creds.token.reveal()})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from langchain_community.llms import Databricks

                llm = Databricks(endpoint_name=ENDPOINT)
                start = time.perf_counter()
                llm.batch(prompts, config={"max_concurrency": 16})
            theirs = n / (time.perf_counter() - start)
            row(f"batch: {n} prompts at 50 ms, LangChain batch (16)", f"{theirs:.1f} rows/s",
                f"dbmagic {ours / theirs:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--starts", type=int, default=15)
    parser.add_argument("--jupyter-ai-python", help="the Python of an environment with jupyter-ai-magics")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}, {os.cpu_count()} cores", flush=True)
    imports(args.starts, args.jupyter_ai_python)
    per_call(args.calls)
    tracing_at_latency(50)
    batch_throughput(200)
    for mode in ("chunked", "close"):
        lag = first_token(mode, 20)
        row(f"stream: first token shown after the server wrote it ({mode})", f"{lag * 1000:.2f} ms")
    print("\n| measured | figure | ratio |\n|---|---|---|")
    for what, figure, ratio in rows:
        print(f"| {what} | {figure} | {ratio} |")


if __name__ == "__main__":
    main()
