"""Where the workspace host and token come from: one ordered pipeline, one frozen result.

Order (the first source that yields both a host and a token wins):

1. explicit arguments: ``host=`` and ``token=``, or ``profile=`` naming a ``~/.databrickscfg`` profile;
2. the Databricks notebook context, when running inside a workspace
   (``DATABRICKS_RUNTIME_VERSION`` is set): ``dbruntime``'s ``get_context()``, else ``dbutils``;
   that token is short-lived, so it is re-read on every request;
3. the environment: ``DATABRICKS_HOST`` and ``DATABRICKS_TOKEN``;
4. a profile in ``~/.databrickscfg`` (or ``DATABRICKS_CONFIG_FILE``): ``DATABRICKS_CONFIG_PROFILE``,
   else ``[__settings__] default_profile``, else ``DEFAULT``.

This is the only module of dbmagic that reads ``os.environ``.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigurationError

__all__ = ["Credentials", "resolve_credentials", "normalize_host"]

_FIX = (
    "To fix: set DATABRICKS_HOST and DATABRICKS_TOKEN, or add a profile with `host` and `token` "
    "to ~/.databrickscfg, or pass host= and token= (e.g. dbmagic.configure(host=..., token=...))."
)


@dataclass(frozen=True)
class Credentials:
    """A workspace host, a way to get its token, and the source they came from.

    The token never shows in ``repr()``; for the notebook context it is not even stored, but read
    afresh from the context for each request (it is short-lived).
    """

    host: str
    source: str
    _token: str = field(default="", repr=False)
    _token_reader: Callable[[], str] | None = field(default=None, repr=False, compare=False)
    workspace_id: str | None = None
    cluster_id: str | None = None

    @property
    def token(self) -> str:
        """The token to send now (re-read from the notebook context when that is the source)."""
        if self._token_reader is not None:
            return self._token_reader()
        return self._token

    @property
    def refreshes_token(self) -> bool:
        """True when the token is re-read per request (worth one retry after a 401)."""
        return self._token_reader is not None

    def __repr__(self) -> str:
        return f"Credentials(host={self.host!r}, token='***', source={self.source!r})"

    def describe(self) -> dict[str, str]:
        """What ``%dbllm whoami`` shows: host, source, token as ``***``."""
        info = {"host": self.host, "source": self.source, "token": "***"}
        if self.workspace_id:
            info["workspace_id"] = self.workspace_id
        if self.cluster_id:
            info["cluster_id"] = self.cluster_id
        return info


def normalize_host(host: str) -> str:
    """``adb-1.azuredatabricks.net/`` -> ``https://adb-1.azuredatabricks.net``.

    Adds ``https://`` when no scheme is given and strips trailing slashes. Plain ``http://`` is
    refused unless the host is loopback (the local test workspace).
    """
    host = host.strip()
    if not host:
        raise ConfigurationError("The Databricks host is empty. Set it to your workspace URL.")
    if "://" not in host:
        host = "https://" + host
    host = host.rstrip("/")
    parts = urlsplit(host)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigurationError(
            f"The Databricks host {host!r} is not a URL. Use the workspace URL, "
            "e.g. https://adb-1234567890123456.7.azuredatabricks.net."
        )
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise ConfigurationError(
            f"Refusing plain http:// for {parts.hostname}: the token would travel unencrypted. "
            f"Use https://{host[len('http://'):]} (http is allowed only for loopback test servers)."
        )
    return host


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def org_id_from_host(host: str) -> str | None:
    """Azure workspace URLs carry the org id: ``adb-<org id>.<n>.azuredatabricks.net``."""
    match = re.match(r"https://adb-(\d+)\.", host)
    return match.group(1) if match else None


def resolve_credentials(
    host: str | None = None,
    token: str | None = None,
    profile: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """Find the workspace, trying each source in order; raise one error listing them all."""
    env = os.environ if environ is None else environ
    tried: list[str] = []

    # 1. explicit arguments
    if host or token:
        if not (host and token):
            missing = "token=" if host else "host="
            raise ConfigurationError(
                f"Pass both host= and token= (or neither); {missing} is missing. {_FIX}"
            )
        return Credentials(normalize_host(host), "explicit arguments", _token=token.strip())
    if profile:
        found = _from_profile(env, profile, tried)
        if found:
            return found
        raise ConfigurationError(f"Profile {profile!r} did not give a host and a token: {tried[-1]}. {_FIX}")
    tried.append("explicit arguments: none given")

    # 2. the notebook context
    found = _from_notebook(env, tried)
    if found:
        return found

    # 3. the environment
    # a token pasted with a trailing newline would make an invalid header
    env_host, env_token = env.get("DATABRICKS_HOST", "").strip(), env.get("DATABRICKS_TOKEN", "").strip()
    if env_host and env_token:
        return Credentials(normalize_host(env_host), "environment", _token=env_token)
    missing = [n for n, v in (("DATABRICKS_HOST", env_host), ("DATABRICKS_TOKEN", env_token)) if not v]
    tried.append("environment: " + " and ".join(missing) + " not set")

    # 4. the profile file
    found = _from_profile(env, None, tried)
    if found:
        return found

    lines = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
    raise ConfigurationError(f"No Databricks credentials found. Tried, in order:\n{lines}\n{_FIX}")


def _from_notebook(env: Mapping[str, str], tried: list[str]) -> Credentials | None:
    if not env.get("DATABRICKS_RUNTIME_VERSION"):
        tried.append("notebook context: not in a Databricks notebook (DATABRICKS_RUNTIME_VERSION not set)")
        return None
    try:
        from dbruntime.databricks_repl_context import get_context  # type: ignore[import-not-found]
    except ImportError:
        get_context = None
    if get_context is not None:
        ctx = get_context()
        host = getattr(ctx, "workspaceUrl", None) or getattr(ctx, "browserHostName", None)
        if host and getattr(ctx, "apiToken", None):
            return Credentials(
                normalize_host(host),
                "notebook context",
                _token_reader=lambda: get_context().apiToken,
                workspace_id=_str_or_none(getattr(ctx, "workspaceId", None)),
                cluster_id=_str_or_none(getattr(ctx, "clusterId", None)),
            )
    dbutils = getattr(sys.modules.get("__main__"), "dbutils", None)
    if dbutils is not None:
        def context() -> Any:
            return dbutils.notebook.entry_point.getDbutils().notebook().getContext()

        ctx = context()
        host = ctx.apiUrl().get()
        return Credentials(
            normalize_host(host),
            "notebook context",
            _token_reader=lambda: context().apiToken().get(),
            workspace_id=_option(ctx, "workspaceId"),
            cluster_id=_option(ctx, "clusterId"),
        )
    tried.append("notebook context: neither dbruntime's get_context() nor dbutils gave a host and token")
    return None


def _from_profile(env: Mapping[str, str], profile: str | None, tried: list[str]) -> Credentials | None:
    path = Path(env.get("DATABRICKS_CONFIG_FILE") or Path.home() / ".databrickscfg").expanduser()
    if not path.is_file():
        tried.append(f"profile file {path}: not found")
        return None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        tried.append(f"profile file {path}: unreadable ({exc.__class__.__name__})")
        return None
    name = profile or env.get("DATABRICKS_CONFIG_PROFILE")
    if not name and parser.has_section("__settings__"):
        name = parser.get("__settings__", "default_profile", fallback=None)
    name = name or "DEFAULT"
    section = parser.defaults() if name == "DEFAULT" else (parser[name] if parser.has_section(name) else None)
    if section is None:
        tried.append(f"profile {name} in {path}: no such profile")
        return None
    host, token = section.get("host", ""), section.get("token", "")
    if host and token:
        return Credentials(normalize_host(host), f"profile {name} ({path})", _token=token)
    if not token and section.get("client_id"):
        tried.append(
            f"profile {name} in {path}: uses OAuth (client_id), which dbmagic does not read yet; "
            "add a `token` to the profile"
        )
    else:
        missing = " and ".join(k for k, v in (("host", host), ("token", token)) if not v)
        tried.append(f"profile {name} in {path}: no {missing}")
    return None


def _option(ctx: Any, name: str) -> str | None:
    """Unwrap a Scala Option from the dbutils context, or None."""
    try:
        value = getattr(ctx, name)()
        return str(value.get()) if value.isDefined() else None
    except Exception:  # an old runtime without this field: the id is optional
        return None


def _str_or_none(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None
