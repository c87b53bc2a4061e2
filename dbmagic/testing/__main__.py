"""python -m dbmagic.testing [--port N] [--token T] [--latency S] [--rate-limit N]: run a local
workspace until Ctrl-C."""

from __future__ import annotations

import argparse
import threading
from dataclasses import replace

from . import DEFAULT_ENDPOINTS, LocalWorkspace
from ._process import READY


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dbmagic.testing", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--token", default=None, help="the token clients must send (default: a random one)")
    parser.add_argument("--chunk-delay", type=float, default=0.05,
                        help="seconds between streamed chunks, to watch streaming (default 0.05)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds every endpoint takes to answer")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="requests per second every endpoint admits; past it, 429 with Retry-After")
    parser.add_argument("--no-retry-after", action="store_true", help="answer 429s without Retry-After")
    args = parser.parse_args(argv)
    endpoints = [replace(e, latency=args.latency, rate_limit=args.rate_limit, retry_after=not args.no_retry_after)
                 for e in DEFAULT_ENDPOINTS]
    with LocalWorkspace(port=args.port, token=args.token, chunk_delay=args.chunk_delay, endpoints=endpoints) as ws:
        print("A local Databricks workspace is running. In another shell:", flush=True)
        for name, value in ws.environ().items():
            print(f"  export {name}={value}", flush=True)
        print("Endpoints: " + ", ".join(ws.endpoints), flush=True)
        print("Proxy apps: " + ", ".join(f"cluster {c} port {p}" for c, p in ws.proxy_apps), flush=True)
        print(READY, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass



if __name__ == "__main__":
    main()
