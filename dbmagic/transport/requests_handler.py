"""The real handler: one ``requests.Session`` behind `dbmagic.transport.http.Transport`.

The one module that knows requests and urllib3: how to send, how their failures map to a
`TransportFailure` kind, and how to read a body as it arrives.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import requests
import requests.auth
import urllib3
from requests.adapters import HTTPAdapter

from .http import HttpRequest, Response, TransportFailure, clean_interrupt, read_all

__all__ = ["RequestsHandler"]

# plain http is allowed for loopback only, which no proxy should see: the token would cross it in clear
# (None wins over the *_PROXY variables requests would otherwise merge in, ALL_PROXY's "all" included)
_NO_PROXY = {"http": None, "https": None, "all": None}


class RequestsHandler:
    """Sends each `HttpRequest` over one ``requests.Session`` (a pool sized for batch concurrency),
    never following a redirect (the token must not reach another host).

    The environment's proxy and CA settings (``HTTPS_PROXY``, ``NO_PROXY``, ``REQUESTS_CA_BUNDLE``,
    ``CURL_CA_BUNDLE``) are read once per host, the first time it is asked, as httpx reads them
    when a client is made, rather than on every request as requests does (scanning ``os.environ``
    twice a request, the largest cost of a call after the network's); ``dbmagic.configure()``
    makes a new client, which reads them again. A session passed in is used as it is."""

    def __init__(self, session: requests.Session | None = None, pool_size: int = 16):
        self.pool_size = 0
        self._per_host: dict[str, dict[str, Any]] | None = None
        if session is None:
            session = requests.Session()
            session.trust_env = False  # the environment is read per host, below (and ~/.netrc never)
            self._per_host = {}
            self._mount(session, pool_size)
        session.headers["User-Agent"] = f"dbmagic/{_version()} {session.headers.get('User-Agent', '')}".strip()
        self.session = session

    def _settings(self, url: str) -> dict[str, Any]:
        """``proxies`` and ``verify`` for ``url``'s host."""
        plain = url.startswith("http://")
        if self._per_host is None:  # the caller's session: requests merges the environment itself
            return {"proxies": _NO_PROXY if plain else None}
        origin = url.split("/", 3)[2]
        found = self._per_host.get(origin)
        if found is None:
            found = self._per_host[origin] = {
                "proxies": _NO_PROXY if plain else requests.utils.get_environ_proxies(url),
                "verify": os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True}
        return found

    def handle_request(self, request: HttpRequest) -> Response:
        interrupted = False
        try:
            response = self.session.request(
                request.method,
                request.url,
                json=request.json,
                auth=_Signed(request),  # an auth object, so a ~/.netrc entry cannot replace it
                stream=True,  # the body is read by dbmagic: its size and the call's deadline bound it
                timeout=request.timeout,
                allow_redirects=False,  # never carry the token to another host
                **self._settings(request.url),
            )
        except requests.RequestException as exc:
            failure = _failure(exc)
        except KeyboardInterrupt:
            interrupted = True
        else:
            return Response(response.status_code, response.headers, _RequestsBody(response))  # case-insensitive
        if interrupted:
            raise clean_interrupt()
        raise failure

    def ensure_pool(self, size: int) -> None:
        if self.pool_size and size > self.pool_size:
            self._mount(self.session, size)

    def _mount(self, session: requests.Session, size: int) -> None:
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=size, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self.pool_size = size

    def close(self) -> None:
        self.session.close()


def _failure(exc: requests.RequestException) -> TransportFailure:
    name = exc.__class__.__name__
    if isinstance(exc, requests.ReadTimeout):
        return TransportFailure("read_timeout", name)
    if isinstance(exc, requests.exceptions.SSLError):
        return TransportFailure("tls", name)
    if isinstance(exc, requests.ConnectTimeout):
        return TransportFailure("connect_timeout", name)
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return TransportFailure("cut", name)
    return TransportFailure("connect" if _never_sent(exc) else "dropped", name)


def _never_sent(error: Exception) -> bool:
    """True for failures before the request left: the connection was not made (refused, DNS)."""
    if not isinstance(error, requests.ConnectionError):
        return False
    reason = error.args[0] if error.args else None
    reason = getattr(reason, "reason", reason)  # requests wraps urllib3's MaxRetryError(reason=...)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


class _RequestsBody:
    """A `dbmagic.transport.http.Body` over a requests response: the one place that knows urllib3's streaming internals."""

    def __init__(self, response: requests.Response):
        self._response = response

    def read(self, size: int = 65536, deadline: float | None = None) -> bytes:
        raw = self._response.raw
        if raw is None:
            raise ConnectionError("the body was closed")
        waited = None
        if deadline is not None:  # however the bytes trickle in, the call's deadline holds
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the call's timeout passed")
            waited = self._sock()
            if waited is not None:
                waited.settimeout(min(left, waited.gettimeout() or left))
        failure: BaseException
        try:
            # read1, not iter_content: the latter waits for a full buffer on close-delimited bodies;
            # decoded (gzip), at most `size` bytes a read however much a compressed chunk expands
            return raw.read1(size, decode_content=True)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline is not None and time.monotonic() >= deadline:
                failure = TimeoutError("the call's timeout passed")
            elif "IncompleteRead" in repr(exc):  # a Content-Length or chunk the connection closed before
                failure = ConnectionError("the body ended before its length (IncompleteRead)")
            else:
                failure = ConnectionError(exc.__class__.__name__)
        except KeyboardInterrupt:
            failure = clean_interrupt()
        # raised here, outside the handler: no __context__ keeps urllib3's frames (and the connection's
        # socket) alive in a row's kept error; the broken connection is closed now
        del raw
        self.abort()
        self.close()
        raise failure

    def read_all(self, limit: int | None = None, deadline: float | None = None) -> bytes:
        return read_all(self, limit, deadline)

    def _sock(self) -> Any:
        return getattr(getattr(self._response.raw, "connection", None), "sock", None)

    def abort(self) -> None:
        sock = self._sock()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already closed
                pass

    def close(self) -> None:
        # and let go of it: a Call kept in a result (or a traceback's frames) must not keep the connection
        response, self._response = self._response, _CLOSED
        response.close()


class _Closed:
    """What a body reads once closed: nothing."""

    raw = None
    content = b""

    def close(self) -> None:
        pass


_CLOSED: Any = _Closed()


class _Signed(requests.auth.AuthBase):
    """Asks the request for its credential headers as it is built (tokens expire), so no frame of
    the retry loop holds the token as a local."""

    def __init__(self, request: HttpRequest):
        self._sign = request.sign

    def __call__(self, prepared: requests.PreparedRequest) -> requests.PreparedRequest:
        prepared.headers.update(self._sign())
        return prepared

    def __repr__(self) -> str:
        return "_Signed('***')"


def _version() -> str:
    from .._version import version

    return version()
