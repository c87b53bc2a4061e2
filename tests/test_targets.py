"""Every Databricks target of 2026 from one -e, over real HTTP: serving endpoints, Unity AI Gateway
model services (catalog.schema.name), agents on Databricks Apps (apps/NAME) on another loopback
host with OAuth only, and the rate limits as Databricks words them."""

from __future__ import annotations

import time

import pandas as pd
import pytest

import dbmagic
from dbmagic import Client, ConfigurationError, ConnectionFailed, RateLimited, SettingError
from dbmagic.call.wire import APP, MODEL_SERVICE, SERVING, target_of
from dbmagic.testing import LIMIT_MESSAGES
from dbmagic.transport.apps import app_url_or_none as _app_url_or_none

from .conftest import CHAT
from .test_credentials import RotatingContext, install_dbruntime

SERVICE = "system.ai.claude-sonnet-4-5"


def test_one_rule_reads_a_name():
    assert target_of("databricks-meta-llama-3-3-70b-instruct") == (SERVING, "databricks-meta-llama-3-3-70b-instruct")
    assert target_of("apps/support-agent") == (APP, "support-agent")
    assert target_of("system.ai.claude-sonnet-4-5") == (MODEL_SERVICE, "system.ai.claude-sonnet-4-5")
    assert target_of("a.b") == (SERVING, "a.b") and target_of("a..b") == (SERVING, "a..b")
    from dbmagic import settings

    for refused, said in (("apps/", "names an app after apps/"), ("apps/a/b", "names an app after apps/"),
                          ("apps/http://evil.example.com", "names an app after apps/"), ("cat/x", "plain name")):
        with pytest.raises(SettingError, match=said):
            settings.coerce("endpoint", refused)


# -- model services ----------------------------------------------------------------------------------

def test_a_model_service_is_queried_through_unity_ai_gateway(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    completion = client.complete("Hi there", endpoint=SERVICE, temperature=0.1)
    sent = workspace.requests[-1]
    assert (sent.method, sent.path) == ("POST", "/ai-gateway/mlflow/v1/chat/completions")
    assert sent.json == {"model": SERVICE, "messages": [{"role": "user", "content": "Hi there"}], "temperature": 0.1}
    assert (completion.text, completion.where, completion.usage.total) == ("Echo: Hi there", MODEL_SERVICE, 5)
    assert [r.path for r in workspace.requests] == ["/ai-gateway/mlflow/v1/chat/completions"]  # no look-up first


def test_a_streamed_model_service_asks_for_usage_and_reads_it(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    call = client.stream("one two", endpoint=SERVICE)
    assert "".join(call) == "Echo: one two"
    assert workspace.requests[-1].json["stream_options"] == {"include_usage": True}
    assert call.completion.usage.as_dict() == {"input": 2, "output": 3, "total": 5}  # sent only because asked


def test_an_external_model_streams_usage_only_when_asked(workspace):
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("my-openai", "llm/v1/chat", "EXTERNAL_MODEL", model="gpt-4o"))
    client = Client(host=workspace.host, token=workspace.token)
    call = client.stream("a b c", endpoint="my-openai")
    "".join(call)
    assert workspace.requests[-1].json["stream_options"] == {"include_usage": True}
    assert call.completion.usage.total == 7
    plain = client.stream("a b c", endpoint=CHAT)  # a Foundation Model API endpoint sends it anyway: not asked
    "".join(plain)
    assert "stream_options" not in workspace.requests[-1].json and plain.completion.usage.total == 7


def test_model_services_in_the_magic_a_batch_and_the_listing(shell, workspace):
    assert shell.run_cell(f"%%dbllm -e {SERVICE} -o said\nHello").success
    assert shell.user_ns["said"] == "Echo: Hello" and workspace.requests[-1].json["model"] == SERVICE
    shell.run_line_magic("dbllm", "last")
    shown = shell.display_pub.outputs[-1]["data"]["text/markdown"]
    assert "| where | model service |" in shown
    frame = pd.DataFrame({"text": ["a", "b", "c"]})
    out = dbmagic.batch("{{ text }}", frame, SERVICE, client=Client(host=workspace.host, token=workspace.token),
                        progress=False)
    assert list(out["answer"]) == ["Echo: a", "Echo: b", "Echo: c"]
    shell.run_line_magic("dbllm", "endpoints")
    listed = shell.display_pub.outputs[-1]["data"]["text/markdown"]
    assert f"| {SERVICE} | model service |" in listed


def test_an_unknown_model_service_says_so(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    with pytest.raises(dbmagic.EndpointNotFound, match="Model service 'main.x.nope' does not exist"):
        client.complete("x", endpoint="main.x.nope")


# -- apps --------------------------------------------------------------------------------------------

def test_an_app_is_refused_to_a_personal_access_token_before_anything_reaches_it(workspace):
    app = workspace.add_app("support-agent")
    client = Client(host=workspace.host, token=workspace.token)
    with pytest.raises(ConfigurationError, match="Databricks Apps accept OAuth tokens only") as refused:
        client.complete("hi", endpoint="apps/support-agent")
    assert "databricks auth login --host" in str(refused.value)
    assert app.requests == []  # the personal access token never reached the app's host
    assert client.whoami()["databricks apps"].startswith("not reachable: a personal access token")


def test_in_a_notebook_the_token_is_exchanged_and_only_oauth_reaches_the_app(monkeypatch, workspace):
    app = workspace.add_app("support-agent")
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    client = Client()
    assert client.complete("hi", endpoint="apps/support-agent").text == "Echo: hi"
    assert client.whoami()["databricks apps"] == "the notebook token exchanged for OAuth"
    exchange = next(r for r in workspace.requests if r.path == "/oidc/v1/token")
    assert exchange.method == "POST" and workspace.token_exchanges == 1
    lookup = next(r for r in workspace.requests if r.path == "/api/2.0/apps/support-agent")
    assert lookup.authorized
    call = client.stream("one two", endpoint="apps/support-agent")
    assert "".join(call) == "Echo: one two" and call.completion.where == APP
    assert workspace.token_exchanges == 1  # the OAuth token is kept until it expires
    assert [(r.path, r.credential) for r in app.requests] == [("/responses", "oauth"), ("/responses", "oauth")]
    assert app.requests[-1].json == {"model": "apps/support-agent", "input": [{"role": "user", "content": "one two"}],
                                     "stream": True}
    # the app is another host: the workspace saw no request for /responses, the app no personal access token
    assert not any(r.path == "/responses" for r in workspace.requests)
    assert all(r.credential == "oauth" for r in app.requests)


def test_an_oauth_login_reaches_the_app_with_its_own_token(clean_env, workspace):
    from .test_auth import write_profiles

    secret = workspace.add_service_principal("sp-apps")
    write_profiles(clean_env, f"[sp]\nhost = {workspace.host}\nclient_id = sp-apps\nclient_secret = {secret}\n")
    app = workspace.add_app("helper")
    client = Client(profile="sp")
    assert client.complete("yo", endpoint="apps/helper").text == "Echo: yo"
    assert [r.credential for r in app.requests] == ["oauth"] and workspace.token_exchanges == 0


def test_app_failures_carry_the_hints_users_need(monkeypatch, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    stopped = workspace.add_app("sleepy", running=False)
    client = Client()
    with pytest.raises(ConnectionFailed, match="may be stopped or starting"):
        client.complete("hi", endpoint="apps/sleepy")
    assert stopped.requests == []
    app = workspace.add_app("picky")
    workspace.fail("apps/picky", 403)
    with pytest.raises(dbmagic.PermissionDenied, match="CAN USE permission on app 'picky'"):
        client.complete("hi", endpoint="apps/picky")
    workspace.fail("apps/picky", 404)
    with pytest.raises(dbmagic.EndpointNotFound, match="does not answer POST /responses"):
        client.complete("hi", endpoint="apps/picky")
    with pytest.raises(dbmagic.EndpointNotFound, match="App with name ghost does not exist"):
        client.complete("hi", endpoint="apps/ghost")
    assert len(app.requests) == 2


def test_a_redirect_from_an_app_is_not_followed_with_the_token(monkeypatch, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    other = workspace.add_app("elsewhere")
    app = workspace.add_app("redirecting")
    workspace.fail("apps/redirecting", 302, headers={"Location": other.url + "/responses"}, body="")
    with pytest.raises(dbmagic.StatusError, match="does not follow"):
        Client().complete("hi", endpoint="apps/redirecting")
    assert len(app.requests) == 1 and other.requests == []


def test_only_an_apps_domain_url_from_the_workspace_gets_a_token():
    workspace = "https://adb-1.7.azuredatabricks.net"
    assert _app_url_or_none("https://agent-1.aws.databricksapps.com/", workspace) == "https://agent-1.aws.databricksapps.com"
    assert _app_url_or_none("https://a-2.azure.databricksapps.com", workspace) == "https://a-2.azure.databricksapps.com"
    for refused in ("https://evil.example.com", "https://databricksapps.com.evil.example.com",
                    "http://agent.aws.databricksapps.com", "http://127.0.0.2:8000", "https://user@agent.databricksapps.com",
                    "ftp://agent.databricksapps.com", None, 42):
        assert _app_url_or_none(refused, workspace) is None, refused
    # plain http only when the workspace itself is on loopback: the local workspace
    assert _app_url_or_none("http://127.0.0.2:8000", "http://127.0.0.1:5000") == "http://127.0.0.2:8000"


def test_a_workspace_that_names_a_foreign_url_gets_no_call(monkeypatch, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    app = workspace.add_app("support-agent")
    monkeypatch.setattr(type(app), "url", property(lambda self: "https://evil.example.com"))
    with pytest.raises(ConfigurationError, match="not https on a Databricks Apps domain"):
        Client().complete("hi", endpoint="apps/support-agent")


def test_apps_in_the_magic_and_the_listing(monkeypatch, shell, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    app = workspace.add_app("support-agent")
    dbmagic.configure()
    assert shell.run_cell("%%dbllm -e apps/support-agent -o said\nWhat can you do?").success
    assert shell.user_ns["said"] == "Echo: What can you do?" and app.requests[-1].credential == "oauth"
    shell.run_line_magic("dbllm", "endpoints")
    listed = shell.display_pub.outputs[-1]["data"]["text/markdown"]
    assert f"| apps/support-agent | app (Responses API) | RUNNING | DATABRICKS_APP | {app.url} |" in listed
    out = dbmagic.batch("{{ row }}", ["a", "b"], "apps/support-agent", progress=False)
    assert out.texts == ["Echo: a", "Echo: b"] and workspace.token_exchanges == 1


# -- rate limits as the platform words them ------------------------------------------------------------

@pytest.mark.parametrize(("limit", "named", "waits"), [("qps", "queries per second", True),
                                                       ("tpm", "tokens per minute", True),
                                                       ("qph", "queries per hour", False)])
def test_each_429_body_names_its_limit_and_a_batch_acts_on_it(workspace, limit, named, waits):
    client = Client(host=workspace.host, token=workspace.token)
    client.endpoint(CHAT)
    workspace.fail(CHAT, limit=limit)
    with pytest.raises(RateLimited) as refused:
        client.call(client.prepare("x", CHAT), retry=dbmagic.RetryPolicy(attempts=1)).wait()
    assert refused.value.limit == named and LIMIT_MESSAGES[limit] in str(refused.value)
    assert ("slows down to it" in str(refused.value)) == waits
    workspace.clear()
    workspace.fail(CHAT, limit=limit, times=2 if waits else 1000)
    started = time.monotonic()
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(8)], CHAT, client=client, progress=False,
                           concurrency=2)
    log = [r for r in workspace.requests if r.path.endswith("/invocations")]
    if waits:  # slowed down, then every row answered
        assert result.failed == [] and [r.status for r in log].count(429) == 2 and len(log) == 10
        first_ok = next(r.at for r in log if r.status == 200)
        assert first_ok > log[0].at
    else:  # fails fast, every row saying which limit, and nothing more is sent
        assert result.failed == list(range(8)) and len(log) <= 2
        assert time.monotonic() - started < 2
        assert all("queries per hour" in e for e in result.errors)


def test_the_panel_picks_and_sends_to_a_model_service_and_an_app(monkeypatch, shell, workspace):
    from dbmagic import Panel

    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    app = workspace.add_app("support-agent")
    dbmagic.configure()
    p = Panel(shell)
    try:
        labels = dict((v, k) for k, v in p.endpoint.options)
        assert labels[SERVICE] == f"{SERVICE} · model service · READY"
        assert labels["apps/support-agent"] == "apps/support-agent · app (Responses API) · RUNNING"
        for target in (SERVICE, "apps/support-agent"):
            p.endpoint.value = target
            p.prompt.value = "Hi"
            p.send_button.click()
            p.wait()
            assert p.result.text == "Echo: Hi" and p.result.endpoint == target
        assert app.requests[-1].credential == "oauth"
        assert workspace.requests[-1].path != "/responses"
    finally:
        p.stop()
        p.wait()


def test_a_model_service_through_the_responses_api(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    completion = client.complete("Hi", endpoint=SERVICE, task="responses")
    sent = workspace.requests[-1]
    assert sent.path == "/ai-gateway/mlflow/v1/responses"
    assert sent.json == {"model": SERVICE, "input": [{"role": "user", "content": "Hi"}]}
    assert completion.text == "Echo: Hi" and completion.kind == "responses"


# -- a batch that outlives its token ------------------------------------------------------------------

def _answered(workspace):
    """The prompts the workspace answered (200), in order: each row should appear once."""
    return [r.json["messages"][-1]["content"] for r in workspace.requests
            if r.path.endswith("/invocations") and r.status == 200]


def test_a_token_that_expires_mid_batch_stops_it_and_a_resume_sends_only_the_rest(workspace):
    client = Client(host=workspace.host, token=workspace.token)
    client.endpoint(CHAT)
    workspace.expire_tokens_after(3)
    rows = [f"r{i}" for i in range(10)]
    first = dbmagic.batch("{{ row }}", rows, CHAT, client=client, progress=False, concurrency=1)
    assert first.texts[:3] == ["Echo: r0", "Echo: r1", "Echo: r2"] and first.failed == list(range(3, 10))
    assert first.errors[3].startswith("Invalid") or "401" in first.errors[3]
    assert all("expired or was revoked during the batch" in e and "resume=result" in e for e in first.errors[3:])
    assert all(e.startswith("Not sent: the token was refused") for e in first.errors[4:])
    sent = [r.status for r in workspace.requests if r.path.endswith("/invocations")]
    assert sent == [200, 200, 200, 401]  # nothing is sent after the 401
    fresh = Client(host=workspace.host, token=workspace.token)  # signed in again: the workspace's new token
    again = dbmagic.batch("{{ row }}", rows, CHAT, client=fresh, progress=False, resume=first)
    assert again.texts == [f"Echo: r{i}" for i in range(10)] and again.failed == []
    assert sorted(_answered(workspace)) == sorted(rows)  # every row answered exactly once


def test_a_token_refused_from_the_start_sends_one_request_not_a_thousand(workspace):
    client = Client(host=workspace.host, token="dapi-not-a-token")
    result = dbmagic.batch("{{ row }}", [f"r{i}" for i in range(50)], CHAT, client=client, progress=False,
                           concurrency=4, task="chat")
    assert len(result.failed) == 50 and "during the batch" not in result.errors[-1]
    assert len([r for r in workspace.requests if r.path.endswith("/invocations")]) <= 4  # those already in flight


def test_a_listing_follows_every_page(workspace, monkeypatch):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    workspace.page_size = 2
    for i in range(5):
        workspace.add_app(f"agent-{i}", running=False)
        workspace.add_model_service(f"main.team.model-{i}")
    client = Client()
    found, notes = client.targets()
    names = [t.name for t in found]
    assert [n for n in names if n.startswith("apps/")] == [f"apps/agent-{i}" for i in range(5)] and notes == []
    assert [n for n in names if n.startswith("main.team.")] == [f"main.team.model-{i}" for i in range(5)]
    pages = [r for r in workspace.requests if r.path == "/api/2.0/apps"]
    assert len(pages) == 3


def test_an_oauth_access_token_given_as_the_token_reaches_an_app(workspace):
    app = workspace.add_app("helper")
    oauth = workspace.issue_token()  # what `databricks auth token` prints: a JWT
    client = Client(host=workspace.host, token=oauth)
    assert client.whoami()["databricks apps"] == "the OAuth access token given as the token"
    assert client.complete("yo", endpoint="apps/helper").text == "Echo: yo"
    assert [r.credential for r in app.requests] == ["oauth"]


def test_a_login_that_gives_no_oauth_token_is_refused_for_apps(clean_env, workspace):
    from .test_auth import write_profiles

    write_profiles(clean_env, f"[basic]\nhost = {workspace.host}\nusername = me\npassword = hunter22\n")
    app = workspace.add_app("helper")
    client = Client(profile="basic")
    with pytest.raises(ConfigurationError, match="Databricks Apps accept OAuth tokens only.*a basic login"):
        client.complete("yo", endpoint="apps/helper")
    assert app.requests == []  # the password never went to the app's host
    assert "hunter22" not in str(client.whoami())


def test_a_failed_token_exchange_is_a_short_scrubbed_error(monkeypatch, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    workspace.add_app("support-agent")
    client = Client()
    workspace.fail("/oidc/v1/token", 400, body={"error": "invalid_request",
                                                "error_description": f"bad subject {workspace.token}"})
    with pytest.raises(ConfigurationError, match="Could not get a token") as failed:
        client.complete("hi", endpoint="apps/support-agent")
    assert workspace.token not in str(failed.value) and "invalid_request" in str(failed.value)


def test_an_app_given_by_its_url_is_taken_only_on_an_apps_domain(monkeypatch, shell, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    app = workspace.add_app("support-agent")
    dbmagic.configure()
    assert target_of("https://agent-1.aws.databricksapps.com") == (APP, "https://agent-1.aws.databricksapps.com")
    # the local workspace is on loopback, so its app's plain-http loopback URL counts as an Apps domain here
    assert shell.run_cell(f"%%dbllm -e {app.url} -o said\nHi").success
    assert shell.user_ns["said"] == "Echo: Hi" and app.requests[-1].credential == "oauth"
    assert "model" not in app.requests[-1].json  # no app name to give
    before = len(workspace.requests)
    for elsewhere in ("https://evil.example.com", "https://databricksapps.com.evil.example.com/x"):
        with pytest.raises(ConfigurationError, match="not a URL dbmagic sends a token to"):
            Client().complete("hi", endpoint=elsewhere)
    assert len(workspace.requests) == before  # refused before anything was sent, to the workspace or elsewhere
    from dbmagic import settings

    with pytest.raises(SettingError, match="white space"):
        settings.coerce("endpoint", "https://a.databricksapps.com/ x")


def test_compare_a_serving_endpoint_a_model_service_and_an_app_side_by_side(monkeypatch, shell, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    app = workspace.add_app("support-agent")
    dbmagic.configure()
    shell.run_cell_magic("dbllm", f"-e {CHAT} -e {SERVICE} -e apps/support-agent -o cmp", "Hello")
    cmp = shell.user_ns["cmp"]
    assert list(cmp) == [CHAT, SERVICE, "apps/support-agent"]
    assert [cmp[k].text for k in cmp] == ["Echo: Hello"] * 3
    assert [cmp[k].where for k in cmp] == [SERVING, MODEL_SERVICE, APP]
    assert [r.credential for r in app.requests] == ["oauth"]
    compared = shell.display_pub.outputs[-1]["metadata"]["dbmagic"]["compare"]
    assert [c["endpoint"] for c in compared] == [CHAT, SERVICE, "apps/support-agent"]


def test_an_app_that_times_out_says_so_without_the_stopped_hint(monkeypatch, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    workspace.add_app("slow", latency=1.0)
    with pytest.raises(dbmagic.RequestTimeout) as late:
        Client().complete("hi", endpoint="apps/slow", timeout=0.2)
    assert "stopped or starting" not in str(late.value)
