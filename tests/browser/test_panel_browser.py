"""The panel in a real browser: JupyterLab in headless Debian Chromium, driven by Playwright.

Opens a notebook that runs ``%dbllm panel`` against the local workspace, types a prompt, presses
Send (and then Ctrl+Enter), and checks that the answer streams in and the status line appears.
Saves ``artifacts/panel.png``. Needs ``/usr/bin/chromium`` (``apt-get install -y chromium``; .ci/run
installs it); without it the test is skipped locally and fails under CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dbmagic.testing import LocalWorkspace

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        pytest.fail("CI must have Chromium for the browser test: apt-get install -y chromium", pytrace=False)
    pytest.skip("no /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)
playwright = pytest.importorskip("playwright.sync_api")

NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "panel", "metadata": {}, "outputs": [],
               "source": "%load_ext dbmagic\n%dbllm panel"}],
    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}


# an answer as data, as a newcomer first meets it (README: "Answers as data")
SCHEMA_NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "model", "metadata": {}, "outputs": [],
               "source": "%load_ext dbmagic\nfrom pydantic import BaseModel\n\nclass Review(BaseModel):\n"
                         "    sentiment: str\n    stars: int\n"},
              {"cell_type": "code", "execution_count": None, "id": "ask", "metadata": {}, "outputs": [],
               "source": "%%dbllm -e databricks-meta-llama-3-3-70b-instruct --schema Review\n"
                         "The battery lasts two days"}],
    "metadata": NOTEBOOK["metadata"], "nbformat": 4, "nbformat_minor": 5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server whose kernels see the local workspace through DATABRICKS_HOST/TOKEN."""
    with LocalWorkspace(chunk_delay=0.15) as ws:
        root, config = tmp_path / "root", tmp_path / "jupyter"
        root.mkdir()
        (root / "panel.ipynb").write_text(json.dumps(NOTEBOOK))
        (root / "schema.ipynb").write_text(json.dumps(SCHEMA_NOTEBOOK))
        (config / "config" / "labconfig").mkdir(parents=True)
        (config / "config" / "labconfig" / "page_config.json").write_text(json.dumps(
            {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
        port, token = free_port(), secrets.token_hex(16)
        env = {**os.environ, **ws.environ(),
               "JUPYTER_CONFIG_DIR": str(config / "config"), "JUPYTER_DATA_DIR": str(config / "data"),
               "JUPYTER_RUNTIME_DIR": str(config / "runtime"), "IPYTHONDIR": str(config / "ipython"),
               "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
        env.pop("JUPYTER_PATH", None)
        log = open(tmp_path / "lab.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", f"--ServerApp.token={token}",
             "--ServerApp.ip=127.0.0.1", "--allow-root", f"--ServerApp.root_dir={root}",
             "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        previous = signal.signal(signal.SIGTERM, lambda *a: (_kill(server), sys.exit(1)))
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()) from None
                    time.sleep(0.3)
            yield f"http://127.0.0.1:{port}/lab/tree/panel.ipynb?token={token}&reset", ws
        finally:
            _kill(server)
            signal.signal(signal.SIGTERM, previous)
            log.close()


def _kill(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@contextlib.contextmanager
def notebook_page(url: str, block: str | None = None, height: int = 1000) -> Iterator[tuple[Any, list[str]]]:
    """Chromium on a notebook of the lab, every cell run (the kernel idle first): ``(page, the URLs
    blocked)``. ``block`` is a URL pattern whose requests are refused."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": height})
            blocked: list[str] = []
            if block:
                page.route(block, lambda route: (blocked.append(route.request.url), route.abort()))
            page.goto(url)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
            expect(page.get_by_role("button", name="Python 3 (ipykernel) | Idle")).to_be_visible(timeout=60_000)
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return 1; }")
            yield page, blocked
        finally:
            browser.close()


@contextlib.contextmanager
def panel_page(url: str, block: str | None = None) -> Iterator[tuple[Any, list[str]]]:
    """The panel notebook (`notebook_page`), once the panel's prompt shows."""
    from playwright.sync_api import expect

    with notebook_page(url, block) as (page, blocked):
        expect(page.locator(".dbmagic-prompt textarea")).to_be_visible(timeout=30_000)
        yield page, blocked


def test_panel_streams_an_answer_in_jupyterlab(lab):
    url, ws = lab
    from playwright.sync_api import expect

    with panel_page(url) as (page, _):
        prompt = page.locator(".dbmagic-prompt textarea")
        cells_before = page.locator(".jp-NotebookPanel .jp-Cell").count()
        prompt.click()
        prompt.fill("")
        prompt.type("Hello from a real browser, one two three")  # keystrokes, with 'a' and 'b' in them
        page.get_by_role("button", name="Send").click()

        answer = page.locator(".dbmagic-answer")
        final = "Echo: Hello from a real browser, one two three"
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = answer.inner_text().strip()
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            if text == final:
                break
            time.sleep(0.02)
        assert seen and seen[-1] == final, seen
        assert len(seen) >= 3, f"the answer did not stream in: {seen}"  # partial texts came first
        status = page.locator(".dbmagic-status")
        expect(status).to_contain_text("meta-llama-3.3-70b-instruct", timeout=10_000)
        expect(status).to_contain_text("tokens")
        assert page.locator(".jp-NotebookPanel .jp-Cell").count() == cells_before  # typing made no cells
        sent = [r for r in ws.requests if r.path.endswith("/invocations")]
        assert sent[-1].json["messages"][-1]["content"] == "Hello from a real browser, one two three"
        page.screenshot(path=str(ARTIFACTS / "panel.png"), full_page=True)

        prompt.fill("Sent with the keyboard")
        prompt.press("Control+Enter")
        expect(answer).to_contain_text("Echo: Sent with the keyboard", timeout=30_000)


def test_panel_works_when_the_anywidget_front_end_does_not_load(lab):
    # Databricks notebooks render core ipywidgets; third-party front-end code may not load there
    url, ws = lab
    from playwright.sync_api import expect

    with panel_page(url, block="**/lab/extensions/anywidget/**") as (page, blocked):
        prompt = page.locator(".dbmagic-prompt textarea")
        cells_before = page.locator(".jp-NotebookPanel .jp-Cell").count()
        prompt.click()
        prompt.type("Without anywidget, a b c")
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".dbmagic-answer")).to_have_text("Echo: Without anywidget, a b c", timeout=30_000)
        expect(page.locator(".dbmagic-status")).to_contain_text("tokens", timeout=10_000)
        assert blocked, "the anywidget front end was not requested, so nothing was blocked"
        assert page.locator(".jp-NotebookPanel .jp-Cell").count() == cells_before


def test_panel_compare_mode_in_jupyterlab(lab):
    url, ws = lab
    from playwright.sync_api import expect

    with panel_page(url) as (page, _):
        page.get_by_role("button", name="Compare").click()
        picker = page.locator(".dbmagic-compare-endpoints select")
        expect(picker).to_be_visible(timeout=10_000)
        picker.select_option(label=["databricks-meta-llama-3-3-70b-instruct · llm/v1/chat · READY",
                                    "local-completions · llm/v1/completions · READY"])
        prompt = page.locator(".dbmagic-prompt textarea")
        prompt.click()
        prompt.type("Both of you, one two")
        page.get_by_role("button", name="Send").click()
        table = page.locator(".dbmagic-answer table.dbmagic-compare")
        expect(table).to_be_visible(timeout=30_000)
        expect(table.locator("th", has_text="local-completions")).to_be_visible()
        expect(table.locator("td", has_text="Echo: Both of you, one two")).to_have_count(2, timeout=30_000)
        expect(page.locator(".dbmagic-status")).to_contain_text("Compared 2 endpoints", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "panel-compare.png"), full_page=True)
        sent = sorted(r.path for r in ws.requests if r.path.endswith("/invocations"))
        assert sent == ["/serving-endpoints/databricks-meta-llama-3-3-70b-instruct/invocations",
                        "/serving-endpoints/local-completions/invocations"]


def test_an_answer_as_data_is_a_table_in_jupyterlab(lab):
    """First hour, round two, item 4: on main a schema's answer carried application/json, which
    JupyterLab 4 ranks above Markdown: users got a collapsible JSON tree, not the table."""
    url, _ = lab
    from playwright.sync_api import expect

    with notebook_page(url.replace("panel.ipynb", "schema.ipynb"), height=900) as (page, _):
        table = page.locator(".jp-OutputArea-output table")
        expect(table).to_be_visible(timeout=30_000)
        expect(table).to_contain_text("sentiment")
        expect(table).to_contain_text("stars")
        assert page.locator(".jp-RenderedJSON").count() == 0  # no JSON tree
        page.screenshot(path=str(ARTIFACTS / "schema-table.png"), full_page=True)
