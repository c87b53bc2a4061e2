"""A batch of images, side by side with bare threads (by hand, not in CI).

    python benchmarks/bench_images.py [--rows 500] [--concurrency 8]

Makes ``--rows`` JPEGs of 2000x1500 pixels and about 1 MB each (noise, which compresses badly) in a
temporary folder,
then sends "What is in this picture?" with each, against the local workspace in another process:

- dbmagic.batch over a DataFrame of paths (``{{ image(path) }}``): each image read, brought down to
  1568 pixels a side and re-encoded when its row is sent;
- bare threads over one ``requests.Session``: each file read and sent as it is (base64 in a data URL).

Each runs in a process of its own, so that its peak resident memory (``ru_maxrss``: Pillow's
buffers are C memory, which tracemalloc does not see) is its own. Target: the batch's peak stays far
below the images' total size (they are never all held at once).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import threads  # noqa: E402

CHAT = "databricks-meta-llama-3-3-70b-instruct"


def make_images(folder: str, rows: int) -> list[str]:
    from PIL import Image

    paths = []
    for i in range(rows):
        img = Image.frombytes("RGB", (2000, 1500), os.urandom(9_000_000))  # larger than 1568 a side: fitted
        path = os.path.join(folder, f"img-{i:04d}.jpg")
        img.save(path, "JPEG", quality=40)
        paths.append(path)
    return paths


def one(kind: str, folder: str, concurrency: int) -> None:
    """Run one side in this process and print ``{"seconds", "rows", "peak_mib", "failed"}``."""
    import dbmagic
    from dbmagic import Client
    from dbmagic.testing import in_another_process

    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    if kind == "batch":
        import pandas  # noqa: F401  (imported before the start figure: what the batch adds is measured)
        import PIL.Image  # noqa: F401
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with in_another_process() as env:
        if kind == "batch":
            import pandas as pd

            client = Client(host=env["DATABRICKS_HOST"], token=env["DATABRICKS_TOKEN"])
            client.endpoint(CHAT)
            started = time.perf_counter()
            out = dbmagic.batch("What is in this picture? {{ image(path) }}", pd.DataFrame({"path": paths}), CHAT,
                                client=client, progress=False, concurrency=concurrency)
            seconds, failed = time.perf_counter() - started, int(out["error"].notna().sum())
        else:
            import requests

            session = requests.Session()
            session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))
            url = f"{env['DATABRICKS_HOST']}/serving-endpoints/{CHAT}/invocations"
            headers = {"Authorization": f"Bearer {env['DATABRICKS_TOKEN']}"}
            failures = []

            def send(path: str) -> None:
                with open(path, "rb") as f:
                    data = base64.b64encode(f.read()).decode()
                content = [{"type": "text", "text": "What is in this picture? "},
                           {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}}]
                response = session.post(url, json={"messages": [{"role": "user", "content": content}]},
                                        headers=headers)
                if response.status_code != 200:
                    failures.append(path)

            started = time.perf_counter()
            threads(concurrency, send, paths)
            seconds, failed = time.perf_counter() - started, len(failures)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(json.dumps({"seconds": seconds, "rows": len(paths), "peak_mib": peak, "start_mib": start,
                          "failed": failed}), flush=True)  # before the workspace process ends


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--one", choices=("batch", "bare"))
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.one:
        return one(args.one, args.folder, args.concurrency)
    with tempfile.TemporaryDirectory() as folder:
        paths = make_images(folder, args.rows)
        total = sum(os.path.getsize(p) for p in paths)
        print(f"{args.rows} JPEGs of {total / args.rows / 1e6:.2f} MB on average ({total / 1e6:,.0f} MB in all), "
              f"concurrency {args.concurrency}, workspace in another process:")
        for kind, label in (("batch", "dbmagic.batch (fitted to 1568 px)"), ("bare", "bare threads (sent as they are)")):
            run = subprocess.run([sys.executable, __file__, "--one", kind, "--folder", folder,
                                  "--concurrency", str(args.concurrency)], capture_output=True, text=True)
            got = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"  {label:36} {got['rows'] / got['seconds']:6.1f} rows/s, peak resident memory "
                  f"{got['peak_mib']:6.0f} MiB ({got['peak_mib'] - got['start_mib']:+5.0f} MiB over its start, "
                  f"imports made), {got['failed']} failed")
        print(f"  (the images' total size: {total / (1 << 20):,.0f} MiB; one image encoded for sending: about "
              f"{_fitted_size(paths[0]) / 1e6:.2f} MB)")


def _fitted_size(path: str) -> int:
    from dbmagic.prompts.attachments import load_image

    return len(load_image(path).data)


if __name__ == "__main__":
    main()
