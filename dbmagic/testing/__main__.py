"""``python -m dbmagic.testing [--port N] [--token T]``: run a local workspace until Ctrl-C."""

from __future__ import annotations

import argparse
import threading

from . import LocalWorkspace


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dbmagic.testing", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--token", default=None, help="the token clients must send (default: a random one)")
    parser.add_argument("--chunk-delay", type=float, default=0.05,
                        help="seconds between streamed chunks, to watch streaming (default 0.05)")
    args = parser.parse_args(argv)
    with LocalWorkspace(port=args.port, token=args.token, chunk_delay=args.chunk_delay) as ws:
        print("A local Databricks workspace is running. In another shell:", flush=True)
        for name, value in ws.environ().items():
            print(f"  export {name}={value}", flush=True)
        print("Endpoints: " + ", ".join(ws.endpoints), flush=True)
        print("Proxy apps: " + ", ".join(f"cluster {c} port {p}" for c, p in ws.proxy_apps), flush=True)
        print("Ctrl-C stops it.", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
