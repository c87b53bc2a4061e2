"""Where the host and token come from, in order, and that the token never shows."""

from __future__ import annotations

import sys
import types

import pytest

from dbmagic import Client, ConfigurationError
from dbmagic.transport.credentials import normalize_host, resolve_credentials

from .conftest import CHAT


def write_profile(home, text):
    path = home / ".databrickscfg"
    path.write_text(text)
    return path


def test_explicit_arguments_win_over_environment_and_profile(clean_env, monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", "https://env.example.com")
    monkeypatch.setenv("DATABRICKS_TOKEN", "env-token")
    write_profile(clean_env, "[DEFAULT]\nhost = https://profile.example.com\ntoken = profile-token\n")
    creds = resolve_credentials("https://explicit.example.com", "explicit-token")
    assert (creds.host, creds.token.reveal(), creds.source) == ("https://explicit.example.com", "explicit-token",
                                                        "explicit arguments")


def test_environment_used_outside_a_notebook(monkeypatch):
    monkeypatch.setenv("DATABRICKS_HOST", "adb-123.4.azuredatabricks.net/")
    monkeypatch.setenv("DATABRICKS_TOKEN", "env-token\n")  # as `export DATABRICKS_TOKEN=$(cat file)` can leave it
    creds = resolve_credentials()
    assert creds.host == "https://adb-123.4.azuredatabricks.net"
    assert creds.source == "environment"
    assert creds.token.reveal() == "env-token"


def test_default_profile_in_home(clean_env):
    path = write_profile(clean_env, "[DEFAULT]\nhost = https://profile.example.com/\ntoken = profile-token\n")
    creds = resolve_credentials()
    assert creds.host == "https://profile.example.com"
    assert creds.source == f"profile DEFAULT ({path})"
    assert creds.token.reveal() == "profile-token"


def test_profile_chosen_by_variable_settings_or_argument(clean_env, monkeypatch):
    write_profile(clean_env, (
        "[__settings__]\ndefault_profile = staging\n"
        "[staging]\nhost = https://staging.example.com\ntoken = s\n"
        "[prod]\nhost = https://prod.example.com\ntoken = p\n"
    ))
    assert resolve_credentials().host == "https://staging.example.com"
    monkeypatch.setenv("DATABRICKS_CONFIG_PROFILE", "prod")
    assert resolve_credentials().host == "https://prod.example.com"
    assert resolve_credentials(profile="staging").source.startswith("profile staging")


def test_config_file_variable(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.cfg"
    path.write_text("[DEFAULT]\nhost = elsewhere.example.com\ntoken = t\n")
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(path))
    assert resolve_credentials().host == "https://elsewhere.example.com"


def test_nothing_found_lists_every_source_and_the_fix(clean_env, monkeypatch):
    monkeypatch.setenv("DATABRICKS_TOKEN", "half-configured-secret")
    with pytest.raises(ConfigurationError) as info:
        resolve_credentials()
    message = str(info.value)
    assert "1. explicit arguments: none given" in message
    assert "2. notebook context: not in a Databricks runtime" in message
    assert "3. environment: DATABRICKS_HOST not set" in message
    assert f"4. profile file {clean_env / '.databrickscfg'}: not found" in message
    assert "set DATABRICKS_HOST and DATABRICKS_TOKEN" in message
    assert "half-configured-secret" not in message


def test_profile_without_credentials_says_what_is_missing(clean_env):
    write_profile(clean_env, "[DEFAULT]\nhost = https://h.example.com\n")
    with pytest.raises(ConfigurationError, match=r"profile DEFAULT in .*: a host without credentials \(add a `token`, "
                                                 r"or run `databricks auth login --host https://h.example.com"):
        resolve_credentials()


def test_named_profile_missing(clean_env):
    write_profile(clean_env, "[DEFAULT]\nhost = https://h.example.com\ntoken = t\n")
    with pytest.raises(ConfigurationError, match="Profile 'nope' did not give .* no such profile"):
        resolve_credentials(profile="nope")


def test_half_explicit_arguments_are_refused():
    with pytest.raises(ConfigurationError, match="Pass both host= and token=.*token= is missing"):
        resolve_credentials(host="https://h.example.com")


@pytest.mark.parametrize("given, expected", [
    ("adb-1.2.azuredatabricks.net", "https://adb-1.2.azuredatabricks.net"),
    ("https://dbc-a1.cloud.databricks.com///", "https://dbc-a1.cloud.databricks.com"),
    ("  https://h.example.com/ ", "https://h.example.com"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ("http://localhost:1", "http://localhost:1"),
    # LangChain's lstrip("https://") would turn this host into "ost.example.com"
    ("https://host.example.com", "https://host.example.com"),
])
def test_host_normalisation(given, expected):
    assert normalize_host(given) == expected


def test_plain_http_refused_unless_loopback():
    with pytest.raises(ConfigurationError, match="Refusing plain http:// for example.com.*https://example.com"):
        normalize_host("http://example.com")


def test_repr_hides_the_token(workspace):
    creds = resolve_credentials(workspace.host, workspace.token)
    client = Client(credentials=creds)
    for text in (repr(creds), str(creds), repr(client), str(client.whoami())):
        assert workspace.token not in text
    assert "token='***'" in repr(creds)
    assert client.whoami() == {"host": workspace.host, "source": "explicit arguments", "auth type": "pat",
                               "token": "***",
                               "databricks apps": "not reachable: a personal access token (Apps take OAuth only)"}


# -- the notebook context, with stand-ins shaped as WIRE.md says ----------------------------------

class RotatingContext:
    """Stands in for dbruntime's context: the token can change between reads, as in a workspace."""

    def __init__(self, host, tokens):
        self.browserHostName = None
        self.workspaceUrl = host
        self.clusterId = "0601-182128-dcbte59m"
        self.workspaceId = "5555"
        self._tokens = list(tokens)
        self.reads = 0

    @property
    def apiToken(self):
        self.reads += 1
        return self._tokens[min(self.reads - 1, len(self._tokens) - 1)]


def install_dbruntime(monkeypatch, context):
    package = types.ModuleType("dbruntime")
    module = types.ModuleType("dbruntime.databricks_repl_context")
    module.get_context = lambda: context
    package.databricks_repl_context = module
    monkeypatch.setitem(sys.modules, "dbruntime", package)
    monkeypatch.setitem(sys.modules, "dbruntime.databricks_repl_context", module)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "15.4")


def test_notebook_context_beats_environment(monkeypatch, workspace):
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    monkeypatch.setenv("DATABRICKS_HOST", "https://env.example.com")
    monkeypatch.setenv("DATABRICKS_TOKEN", "env-token")
    creds = resolve_credentials()
    assert (creds.host, creds.source, creds.cluster_id, creds.workspace_id) == (
        workspace.host, "notebook context", "0601-182128-dcbte59m", "5555")


def test_notebook_token_is_read_per_request(monkeypatch, workspace):
    context = RotatingContext(workspace.host, ["first-token"])
    install_dbruntime(monkeypatch, context)
    client = Client()
    workspace.token = "first-token"
    assert client.complete("one", endpoint=CHAT, task="llm/v1/chat").text == "Echo: one"
    # the workspace rotates the short-lived token; the context hands out the new one
    workspace.token = context._tokens[0] = "second-token"
    assert client.complete("two", endpoint=CHAT, task="llm/v1/chat").text == "Echo: two"
    assert [r.authorized for r in workspace.requests] == [True, True]


def test_expired_notebook_token_is_reread_once_after_401(monkeypatch, workspace):
    # reads: one while resolving, one for the first try (expired by then), one for the retry
    context = RotatingContext(workspace.host, ["resolving", "expired", workspace.token])
    install_dbruntime(monkeypatch, context)
    completion = Client().complete("hi", endpoint=CHAT, task="chat")
    assert completion.text == "Echo: hi"
    assert [r.authorized for r in workspace.requests] == [False, True]


def test_dbutils_entry_point_on_older_runtimes(monkeypatch, workspace):
    class Option:
        def __init__(self, value):
            self.value = value

        def get(self):
            return self.value

        def isDefined(self):
            return self.value is not None

    class Context:
        def apiUrl(self):
            return Option(workspace.host)

        def apiToken(self):
            return Option(workspace.token)

        def clusterId(self):
            return Option("0101-000000-old")

        def workspaceId(self):
            return Option(None)

    dbutils = types.SimpleNamespace(notebook=types.SimpleNamespace(entry_point=types.SimpleNamespace(
        getDbutils=lambda: types.SimpleNamespace(notebook=lambda: types.SimpleNamespace(getContext=Context)))))
    monkeypatch.setattr(sys.modules["__main__"], "dbutils", dbutils, raising=False)
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "10.4")
    creds = resolve_credentials()
    assert (creds.source, creds.cluster_id, creds.workspace_id) == ("notebook context", "0101-000000-old", None)
    assert Client(credentials=creds).complete("x", endpoint=CHAT).text == "Echo: x"


@pytest.mark.parametrize("host", [
    "https://user:pw@adb-1.2.azuredatabricks.net", "http://127.0.0.1@evil.example.com", "https://x.example.com#f",
    "https://x.example.com/some/path", "https://x.example.com\\@evil.example.com", "https://x .example.com",
    "https://x.example.com/?q=1", "http://localhost.evil.example.com", "http://127.0.0.1.nip.io", "ftp://x",
    "https://x.example.com\nx", "https://x.example.com%2f@evil",
])
def test_hosts_that_url_parsers_could_read_differently_are_refused(host, workspace):
    with pytest.raises(ConfigurationError, match="The Databricks host|Refusing plain http://"):
        resolve_credentials(host, workspace.token)
    assert workspace.requests == []


def test_the_host_is_rebuilt_from_the_parse_the_connection_uses():
    assert normalize_host("https://ADB-1.2.azuredatabricks.net/?o=1234") == "https://adb-1.2.azuredatabricks.net"
    assert normalize_host("http://[::1]:8080/") == "http://[::1]:8080"


def test_plain_http_to_loopback_never_goes_through_a_proxy(workspace, monkeypatch):
    # a proxy from the environment would see the token in clear: loopback http bypasses it
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert Client(host=workspace.host, token=workspace.token).complete("x", endpoint=CHAT).text == "Echo: x"
