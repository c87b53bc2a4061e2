"""Every workspace auth type, through databricks-sdk against the local workspace over real HTTP;
profiles that never send one workspace's token to another; workspace detection that never breaks."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest

import dbmagic
from dbmagic import Client, ConfigurationError
from dbmagic.testing import LocalWorkspace
from dbmagic.transport.credentials import resolve_credentials

from .conftest import CHAT, CLUSTER, PORT


@pytest.fixture
def other():
    """A second workspace, whose request log must stay empty when credentials are for the first."""
    with LocalWorkspace() as ws:
        yield ws


def write_profiles(home, text):
    path = home / ".databrickscfg"
    path.write_text(text)
    return path


def invocations(ws):
    return [r for r in ws.requests if r.path.endswith("/invocations")]


def test_service_principal_profile_oauth_m2m_end_to_end(clean_env, workspace):
    secret = workspace.add_service_principal("sp-1")
    write_profiles(clean_env, f"[sp]\nhost = {workspace.host}\nclient_id = sp-1\nclient_secret = {secret}\n")
    client = Client(profile="sp")
    assert client.complete("Hi", endpoint=CHAT).text == "Echo: Hi"
    paths = [(r.method, r.path) for r in workspace.requests]
    assert paths[:3] == [("GET", "/.well-known/databricks-config"),
                         ("GET", "/oidc/.well-known/oauth-authorization-server"), ("POST", "/oidc/v1/token")]
    assert invocations(workspace)[-1].authorized  # an OAuth token the workspace issued, not a PAT
    info = client.whoami()
    assert info["auth type"] == "oauth-m2m" and info["source"].startswith("profile sp")
    assert secret not in repr(client.credentials) + str(info)


def test_service_principal_from_the_environment_and_a_wrong_secret(workspace, monkeypatch):
    workspace.add_service_principal("sp-2", "right-secret")
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-2")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "right-secret")
    assert Client().complete("env", endpoint=CHAT).text == "Echo: env"
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", "wrong-secret-value")
    with pytest.raises(ConfigurationError) as info:
        Client().complete("x", endpoint=CHAT)
    message = str(info.value)
    assert "3. environment:" in message and "wrong-secret-value" not in message
    assert len(invocations(workspace)) == 1


def test_an_expired_oauth_token_signs_in_again_once(clean_env, workspace):
    secret = workspace.add_service_principal("sp-3")
    write_profiles(clean_env, f"[DEFAULT]\nhost = {workspace.host}\nclient_id = sp-3\nclient_secret = {secret}\n")
    client = Client()
    client.complete("one", endpoint=CHAT)
    workspace.revoke_tokens()  # the SDK still holds the old token: the next request gets a 401
    assert client.complete("two", endpoint=CHAT).text == "Echo: two"
    token_posts = [r for r in workspace.requests if r.path == "/oidc/v1/token"]
    assert len(token_posts) == 2
    assert [r.authorized for r in invocations(workspace)] == [True, False, True]


def test_u2m_profile_through_the_databricks_cli(clean_env, workspace, tmp_path, monkeypatch):
    token = workspace.issue_token()
    calls = tmp_path / "calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "databricks"
    cli.write_text(f"""#!{sys.executable}
# a stand-in for the Databricks CLI: `version` and `auth token`, as `databricks auth login` left it
import json, sys
args = sys.argv[1:]
with open({str(calls)!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[:1] == ["version"]:
    print(json.dumps({{"Version": "0.300.0", "Major": 0, "Minor": 300, "Patch": 0}}))
elif args[:2] == ["auth", "token"]:
    print(json.dumps({{"access_token": {token!r}, "token_type": "Bearer", "expiry": "2099-01-01T00:00:00Z"}}))
else:
    sys.exit(f"unexpected: {{args}}")
""")
    cli.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    write_profiles(clean_env, f"[u2m]\nhost = {workspace.host}\nauth_type = databricks-cli\n")
    client = Client(profile="u2m")
    assert client.complete("Hi", endpoint=CHAT).text == "Echo: Hi"
    assert invocations(workspace)[-1].authorized
    assert client.whoami()["auth type"] == "databricks-cli"
    asked = [json.loads(line) for line in calls.read_text().splitlines()]
    assert ["auth", "token", "--profile", "u2m", "--force-refresh"] in asked


def test_metadata_service_as_the_vs_code_extension_sets_it(workspace, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_AUTH_TYPE", "metadata-service")
    monkeypatch.setenv("DATABRICKS_METADATA_SERVICE_URL", workspace.metadata_service_url)
    monkeypatch.setenv("DATABRICKS_CLUSTER_ID", CLUSTER)
    client = Client()
    assert client.complete("Hi", endpoint=CHAT).text == "Echo: Hi"
    assert client.whoami()["auth type"] == "metadata-service"
    served = [r for r in workspace.requests if r.path.startswith("/metadata-service/")]
    assert served and served[0].headers["X-Databricks-Host"] == workspace.host
    # the extension's cluster is the driver-proxy default
    assert client.complete("proxy", port=PORT).value == "Echo: proxy"
    assert invocations(workspace) and f"/{CLUSTER}/{PORT}" in workspace.requests[-1].path


def test_a_profile_does_not_inherit_default_s_token(clean_env, workspace, other):
    # configparser merged [DEFAULT] into every section: profile b would have sent a's token to b
    write_profiles(clean_env, f"[DEFAULT]\nhost = {workspace.host}\ntoken = {workspace.token}\n"
                              f"[b]\nhost = {other.host}\nauth_type = databricks-cli\n"
                              f"[c]\nhost = {other.host}\n")
    for name in ("b", "c"):
        with pytest.raises(ConfigurationError, match=f"Profile '{name}' did not give credentials"):
            Client(profile=name).complete("x", endpoint=CHAT)
    assert [r for r in other.requests if r.headers.get("Authorization")] == []
    assert workspace.requests == []
    assert Client().complete("x", endpoint=CHAT).text == "Echo: x"  # DEFAULT itself still works, on its host


def test_a_host_without_a_token_uses_only_a_profile_for_that_host(clean_env, workspace, other, monkeypatch):
    write_profiles(clean_env, f"[DEFAULT]\nhost = {workspace.host}\ntoken = {workspace.token}\n")
    monkeypatch.setenv("DATABRICKS_HOST", other.host)
    with pytest.raises(ConfigurationError) as info:
        Client().complete("x", endpoint=CHAT)
    message = str(info.value)
    assert f"DATABRICKS_HOST is {other.host} but DATABRICKS_TOKEN is not set" in message
    assert "set DATABRICKS_TOKEN, or DATABRICKS_CONFIG_PROFILE" in message
    assert other.requests == [] and workspace.requests == []
    write_profiles(clean_env, f"[DEFAULT]\nhost = {workspace.host}\ntoken = {workspace.token}\n"
                              f"[other]\nhost = {other.host}/\ntoken = {other.token}\n")
    client = Client()
    assert client.complete("y", endpoint=CHAT).text == "Echo: y"
    assert client.credentials.source.startswith("profile other") and workspace.requests == []


def test_a_notebook_context_that_raises_falls_through(workspace, monkeypatch):
    module = types.ModuleType("dbruntime.databricks_repl_context")

    def get_context():
        raise RuntimeError("py4j.security.Py4JSecurityException: Method public ... is not whitelisted")

    module.get_context = get_context
    monkeypatch.setitem(sys.modules, "dbruntime", types.ModuleType("dbruntime"))
    monkeypatch.setitem(sys.modules, "dbruntime.databricks_repl_context", module)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")
    with pytest.raises(ConfigurationError) as info:
        resolve_credentials()
    assert "2. notebook context: dbruntime's get_context() raised RuntimeError" in str(info.value)
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
    creds = resolve_credentials()
    assert creds.source == "environment"
    assert "dbruntime's get_context() raised RuntimeError" in creds.describe()["skipped 1"]


def test_a_custom_container_runtime_is_detected_by_its_version_file(workspace, monkeypatch, tmp_path):
    marker = tmp_path / "DBR_VERSION"
    marker.write_text("15.4")
    main = types.ModuleType("__main__")
    main.dbutils = _FakeDbutils(workspace)
    monkeypatch.setitem(sys.modules, "__main__", main)
    creds = resolve_credentials(runtime_marker=marker)
    assert (creds.source, creds.host, creds.cluster_id) == ("notebook context", workspace.host, CLUSTER)
    assert Client(credentials=creds).complete("Hi", endpoint=CHAT).text == "Echo: Hi"


def test_workspace_id_header_from_the_environment(workspace, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
    monkeypatch.setenv("DATABRICKS_WORKSPACE_ID", "4242")
    dbmagic.configure()
    dbmagic.get_client().complete("Hi", endpoint=CHAT)
    assert invocations(workspace)[-1].headers["X-Databricks-Workspace-Id"] == "4242"
    dbmagic.get_client().complete("Hi", port=PORT, cluster_id=CLUSTER)
    assert workspace.requests[-1].path == f"/driver-proxy-api/o/4242/{CLUSTER}/{PORT}"


class _FakeDbutils:
    """dbutils.notebook.entry_point...getContext(), with Scala Options, as WIRE.md describes."""

    def __init__(self, ws):
        option = lambda value: types.SimpleNamespace(get=lambda: value, isDefined=lambda: True)  # noqa: E731
        context = types.SimpleNamespace(apiUrl=lambda: option(ws.host), apiToken=lambda: option(ws.token),
                                        clusterId=lambda: option(CLUSTER), workspaceId=lambda: option("99"))
        notebook = types.SimpleNamespace(getContext=lambda: context)
        entry = types.SimpleNamespace(getDbutils=lambda: types.SimpleNamespace(notebook=lambda: notebook))
        self.notebook = types.SimpleNamespace(entry_point=entry)


def test_a_personal_access_token_never_loads_the_sdk(workspace):
    import subprocess

    code = ("import sys, dbmagic; c = dbmagic.Client(host=sys.argv[1], token=sys.argv[2]); "
            f"print(c.complete('x', endpoint={CHAT!r}).text, 'databricks.sdk' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, workspace.host, workspace.token], capture_output=True,
                         text=True, check=True, env={**os.environ, "HOME": "/nonexistent"})
    assert out.stdout.split() == ["Echo:", "x", "False"]


@pytest.mark.parametrize("explicit", [True, False])
def test_a_profile_sign_in_sends_only_the_profiles_own_client_secret(clean_env, workspace, other, monkeypatch,
                                                                      explicit):
    """On main databricks-sdk merged DATABRICKS_CLIENT_ID/_SECRET of another workspace over the
    profile's, and the profile's token endpoint received that workspace's secret."""
    from dbmagic.testing import secret_fingerprint

    mine = workspace.add_service_principal("sp-b")
    theirs = other.add_service_principal("sp-a")
    write_profiles(clean_env, f"[b]\nhost = {workspace.host}\nclient_id = sp-b\nclient_secret = {mine}\n")
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-a")  # workspace A's service principal, for another tool
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", theirs)
    if not explicit:
        monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", "b")
    client = Client(profile="b") if explicit else Client()
    assert client.complete("Hi", endpoint=CHAT).text == "Echo: Hi"
    assert workspace.client_credentials_seen == [("sp-b", secret_fingerprint(mine))]
    assert other.requests == []


def test_the_environment_sign_in_uses_only_the_environments_keys(clean_env, workspace, other, monkeypatch):
    from dbmagic.testing import secret_fingerprint

    mine = workspace.add_service_principal("sp-env")
    theirs = other.add_service_principal("sp-file")
    write_profiles(clean_env, f"[DEFAULT]\nhost = {other.host}\nclient_id = sp-file\nclient_secret = {theirs}\n")
    monkeypatch.setenv("DATABRICKS_HOST", workspace.host)
    monkeypatch.setenv("DATABRICKS_CLIENT_ID", "sp-env")
    monkeypatch.setenv("DATABRICKS_CLIENT_SECRET", mine)
    assert Client().complete("Hi", endpoint=CHAT).text == "Echo: Hi"
    assert workspace.client_credentials_seen == [("sp-env", secret_fingerprint(mine))]
    assert other.requests == []


def test_a_wrong_client_secret_leaves_no_sdk_credentials_behind_the_error(clean_env, workspace):
    """On main the error's suppressed __context__ kept the SDK's frames, and its credentials, alive."""
    import traceback

    workspace.add_service_principal("sp-w", "the-right-secret")
    write_profiles(clean_env, f"[w]\nhost = {workspace.host}\nclient_id = sp-w\nclient_secret = wrong-secret-value\n")
    with pytest.raises(ConfigurationError, match="invalid_client") as info:
        Client(profile="w").complete("x", endpoint=CHAT)
    chain, error = [], info.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert chain == [info.value]
    for frame, _ in traceback.walk_tb(info.value.__traceback__):
        for value in frame.f_locals.values():
            assert not type(value).__module__.startswith("databricks.sdk"), (frame.f_code.co_name, type(value))
            assert "wrong-secret-value" not in repr(value)
