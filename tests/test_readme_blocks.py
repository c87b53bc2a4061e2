"""Every ```python block of the README runs as written, in order, in a real kernel against the local
workspace (a newcomer copies them into a notebook). The blocks that need a real Databricks workspace
are listed below, each with its reason; every other block must run with its cell's reply ``ok``.

The test gives the kernel only what a reader's notebook would already hold (the data the README's
examples name: ``notes``, ``tickets``, ``sdf``, ...), and the local workspace serves the endpoints,
apps and driver-proxy apps they name.
"""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest

from dbmagic.testing import Endpoint, LocalWorkspace

from .kernel import real_kernel, run

pytest.importorskip("jupyter_client")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# a distinctive part of the block -> why it cannot run here (the short, explicit list)
NEEDS_A_WORKSPACE = {
    "%pip install /Volumes/": "installs the wheel from a Unity Catalog volume and restarts Python (a Databricks "
                              "notebook's dbutils)",
    "token=dbutils.secrets.get": "reads a secret scope with dbutils, which only a Databricks notebook has, for a "
                                 "real workspace",
    'first.write.saveAsTable("main.default.': "writes a Unity Catalog table (main.default...): a Databricks "
                                              "workspace's catalog",
    'checkpoint="/Volumes/main/default/work/tickets-classify"': "a Unity Catalog volume: /Volumes exists only on "
                                                                  "Databricks (elsewhere it is refused, never made)",
    "--checkpoint /Volumes/main/default/work/tickets-classify": "a Unity Catalog volume (as above)",
    'checkpoint="/Volumes/main/default/work/classify-sdf"': "a Unity Catalog volume and table (as above)",
}

# what a reader's notebook holds before the README's examples (the data they name), and Spark
PREAMBLE = '''
import os
import pandas as pd
from pyspark.sql import SparkSession

notes = "The Q3 launch slipped two weeks; QA found three blockers."
audience = "the sales team"
text = "Our refund policy changed on 1 March."
labels = ["billing", "bug", "other"]
tickets = pd.DataFrame({"text": ["I was charged twice", "The app crashes on start"]})
E = "databricks-meta-llama-3-3-70b-instruct"
inventory = {"main": {"printer toner": 3}}
spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
sdf = spark.createDataFrame([(1, "The battery lasts two days")], "id INT, text STRING")
import io
from PIL import Image
_picture = io.BytesIO()
Image.new("RGB", (400, 300), "white").save(_picture, "PNG")
receipt = _picture.getvalue()
os.makedirs("scans", exist_ok=True)
Image.new("RGB", (200, 300), "white").save("scans/form.pdf")
'''


def blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every ```python block, indented ones (in a list item) included."""
    found = []
    for match in re.finditer(r"^( *)```python\n(.*?)\n\1```", README, re.S | re.M):
        code = textwrap.dedent("\n".join(line[len(match.group(1)):] for line in match.group(2).split("\n")))
        found.append((README[:match.start()].count("\n") + 1, code))
    return found


def reason_to_skip(code: str) -> str | None:
    return next((why for part, why in NEEDS_A_WORKSPACE.items() if part in code), None)


def test_the_list_of_blocks_that_need_a_workspace_is_short_and_each_names_a_block():
    skipped = [line for line, code in blocks() if reason_to_skip(code)]
    assert len(NEEDS_A_WORKSPACE) <= 6 and len(skipped) == len(NEEDS_A_WORKSPACE)
    assert len(blocks()) >= 30


@pytest.fixture
def workspace_for_the_readme():
    ws = LocalWorkspace(endpoints=[*__import__("dbmagic.testing", fromlist=["DEFAULT_ENDPOINTS"]).DEFAULT_ENDPOINTS,
                                   Endpoint("my-chat", "llm/v1/chat", model="my-chat-model"),
                                   Endpoint("my-fine-tune", "llm/v1/chat", model="my-fine-tune-model"),
                                   Endpoint("my-agent", "agent/v1/responses", "CUSTOM_MODEL", model="my-agent-1"),
                                   Endpoint("databricks-claude-sonnet-4-5", "llm/v1/chat", judge=True,
                                            model="claude-sonnet-4-5")])
    ws.add_proxy_app("0123-456789-abc", 7777)
    ws.add_app("support-agent")
    with ws:
        yield ws


@pytest.fixture
def kernel(workspace_for_the_readme, tmp_path):
    # an OAuth access token as the token (what `databricks auth token` prints): apps take it too
    env = dict(DATABRICKS_HOST=workspace_for_the_readme.host, DATABRICKS_TOKEN=workspace_for_the_readme.issue_token(),
               HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with real_kernel(env, str(tmp_path)) as client:  # HOME: the clean_env fixture's
        yield client


@pytest.mark.skipif(not Path("/usr/bin/java").exists() and not os.environ.get("JAVA_HOME"),
                    reason="the README's Spark blocks need Java 17")
def test_every_readme_block_runs_as_written(kernel, workspace_for_the_readme):
    """On main the first cells a newcomer copies failed (`%dbllm whoami   # ...` offered to send the
    comment as a prompt, a one-line prompt sent its comment to the model), `endpoint=...` was given
    literally, and the README test ran none of these blocks."""
    status, said = run(kernel, PREAMBLE)
    assert status == "ok", said
    ran = 0
    for line, code in blocks():
        if reason_to_skip(code):
            continue
        status, said = run(kernel, code)
        assert status == "ok", f"README line {line}:\n{code}\n---\n{said[-3000:]}"
        ran += 1
    assert ran >= 25
    prompts = [r.json for r in workspace_for_the_readme.requests if r.path.endswith("/invocations")]
    assert not any("a one-line prompt" in str(p) for p in prompts)  # the comment stayed a comment
