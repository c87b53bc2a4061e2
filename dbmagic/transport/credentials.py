"""Where the workspace host and its credentials come from: one ordered pipeline, one frozen result.

Order (the first source that gives a host and a way to authenticate wins):

1. explicit arguments: ``host=`` and ``token=``, or ``profile=`` naming a ``~/.databrickscfg`` profile;
2. the Databricks notebook context, inside a workspace (``DATABRICKS_RUNTIME_VERSION`` is set, or
   ``/databricks/DBR_VERSION`` exists on custom-container clusters): ``dbruntime``'s
   ``get_context()``, else ``dbutils``, else the runtime's own credential provider (serverless and
   standard-access clusters, through databricks-sdk). That token is short-lived, so it is re-read
   for every request. A context that cannot be read (DLT pipelines, ``Py4JSecurityException``)
   is skipped, and named in the error if nothing else works;
3. the environment: ``DATABRICKS_HOST`` and ``DATABRICKS_TOKEN``, or ``DATABRICKS_HOST`` with
   another auth type's variables (``DATABRICKS_CLIENT_ID``/``_SECRET``, ``DATABRICKS_AUTH_TYPE``,
   ``ARM_*``, ...), or a model-serving container;
4. a profile in ``~/.databrickscfg`` (or ``DATABRICKS_CONFIG_FILE``): ``DATABRICKS_CONFIG_PROFILE``,
   else ``[__settings__] default_profile``, else ``DEFAULT``. A profile has only its own keys
   (none inherited from ``[DEFAULT]``), and with ``DATABRICKS_HOST`` set only a profile for that
   host is used: a token is never sent to another workspace.

Personal access tokens are read here. Every other auth type (OAuth M2M and U2M, Azure, GCP,
GitHub OIDC, the VS Code extension's metadata service, model serving, the runtime's provider) goes
through databricks-sdk's ``Config.authenticate()``, imported only then, asked for headers on
every request (it refreshes OAuth tokens itself), and rebuilt once after a 401.

This is the only module of dbmagic that reads ``os.environ``.
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError, first_line, scrub
from .secret import Secret, reveal

__all__ = ["Credentials", "resolve_credentials", "normalize_host", "org_id_from_host", "is_loopback",
           "OTHER_VARIABLES", "DBR_VERSION_FILE"]

_log = logging.getLogger("dbmagic")

_FIX = (
    "To fix: set DATABRICKS_HOST and DATABRICKS_TOKEN, or add a profile with `host` and `token` "
    "to ~/.databrickscfg (or run `databricks auth login --host <workspace URL>`), or pass host= and "
    "token= (e.g. dbmagic.configure(host=..., token=...))."
)
# custom-container clusters have this file but no DATABRICKS_RUNTIME_VERSION
DBR_VERSION_FILE = Path("/databricks/DBR_VERSION")
# environment variables that name an auth type other than a personal access token (databricks-sdk's)
_SDK_ENV = ("DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET", "DATABRICKS_AUTH_TYPE", "DATABRICKS_METADATA_SERVICE_URL",
            "DATABRICKS_USERNAME", "DATABRICKS_PASSWORD", "ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_USE_MSI",
            "DATABRICKS_AZURE_RESOURCE_ID", "DATABRICKS_GOOGLE_SERVICE_ACCOUNT", "GOOGLE_CREDENTIALS",
            "DATABRICKS_OIDC_TOKEN_ENV", "DATABRICKS_OIDC_TOKEN_FILEPATH")
_MODEL_SERVING_ENV = ("IS_IN_DB_MODEL_SERVING_ENV", "IS_IN_DATABRICKS_MODEL_SERVING_ENV")
# every variable besides DATABRICKS_* that the pipeline reads (a test's clean environment removes them)
OTHER_VARIABLES = tuple(name for name in _SDK_ENV + _MODEL_SERVING_ENV if not name.startswith("DATABRICKS_"))
# profile keys that are secrets (scrubbed from any message) or settings that are not auth
_SECRET_KEYS = ("token", "client_secret", "password", "azure_client_secret", "google_credentials")
_NOT_AUTH_KEYS = ("host", "cluster_id", "warehouse_id", "serverless_compute_id", "jobs_api_version", "account_id",
                  "workspace_id")


@dataclass(frozen=True)
class Credentials:
    """A workspace host, how to authenticate to it, and the source they came from.

    ``headers()`` gives the auth headers for one request: a personal access token's, or freshly
    asked (the notebook context's short-lived token, databricks-sdk's OAuth tokens). Nothing here
    shows a token or secret in ``repr()``. ``skipped`` lists the sources tried before this one, and why.
    """

    host: str
    source: str
    auth_type: str = "pat"
    _token: Secret = field(default=Secret(""), repr=False)
    _header_factory: Callable[[], Mapping[str, str]] | None = field(default=None, repr=False, compare=False)
    _reauthenticate: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    workspace_id: str | None = None
    cluster_id: str | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()
    skipped: tuple[str, ...] = ()
    # what signs in (a client secret, a password): never sent as such, but scrubbed like the token
    _sign_in_secrets: tuple[Secret, ...] = field(default=(), repr=False, compare=False)
    # databricks-sdk's ``Config.oauth_token`` for an SDK login: raises where the login gives no OAuth token
    _oauth_token: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self._token, Secret):  # a plain string given: kept as a Secret all the same
            object.__setattr__(self, "_token", Secret(self._token))
        problem = _unsendable(self._token.reveal(), self.source) if self._token else None
        if problem:  # raised here, where no local holds the token (Verbose tracebacks print locals)
            raise ConfigurationError(problem)

    def headers(self) -> dict[str, str]:
        """The headers that authenticate one request (asked afresh where tokens expire)."""
        # no named local holds the token: a Verbose traceback prints every frame's locals
        if self._header_factory is None:
            return {**dict(self.extra_headers), "Authorization": "Bearer " + self._token.reveal()}
        try:
            checked = _sendable({**dict(self.extra_headers), **self._header_factory()}, self.source)
            if isinstance(checked, str):  # what is wrong; no local here holds the headers
                raise ConfigurationError(checked)
            return checked
        except ConfigurationError:
            raise
        except Exception as exc:  # the SDK, the notebook context or a token exchange failed to give a token now
            failure = scrub(first_line(exc), self._sign_in_secrets)  # it may quote a server's answer
        # raised outside the handler: no __context__ keeps the SDK's frames (and their credentials) alive
        raise ConfigurationError(
            f"Could not get a token for {self.host} from {self.source} ({self.auth_type}): "
            f"{failure}. Sign in again (e.g. `databricks auth login --host {self.host}`), "
            "or reconnect with dbmagic.configure()."
        )

    @classmethod
    def of_token(cls, host: str, token: Any, source: str, *, auth_type: str = "pat",
                 extra_headers: tuple[tuple[str, str], ...] = ()) -> Credentials:
        """Credentials that send ``token`` (a `Secret` or text) as a bearer token to ``host``: what a
        Spark task is handed by the driver, or an app's OAuth token."""
        return cls(host, source, auth_type=auth_type, _token=Secret(token), extra_headers=extra_headers)

    def oauth_token(self) -> Any:
        """databricks-sdk's OAuth token of an SDK login (``Config.oauth_token()``): it raises for a
        login that gives none (basic, Azure CLI, ...); None when the login is not the SDK's."""
        return self._oauth_token() if self._oauth_token is not None else None

    def secrets(self) -> list[Secret]:
        """The secret parts of the auth headers, and what signs in (a client secret): what every
        text from a server is scrubbed of."""
        public = {name for name, _ in self.extra_headers}
        return [Secret(v.split(" ", 1)[-1]) for k, v in self.headers().items() if k not in public and v] + list(
            self._sign_in_secrets)

    @property
    def token(self) -> Secret:
        """The bearer token the next request would carry (``.reveal()`` gives the text)."""
        return Secret(self.headers().get("Authorization", "").split(" ", 1)[-1])

    @property
    def refreshes_token(self) -> bool:
        """True when a 401 is worth one more try with credentials asked afresh."""
        return self._header_factory is not None

    def reauthenticate(self) -> None:
        """After a 401: get new credentials from the source (a new OAuth token), where it can."""
        if self._reauthenticate is not None:
            self._reauthenticate()

    def __repr__(self) -> str:
        return f"Credentials(host={self.host!r}, auth_type={self.auth_type!r}, token='***', source={self.source!r})"

    def describe(self) -> dict[str, str]:
        """What ``%dbllm whoami`` shows: host, source, auth type, token as ``***``, what was skipped."""
        info = {"host": self.host, "source": self.source, "auth type": self.auth_type, "token": "***"}
        if self.workspace_id:
            info["workspace_id"] = self.workspace_id
        if self.cluster_id:
            info["cluster_id"] = self.cluster_id
        for i, reason in enumerate(self.skipped, 1):
            info[f"skipped {i}"] = reason
        return info


def normalize_host(host: str) -> str:
    """``adb-1.azuredatabricks.net/`` -> ``https://adb-1.azuredatabricks.net``.

    Adds ``https://`` when no scheme is given; drops a trailing slash and the ``?o=<org id>`` a
    browser shows. The URL is parsed once, by the parser the HTTP library itself uses (urllib3's),
    and rebuilt from its parts, so the host checked is the host connected to. Refused: user info,
    other queries, fragments, paths, white space, backslashes and control characters, and plain
    ``http://`` unless the host is loopback (the local test workspace).
    """
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    raw = re.sub(r"/?\?o=\d+$", "", host.strip()).rstrip("/")
    if not raw:
        raise ConfigurationError("The Databricks host is empty. Set it to your workspace URL.")
    shown = raw if len(raw) <= 80 else raw[:77] + "..."
    example = "Use the workspace URL only, e.g. https://adb-1234567890123456.7.azuredatabricks.net."
    if any(c.isspace() or ord(c) < 32 or c in "\\@#?%" for c in raw) or len(raw) > 300:
        raise ConfigurationError(f"The Databricks host {shown!r} has characters a workspace URL does not "
                                 f"(user info, a query or fragment, white space, backslashes). {example}")
    if "://" not in raw:
        raw = "https://" + raw
    try:
        url = parse_url(raw)
    except LocationParseError:
        url = None
    if url is None or url.scheme not in ("https", "http") or not url.host or url.path not in (None, "", "/"):
        raise ConfigurationError(f"The Databricks host {shown!r} is not a workspace URL. {example}")
    if url.scheme == "http" and not is_loopback(url.host):
        raise ConfigurationError(
            f"Refusing plain http:// for {url.host}: the token would travel unencrypted. "
            f"Use https://{url.host} (http is allowed only for loopback test servers)."
        )
    return f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")


def is_loopback(hostname: str) -> bool:
    """The one loopback rule: ``localhost`` or a loopback address (127.0.0.0/8, ``[::1]``), where plain
    http is allowed (a test server) and no proxy is used."""
    hostname = hostname.strip("[]")
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def org_id_from_host(host: str) -> str | None:
    """The org (workspace) id some workspace URLs carry: Azure's ``adb-<id>.<n>.azuredatabricks.net``
    and GCP's ``<id>.<n>.gcp.databricks.com``."""
    match = re.match(r"https://(?:adb-(\d+)\.\d+\.azuredatabricks\.net|(\d+)\.\d+\.gcp\.databricks\.com)(?::\d+)?$",
                     host)
    return (match.group(1) or match.group(2)) if match else None


class _Environment(Mapping[str, str]):
    """The environment as the sources read it, shown as ``<environment>``: a Verbose traceback
    would otherwise print every variable, the token among them."""

    def __init__(self, variables: Mapping[str, str], runtime_marker: Path = DBR_VERSION_FILE):
        self._variables = variables
        self.runtime_marker = runtime_marker  # the file a custom-container Databricks runtime has

    def __getitem__(self, name: str) -> str:
        return self._variables[name]

    def __iter__(self) -> Any:
        return iter(self._variables)

    def __len__(self) -> int:
        return len(self._variables)

    def __repr__(self) -> str:
        return "<environment>"


class _Declined(Exception):
    """A source that could not give credentials; the message says why (for the error and whoami)."""


def resolve_credentials(
    host: str | None = None,
    token: str | None = None,
    profile: str | None = None,
    *,
    client_id: str | None = None,
    client_secret: Any = None,
    environ: Mapping[str, str] | None = None,
    runtime_marker: Path = DBR_VERSION_FILE,
) -> Credentials:
    """Find the workspace, trying each source in order; raise one error listing them all.
    ``client_id`` and ``client_secret`` (with ``host``) sign in as a service principal (OAuth M2M).
    ``environ`` and ``runtime_marker`` (the file a custom-container runtime has) are seams for tests."""
    token = Secret(token.strip() if isinstance(token, str) else reveal(token).strip()) if token else None
    env = _Environment(os.environ if environ is None else environ, runtime_marker)
    tried: list[str] = []

    # 1. explicit arguments
    if client_id or client_secret:
        found = _service_principal(host, token, client_id, client_secret)
    elif host or token:
        if not (host and token):
            missing = "token=" if host else "host="
            raise ConfigurationError(f"Pass both host= and token= (or neither); {missing} is missing. {_FIX}")
        found = Credentials(normalize_host(host), "explicit arguments", _token=token)
    elif profile:
        declined = None
        try:
            found = _from_profile(env, profile)
        except _Declined as exc:
            declined = str(exc)
        if declined is not None:  # raised outside the handler: no __context__ holds the SDK's frames
            raise ConfigurationError(f"Profile {profile!r} did not give credentials: {declined}. {_FIX}")
    else:
        tried.append("explicit arguments: none given")
        found = None
        for source in (_from_notebook, _from_environment, _from_default_profile):
            try:
                found = source(env)
            except _Declined as exc:
                tried.append(str(exc))
                continue
            if found is not None:
                break
        if found is None:
            lines = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
            raise ConfigurationError(f"No Databricks credentials found. Tried, in order:\n{lines}\n{_FIX}")
    credentials = _with_environment_extras(found, env, tuple(tried[1:]))
    _log.debug("credentials: %s for %s (%s)%s", credentials.source, credentials.host, credentials.auth_type,
               "; skipped: " + "; ".join(credentials.skipped) if credentials.skipped else "")
    return credentials


def _service_principal(host: str | None, token: Any, client_id: str | None, client_secret: Any) -> Credentials:
    """A service principal given in code: ``host``, ``client_id`` and ``client_secret`` (OAuth M2M,
    through databricks-sdk, which refreshes its tokens)."""
    if token:
        raise ConfigurationError("Give a token or a service principal's client_id= and client_secret=, not both.")
    missing = [name for name, value in (("host=", host), ("client_id=", client_id), ("client_secret=", client_secret))
               if not value]
    if missing:
        raise ConfigurationError(f"A service principal signs in with host=, client_id= and client_secret=; "
                                 f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing.")
    secret = Secret(client_secret)
    declined = None
    try:
        return _sdk("explicit arguments (service principal)", normalize_host(host),
                    {"client_id": client_id, "client_secret": secret.reveal(), "auth_type": "oauth-m2m"}, [secret])
    except _Declined as exc:
        declined = str(exc)
    raise ConfigurationError(f"The service principal {client_id!r} could not sign in: {declined}. Check its client "
                             "id and secret (an OAuth secret of the service principal, in the workspace or the "
                             "account console).")


def _with_environment_extras(found: Credentials, env: Mapping[str, str], skipped: tuple[str, ...]) -> Credentials:
    """Cluster and workspace ids from the environment (the VS Code extension, Databricks Connect)."""
    cluster_id = found.cluster_id or env.get("DATABRICKS_CLUSTER_ID", "").strip() or None
    workspace_id = env.get("DATABRICKS_WORKSPACE_ID", "").strip()
    extra = found.extra_headers + ((("X-Databricks-Workspace-Id", workspace_id),) if workspace_id else ())
    return replace(found, cluster_id=cluster_id, workspace_id=found.workspace_id or workspace_id or None,
                   extra_headers=extra, skipped=skipped)


# -- 2. the notebook context ------------------------------------------------------------------------

def _from_notebook(env: Mapping[str, str]) -> Credentials | None:
    if not env.get("DATABRICKS_RUNTIME_VERSION") and not env.runtime_marker.exists():
        raise _Declined("notebook context: not in a Databricks runtime (no DATABRICKS_RUNTIME_VERSION, "
                        f"no {env.runtime_marker})")
    reasons = []
    for read in (_from_repl_context, _from_dbutils):
        try:
            found = read()
        except Exception as exc:  # DLT, Py4JSecurityException on standard access, an old runtime ...
            reasons.append(f"{read.__doc__} raised {exc.__class__.__name__}")
            continue
        if found is not None:
            return found
        reasons.append(f"{read.__doc__} gave no host and token")
    try:  # serverless and standard access: the runtime's own provider
        return _sdk("notebook runtime", None, {"auth_type": "runtime"}, ())
    except _Declined as exc:
        reasons.append(str(exc))
    raise _Declined("notebook context: " + "; ".join(reasons))


def _from_repl_context() -> Credentials | None:
    """dbruntime's get_context()"""
    try:
        from dbruntime.databricks_repl_context import get_context  # type: ignore[import-not-found]
    except ImportError:
        return None
    ctx = get_context()
    host = getattr(ctx, "workspaceUrl", None) or getattr(ctx, "browserHostName", None)
    if not (host and getattr(ctx, "apiToken", None)):
        return None
    return Credentials(
        normalize_host(host), "notebook context", auth_type="notebook token",
        _header_factory=lambda: {"Authorization": f"Bearer {get_context().apiToken}"},
        workspace_id=_str_or_none(getattr(ctx, "workspaceId", None)),
        cluster_id=_str_or_none(getattr(ctx, "clusterId", None)),
    )


def _from_dbutils() -> Credentials | None:
    """dbutils' notebook context"""
    dbutils = getattr(sys.modules.get("__main__"), "dbutils", None)
    if dbutils is None:
        return None

    def context() -> Any:
        return dbutils.notebook.entry_point.getDbutils().notebook().getContext()

    ctx = context()
    return Credentials(
        normalize_host(ctx.apiUrl().get()), "notebook context", auth_type="notebook token",
        _header_factory=lambda: {"Authorization": f"Bearer {context().apiToken().get()}"},
        workspace_id=_option(ctx, "workspaceId"),
        cluster_id=_option(ctx, "clusterId"),
    )


# -- 3. the environment -----------------------------------------------------------------------------

def _from_environment(env: Mapping[str, str]) -> Credentials | None:
    # a token pasted with a trailing newline would make an invalid header
    host, token = env.get("DATABRICKS_HOST", "").strip(), Secret(env.get("DATABRICKS_TOKEN", "").strip())
    auth_type = env.get("DATABRICKS_AUTH_TYPE", "").strip()
    model_serving = any(env.get(name, "").lower() == "true" for name in _MODEL_SERVING_ENV)
    if host and token and auth_type in ("", "pat"):
        return Credentials(normalize_host(host), "environment", _token=token)
    others = [name for name in _SDK_ENV if env.get(name)]
    if (host and others) or model_serving:
        # the SDK reads the variables itself; no profile file, so no key of another workspace's
        # profile is mixed in
        secrets = [Secret(env[name]) for name in ("DATABRICKS_CLIENT_SECRET", "ARM_CLIENT_SECRET", "DATABRICKS_PASSWORD")
                   if env.get(name)]
        return _sdk("environment", normalize_host(host) if host else None, {"config_file": os.devnull}, secrets,
                    environ=env)
    if host:  # the profile step looks for a profile of this host
        raise _Declined("environment: DATABRICKS_HOST without DATABRICKS_TOKEN or another auth type's variables")
    missing = " and ".join(n for n, v in (("DATABRICKS_HOST", host), ("DATABRICKS_TOKEN", token)) if not v)
    raise _Declined(f"environment: {missing} not set")


# -- 4. the profile file ----------------------------------------------------------------------------

def _profiles(env: Mapping[str, str]) -> tuple[Path, dict[str, dict[str, str]], str | None]:
    """``(path, {profile: its own keys}, [__settings__] default_profile)``.

    configparser would merge ``[DEFAULT]`` into every section; read with another default section
    name, ``[DEFAULT]`` is a profile like the others and nothing is inherited (as databricks-sdk reads it).
    """
    path = Path(env.get("DATABRICKS_CONFIG_FILE") or Path.home() / ".databrickscfg").expanduser()
    if not path.is_file():
        raise _Declined(f"profile file {path}: not found")
    parser = configparser.ConfigParser(interpolation=None, default_section="\x00no inheritance")
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise _Declined(f"profile file {path}: unreadable ({exc.__class__.__name__})") from None
    sections = {name: {k: Secret(v.strip()) if k in _SECRET_KEYS else v.strip() for k, v in parser.items(name)}
                for name in parser.sections()}
    default = sections.pop("__settings__", {}).get("default_profile")
    return path, sections, default


def _from_default_profile(env: Mapping[str, str]) -> Credentials | None:
    return _from_profile(env, None)


def _from_profile(env: Mapping[str, str], name: str | None) -> Credentials:
    path, sections, settings_default = _profiles(env)
    wanted = name or env.get("DATABRICKS_CONFIG_PROFILE") or None
    env_host = env.get("DATABRICKS_HOST", "").strip()
    if env_host and name is None:
        host = normalize_host(env_host)
        matching = [p for p, keys in sections.items() if keys.get("host") and _same_host(keys["host"], host)]
        if wanted is None:
            preferred = settings_default or "DEFAULT"
            wanted = preferred if preferred in matching else (matching[0] if matching else None)
        if wanted is None or wanted not in matching:
            hosts = ", ".join(f"{p} is for {keys.get('host') or 'no host'}" for p, keys in sections.items()) or "none"
            raise ConfigurationError(
                f"DATABRICKS_HOST is {host} but DATABRICKS_TOKEN is not set, and "
                + (f"profile {wanted} in {path} is not for that host" if wanted else f"no profile in {path} is")
                + f" (profiles: {hosts}). dbmagic never sends one workspace's credentials to another: set "
                "DATABRICKS_TOKEN, or DATABRICKS_CONFIG_PROFILE to a profile whose host is DATABRICKS_HOST, "
                "or unset DATABRICKS_HOST to use a profile's own host."
            )
    wanted = wanted or settings_default or "DEFAULT"
    keys = sections.get(wanted)
    source = f"profile {wanted} ({path})"
    if keys is None:
        raise _Declined(f"profile {wanted} in {path}: no such profile")
    if not keys.get("host"):
        raise _Declined(f"profile {wanted} in {path}: no host")
    host = normalize_host(keys["host"])
    auth_type = keys.get("auth_type", "")
    if keys.get("token") and auth_type in ("", "pat"):
        return Credentials(host, source, _token=keys["token"], cluster_id=keys.get("cluster_id") or None)
    if not auth_type and not (set(keys) - set(_NOT_AUTH_KEYS)):
        raise _Declined(f"profile {wanted} in {path}: a host without credentials (add a `token`, or run "
                        f"`databricks auth login --host {host} --profile {wanted}`)")
    secrets = [keys[k] for k in _SECRET_KEYS if keys.get(k)]
    return _sdk(source, host, {"profile": wanted, "config_file": str(path)}, secrets)


def _same_host(a: str, b: str) -> bool:
    try:
        return normalize_host(a).lower() == normalize_host(b).lower()
    except ConfigurationError:
        return False


# -- every other auth type: databricks-sdk --------------------------------------------------------------

def _sdk(source: str, host: str | None, options: dict[str, Any], secrets: list[Secret] | tuple[Secret, ...],
         environ: Mapping[str, str] | None = None) -> Credentials:
    """Credentials from databricks-sdk's ``Config`` (imported only here).

    The SDK on its own merges every ``DATABRICKS_*`` variable over a profile's keys, so a profile
    could sign in with another workspace's client secret. Here each path gives it one source only:
    a profile's own keys (the environment not read), or, with ``environ``, the environment's
    variables handed over explicitly (no profile file read).
    """
    try:
        from databricks.sdk.config import Config
    except ImportError:
        raise _Declined(f"{source}: needs databricks-sdk for its auth type (pip install databricks-sdk)") from None
    if environ is not None:
        given = {a.name: environ[a.env] for a in Config.attributes()
                 if a.env and environ.get(a.env) and a.name not in ("host", "profile", "config_file")}
        options = {**given, **options}
    isolated = _isolated(Config)

    def build() -> Any:
        failure = None
        try:
            # bounded: the SDK's own default waits minutes for a host that does not answer
            config = isolated(host=host, retry_timeout_seconds=30, http_timeout_seconds=10, **options)
            config.authenticate()  # fail here, with the source named, rather than at the first request
        except Exception as exc:
            failure = f"{source}: {scrub(first_line(exc), secrets)}"
        if failure is not None:  # raised outside the handler: no __context__ holds the SDK's credentials
            raise _Declined(failure)
        return config

    config = build()
    if not config.host:
        raise _Declined(f"{source}: databricks-sdk found no workspace host")
    box = [config]
    lock = threading.Lock()

    def reauthenticate() -> None:
        failure = None
        try:
            fresh = build()
        except _Declined as exc:
            failure = str(exc)
        if failure is not None:
            raise ConfigurationError(f"Could not sign in again: {failure}. {_FIX}")
        with lock:
            box[0] = fresh

    return Credentials(
        normalize_host(config.host), source, auth_type=config.auth_type or "unknown",
        _header_factory=lambda: box[0].authenticate(), _reauthenticate=reauthenticate,
        _sign_in_secrets=tuple(secrets), _oauth_token=lambda: box[0].oauth_token(),
        workspace_id=_str_or_none(getattr(config, "workspace_id", None)),
        cluster_id=_str_or_none(getattr(config, "cluster_id", None)),
    )


_ISOLATED: dict[type, type] = {}


def _isolated(config: type) -> type:
    """databricks-sdk's ``Config`` that does not fill its attributes from ``os.environ`` (they come
    from the keyword arguments and the profile only)."""
    if config not in _ISOLATED:
        if not callable(getattr(config, "_load_from_env", None)):  # an SDK we do not know: refuse to mix
            raise _Declined("this databricks-sdk cannot be kept from reading DATABRICKS_* variables; "
                            "pip install -U databricks-sdk")

        class IsolatedConfig(config):  # type: ignore[misc, valid-type]
            _attributes = list(config.attributes())  # the SDK lists a class's own attributes only

            def _load_from_env(self) -> None:
                return None

        _ISOLATED[config] = IsolatedConfig
    return _ISOLATED[config]


def _unsendable(text: str, source: str, header: str = "Authorization") -> str | None:
    """Why a token (or a header value) cannot go in an HTTP header, naming what is wrong and where
    but never the value (requests' own error would quote the header); None when it can."""
    if text.isascii() and text.isprintable():  # the usual case, checked at C speed on every request
        return None
    for position, char in enumerate(text):
        if char in "\r\n":
            problem = "a line break"
        elif not (" " <= char <= "~"):
            problem = "a character that is not plain ASCII" if ord(char) > 127 else "a control character"
        else:
            continue
        return (f"The {'token' if header == 'Authorization' else header + ' header'} from {source} contains "
                f"{problem} (at character {position + 1}), which an HTTP header cannot carry. Copy the token "
                "again, without it, and reconnect with dbmagic.configure().")
    return None


def _sendable(headers: dict[str, str], source: str) -> dict[str, str] | str:
    """``headers``, or why one of them cannot be sent (see `_unsendable`)."""
    for name, value in headers.items():
        problem = _unsendable(str(value), source, name)
        if problem:
            return problem
    return headers


def _option(ctx: Any, name: str) -> str | None:
    """Unwrap a Scala Option from the dbutils context, or None."""
    try:
        value = getattr(ctx, name)()
        return str(value.get()) if value.isDefined() else None
    except Exception:  # an old runtime without this field: the id is optional
        return None


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None
