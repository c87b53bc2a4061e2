"""Databricks Apps: which URL a token may go to, and which login reaches an app (OAuth only).

Apps accept OAuth tokens only. `apps_login` is the one rule for how a login reaches them: inside a
notebook its token is exchanged for an OAuth one (databricks-sdk's ``PATOAuthTokenExchange``, as
its ``runtime-oauth`` does); an OAuth access token given as the token (a JWT) goes as it is; the VS
Code extension's metadata service hands out its own login's OAuth token; an SDK login must give
``oauth_token()`` (databricks_openai's own check); a personal access token never reaches an app.
`app_url_or_none` says where a token may go: https on a Databricks Apps domain, or plain http on
loopback when the workspace itself is there (the local workspace). `hint_for_app` says what an
app's failure usually means, as databricks_openai hints it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigurationError, ConnectionFailed, RequestError
from .credentials import Credentials, is_loopback, normalize_host

__all__ = ["APPS_DOMAINS", "NOTEBOOK_LOGINS", "app_url_or_none", "apps_login", "hint_for_app"]


def hint_for_app(error: RequestError, name: str) -> RequestError:
    """``error`` with what an app's failure usually means as its next step (``name``: the app's name,
    or its URL), or ``error`` itself when there is nothing to add."""
    status = getattr(error, "status", None)
    if status in (404, 405):
        hint = (f"App {name!r} does not answer POST /responses: it must serve the OpenAI Responses API (as an MLflow "
                "AgentServer does).")
    elif status == 403:
        hint = f"You need the CAN USE permission on app {name!r}: ask its owner."
    elif status == 401:
        hint = "The app refused the token: Databricks Apps accept OAuth tokens only; sign in again with OAuth."
    elif isinstance(error, ConnectionFailed):  # refused, DNS: nothing listens at its URL
        hint = (f"App {name!r} did not answer: it may be stopped or starting. Check its state (`%dbllm endpoints`) "
                "and start it in the workspace.")
    elif status is not None and status >= 500:
        hint = f"App {name!r} failed: see its logs in the workspace."
    else:
        return error
    return error.with_next_step(hint)


# where Databricks serves apps (AWS, Azure, GCP): a token goes to an app only at a URL on one of them
APPS_DOMAINS = ("databricksapps.com",)


def app_url_or_none(raw: Any, workspace_host: str) -> str | None:
    """The app URL the Apps API gave, normalized, when a token may go there: https on a Databricks
    Apps domain; plain http on loopback only when the workspace itself is on loopback (the local
    workspace). None otherwise."""
    from urllib3.util import parse_url

    if not isinstance(raw, str):
        return None
    try:
        url = normalize_host(raw.rstrip("/"))
        host = parse_url(url).host or ""
    except (ConfigurationError, ValueError):
        return None
    # an app's own name under the domain (NAME.aws.databricksapps.com), never the bare domain itself
    if url.startswith("https://") and any(host.endswith("." + d) for d in APPS_DOMAINS):
        return url
    local = parse_url(workspace_host).host or ""
    if url.startswith("http://") and is_loopback(host) and is_loopback(local):
        return url
    return None


NOTEBOOK_LOGINS = ("notebook token", "runtime")  # the notebook's own short-lived token (context or SDK runtime)
JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def apps_login(base: Credentials) -> tuple[Callable[[], Mapping[str, str]] | None, str]:
    """How a login reaches Databricks Apps, which accept OAuth tokens only: ``(header factory, how)``,
    or ``(None, what the login is)`` when it gives no OAuth token (databricks_openai's check too:
    the SDK's ``oauth_token()`` must give one). In a notebook, the notebook token is exchanged."""
    if base.auth_type in NOTEBOOK_LOGINS:  # exchanged for an OAuth token, as the SDK's runtime-oauth does
        return token_exchange(base), "the notebook token exchanged for OAuth"
    if base.auth_type == "pat":
        if JWT.fullmatch(base.token.reveal()):  # an OAuth access token given as the token (`databricks auth token`)
            return base.headers, "the OAuth access token given as the token"
        return None, "a personal access token"
    if base.auth_type == "metadata-service" and JWT.fullmatch(base.token.reveal()):
        # the VS Code extension's metadata service hands out the OAuth access token of its own login
        # (databricks-sdk's oauth_token() does not ask it), a JWT, which an app takes as it is
        return base.headers, "the VS Code extension's OAuth token"
    try:
        if base.oauth_token() is None:  # databricks-sdk raises for a login that is not OAuth (basic, Azure CLI, ...)
            return None, f"a {base.auth_type} login"
    except Exception:  # what it says may quote a secret: the auth type says enough
        return None, f"a {base.auth_type} login, which gives no OAuth token"
    return base.headers, f"its {base.auth_type} OAuth token"


def token_exchange(base: Credentials) -> Callable[[], dict[str, str]]:
    """Headers with an OAuth token for Databricks Apps, exchanged for the notebook's own token
    (RFC 8693 at ``{host}/oidc/v1/token``, databricks-sdk's ``PATOAuthTokenExchange``: what its
    ``runtime-oauth`` strategy does), refreshed before it expires."""
    from databricks.sdk.oauth import PATOAuthTokenExchange

    exchange = PATOAuthTokenExchange(get_original_token=lambda: base.token.reveal(), host=base.host, scopes="all-apis")
    return lambda: {"Authorization": "Bearer " + exchange.token().access_token}
