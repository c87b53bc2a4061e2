"""The magic's costs, measured side by side in one run (by hand, not in CI).

    python benchmarks/bench_magic.py [--starts 20] [--tokens 2000]

Prints:
- a bare ``InteractiveShell`` start vs. the same plus ``%load_ext dbmagic``, whole process
  (target <= 1.2x; jupyter-ai's %load_ext costs ~11x);
- a 2,000-token stream through %%dbllm: display updates, updates per second (target <= ~20),
  and whether the final text is complete;
- the delay from the server writing the first token to its display, for chunked and
  close-delimited responses (target: within a millisecond).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _processes import median_process_times  # noqa: E402

BARE = "from IPython.core.interactiveshell import InteractiveShell; ip = InteractiveShell.instance()"
LOADED = BARE + "; ip.run_line_magic('load_ext', 'dbmagic')"
CHAT = "databricks-meta-llama-3-3-70b-instruct"


def starts(runs: int) -> None:
    medians = median_process_times({"bare": BARE, "load_ext": LOADED}, runs)
    bare, loaded = medians["bare"], medians["load_ext"]
    print(f"InteractiveShell start: {bare * 1000:.0f} ms; with %load_ext dbmagic: {loaded * 1000:.0f} ms "
          f"-> {loaded / bare:.2f}x (whole process, median of {runs})")


def shell_with(ws, publisher):
    from IPython.core.interactiveshell import InteractiveShell

    os.environ.update(ws.environ())
    ip = InteractiveShell.instance()
    ip.run_line_magic("reload_ext", "dbmagic")
    import dbmagic

    dbmagic.configure()
    ip.display_pub = publisher
    return ip


def long_stream(tokens: int) -> None:
    from IPython.core.displaypub import CapturingDisplayPublisher

    from dbmagic.testing import LocalWorkspace

    prompt = " ".join(f"t{i}" for i in range(tokens - 1))  # the answer is "Echo:" + these
    with LocalWorkspace(chunk_delay=0.001) as ws:
        pub = CapturingDisplayPublisher()
        ip = shell_with(ws, pub)
        start = time.perf_counter()
        ip.run_cell_magic("dbllm", f"-e {CHAT} -f text", prompt)
        elapsed = time.perf_counter() - start
        final = pub.outputs[-1]["data"]["text/plain"]
        complete = final == "Echo: " + prompt
        print(f"{tokens}-token stream over {elapsed:.2f} s: {len(pub.outputs)} display updates "
              f"({len(pub.outputs) / elapsed:.1f}/s); final text complete: {complete}")


def first_token(mode: str, runs: int = 20) -> float:
    """Prints, and returns, the median seconds from the server writing the first token to its display."""
    from IPython.core.displaypub import CapturingDisplayPublisher

    from dbmagic.testing import LocalWorkspace

    class Stamped(CapturingDisplayPublisher):
        def publish(self, data, *args, **kwargs):
            self.stamps.append(time.perf_counter())
            super().publish(data, *args, **kwargs)

    delays = []
    with LocalWorkspace(stream_mode=mode, chunk_delay=0.2) as ws:  # a pause after each token
        pub = Stamped()
        pub.stamps = []
        ip = shell_with(ws, pub)
        for _ in range(runs):
            pub.stamps.clear()
            ip.run_cell_magic("dbllm", f"-e {CHAT} -f text", "a")
            sent = ws.requests[-1].chunks_sent_at[0]
            delays.append(pub.stamps[0] - sent)
    print(f"first token, {mode} response: shown {statistics.median(delays) * 1000:.3f} ms after the server "
          f"wrote it (median of {runs}; max {max(delays) * 1000:.3f} ms)")
    return statistics.median(delays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    starts(args.starts)
    long_stream(args.tokens)
    first_token("chunked")
    first_token("close")


if __name__ == "__main__":
    main()
