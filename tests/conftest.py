"""Shared fixtures: a clean environment, the local workspace, a fake clock, a client wired to them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

import dbmagic
import dbmagic.client
from dbmagic import Client, RetryPolicy
from dbmagic.testing import LocalWorkspace

CHAT = "databricks-meta-llama-3-3-70b-instruct"
COMPLETIONS = "local-completions"
EMBEDDINGS = "databricks-gte-large-en"
CUSTOM = "local-custom-model"
CLUSTER, PORT = "0123-456789-local", 7777


# LangChain's documented transforms, verbatim (its Databricks LLM page): the magic tests run this
# source in the notebook namespace; the client tests exec it.
LANGCHAIN_TRANSFORMS = '''
def transform_input(**request):
    full_prompt = f"""{request["prompt"]}
    Be Concise.
    """
    request["prompt"] = full_prompt
    return request

def transform_output(response):
    return response.upper()
'''


# Every secret a local workspace makes is recognisable: its token, issued OAuth tokens, service
# principal secrets. The audit below fails any test whose captured output, logs (captured at DEBUG,
# see pyproject.toml) or error text shows one.
CANARY = re.compile(r"dbmagic-local-(?:oauth-|secret-)?[0-9a-f]{16,}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call":
        return
    texts = [content for _, content in report.sections] + [str(report.longrepr or "")]
    leaks = canaries_in(texts)
    if leaks:
        report.outcome = "failed"
        report.longrepr = (f"A local workspace secret reached the test's output, logs or error text: {leaks}\n"
                           + CANARY.sub("<secret>", str(report.longrepr or "")))


def canaries_in(texts) -> list[str]:
    """The local workspace secrets (shortened) found in ``texts``."""
    return sorted({m.group(0)[:20] + "..." for text in texts for m in CANARY.finditer(str(text))})


@pytest.fixture(autouse=True)
def audit_what_users_see(tmp_path):
    """The canary audit, for what a test's output capture does not hold: how every call ended (its
    text, value and error: a batch's answer and error columns, a compared call's column, the panel's
    answer), heard as a subscriber of every client (`dbmagic.subscribe`, no patch), every display
    the shell captured, the state of every live widget (the panel), and every ledger file the test
    left in its temporary folder or the kernel's cache folder (checkpoints, the cache). A secret in
    any of them fails the test."""
    import ipywidgets.widgets.widget as widget_module

    seen: list[str] = []

    class Audit(dbmagic.Subscriber):
        def on_done(self, call, completion):
            seen.extend([completion.text, repr(completion.value), str(completion.error or ""), repr(completion.raw)])

        def on_failed(self, call, error):
            seen.append(str(error))

        def on_refused(self, endpoint, prompt, error):
            seen.append(str(error))

    unsubscribe = dbmagic.subscribe(Audit())
    widgets_before = set(widget_module._instances)
    try:
        yield
    finally:
        unsubscribe()
    texts: list[str] = list(seen)
    shell = InteractiveShell.initialized() and InteractiveShell.instance()
    if shell and isinstance(shell.display_pub, CapturingDisplayPublisher):
        texts += [repr(output) for output in shell.display_pub.outputs]
    for key, w in list(widget_module._instances.items()):
        if key in widgets_before:
            continue
        try:
            texts.append(repr(w.get_state()))
        except Exception:  # a widget half torn down: nothing it holds is shown
            continue
    from dbmagic import ledger

    # the ledgers a test wrote (checkpoints, caches: JSON Lines files), wherever under its folder, and the
    # kernel's cache folder (not the test's own inputs there, such as a ~/.databrickscfg holding a secret)
    texts += [_file_text(path) for path in tmp_path.rglob("*.jsonl")]
    if ledger.cache() is not None:
        texts += [_file_text(path) for path in ledger.cache().ledger.path.rglob("*")]
    leaks = canaries_in(texts)
    if leaks:
        pytest.fail(f"A local workspace secret reached an answer, an error, a display, a widget or a file "
                    f"(a checkpoint, the cache): {leaks}")


def _file_text(path: Path) -> str:
    """A regular file's bytes as text (never through a symlink, never a FIFO); large files in part."""
    try:
        if not path.is_file() or path.is_symlink():
            return ""
        with open(path, "rb") as file:
            return file.read(50 << 20).decode("latin-1")
    except OSError:
        return ""


_ROOT = Path(__file__).resolve().parent.parent
_STORES = ("mlflow.db", "mlruns")


def _stores() -> dict[str, object]:
    """What is in the checkout's MLflow stores: each file's name, size and time (none when absent)."""
    found: dict[str, object] = {}
    for name in _STORES:
        top = _ROOT / name
        files = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        found[name] = {(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files
                       if path.is_file()} if top.exists() else None
    return found


_STORES_BEFORE = _stores()


def pytest_sessionfinish(session, exitstatus):
    """A test run leaves nothing in an MLflow store of the checkout (they go to temporary folders):
    a store made, or one that was there and was written to (so a local run sees what CI sees)."""
    now = _stores()
    left = {name for name in _STORES if now[name] is not None and now[name] != _STORES_BEFORE[name]}
    if left:
        session.config.get_terminal_writer().line(f"The test run left {', '.join(sorted(left))} in the checkout.",
                                                  red=True)
        session.exitstatus = 1


class FakeClock:
    """A clock whose sleep only advances time, and records what it was asked to wait."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No real DATABRICKS_* settings, a temporary HOME, and no shared client left from another test."""
    import os

    from dbmagic.transport.credentials import OTHER_VARIABLES

    for name in list(os.environ):
        if name.startswith("DATABRICKS_") or name in OTHER_VARIABLES:
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    dbmagic.client.set_default(None)
    yield home
    dbmagic.client.set_default(None)  # closes the one a test made


@pytest.fixture
def shell(workspace, monkeypatch):
    """The IPython singleton (display() publishes through it) with dbmagic freshly loaded,
    credentials from the environment, and every display captured."""
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
    ip = InteractiveShell.instance()
    ip.config.pop("DbLLM", None)
    ip.reset(new_session=False)
    ip.run_line_magic("xmode", "Verbose")  # tracebacks print every frame's locals: the audit reads them
    ip.run_line_magic("reload_ext", "dbmagic")
    ip.display_pub = CapturingDisplayPublisher()
    ip.rl_next_input = None
    yield ip
    ip.display_pub = CapturingDisplayPublisher()


@pytest.fixture
def workspace():
    with LocalWorkspace() as ws:
        yield ws


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def client(workspace, clock):
    c = Client(host=workspace.host, token=workspace.token, clock=clock, retry=RetryPolicy(attempts=4, deadline=120))
    yield c
    c.close()
