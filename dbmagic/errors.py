"""Everything dbmagic raises, and the one table that maps HTTP answers to it.

::

    DbMagicError                     base of every dbmagic error
    ├── ConfigurationError           no credentials, a refused host, a bad option
    │   ├── SettingError             an option's value is refused (the same words from every front end)
    │   ├── TemplateError            the prompt template names something undefined, or is not Jinja2
    │   ├── AttachmentError          an image or document that cannot be sent (unreadable, too large)
    │   └── MissingValue             a batch row's template value is missing: the row was not sent
    ├── NotSent                      a batch row that was not sent: ``.reason`` says why (interrupted, budget)
    ├── Interrupted                  a batch row stopped while its answer was on its way (the text that came is kept)
    ├── TransformError               a transform_input/transform_output raised or returned the wrong type
    ├── FormatError                  the answer cannot be shown in the format asked for (-f json)
    ├── SchemaError                  the answer does not fit the schema asked for: ``.text`` keeps it
    └── RequestError                 the workspace answered with an error, or did not answer
        ├── StatusError              an answer that is an error: ``.status``, ``.error_code``, ``.request_id``
        │   ├── BadRequest           400: the request body was refused
        │   ├── AuthenticationError  401: missing, wrong or expired token
        │   ├── PermissionDenied     403: no CAN_QUERY on the endpoint
        │   ├── EndpointNotFound     404: no such serving endpoint or proxy app
        │   ├── RateLimited          429: too many requests (retried, bounded)
        │   ├── EndpointTimeout      408, 504 or DEADLINE_EXCEEDED: the endpoint ran out of time
        │   └── ServerError          other 5xx: the endpoint failed (only a 503 is retried)
        ├── TransportError           no answer (or no whole one): ``.sent`` says whether it may have run
        │   ├── ConnectionFailed     the host could not be reached, or the connection dropped
        │   ├── RequestTimeout       no answer within the read timeout
        │   └── AnswerCut            the answer's body ended early; ``.partial`` keeps what arrived
        │       └── StreamInterrupted  a streamed answer stopped before its end
        └── BadResponse              an answer dbmagic cannot read

Every message says what happened, carries the server's own words, and ends with the next step.
No message ever contains the token: `RequestError` scrubs the secrets it is given.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .transport.secret import reveal

__all__: list[str] = []  # every error class, filled in below from the classes themselves (listed once)


class DbMagicError(Exception):
    """Base class of every error dbmagic raises."""


class ConfigurationError(DbMagicError):
    """Credentials could not be found, a host was refused, or an option is invalid."""


class SettingError(ConfigurationError):
    """A value that an option does not take; the message names the option and what it takes."""


class TemplateError(ConfigurationError):
    """A prompt template names something undefined, or is not valid Jinja2."""


class AttachmentError(ConfigurationError):
    """An image or document that cannot be sent: unreadable, not an image or PDF, too large to fit."""


class MissingValue(ConfigurationError):
    """A batch row whose template value is missing (None, NaN, NA): it was not sent (``send_missing``)."""


class NotSent(DbMagicError):
    """A batch row that was not sent. ``reason``: ``interrupted`` (Ctrl-C), ``cancelled`` (a
    background batch's ``cancel()``) or ``budget`` (the batch's budget was reached). (A row with a
    missing value is a `MissingValue`, one after a refused token an `AuthenticationError`, one after
    a rate limit that resets only in an hour a `RateLimited`.) ``resume=`` sends it."""

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class Interrupted(DbMagicError):
    """A batch row whose answer was on its way when the batch stopped: the row keeps what arrived
    (a partial `Completion` whose ``error`` this is); ``resume=`` sends it again."""


class FormatError(DbMagicError):
    """The answer cannot be shown in the requested format (e.g. ``json`` that does not parse)."""


class SchemaError(DbMagicError):
    """An answer that holds no JSON, or JSON that does not fit the schema asked for (``--schema``).

    ``.text`` is the answer's raw text (kept: nothing is lost), ``.field`` the path of the first
    field that failed (``score``, ``tags[1]``; None when no JSON was found), ``.problem`` what was
    wrong with it, and ``.completion`` the `Completion` of the answer (its usage, latency, raw),
    when there was one. ``.attempts`` counts the answers asked for (``--schema-retries``).
    """

    def __init__(self, message: str, *, text: str = "", field: str | None = None, problem: str = "",
                 attempts: int = 1):
        super().__init__(message)
        self.text = text
        self.field = field
        self.problem = problem
        self.attempts = attempts
        self.completion: Any = None


class TransformError(DbMagicError):
    """A user transform raised, or returned something dbmagic cannot use.

    ``.transform`` is the transform's name; the user's own exception is the ``__cause__``.
    """

    def __init__(self, message: str, *, transform: str = ""):
        super().__init__(message)
        self.transform = transform


class RequestError(DbMagicError):
    """The workspace answered with an error, or did not answer.

    Attributes: ``status`` (HTTP status or None), ``error_code`` (Databricks ``error_code``),
    ``server_message`` (the server's own words), ``target`` (endpoint or proxy app),
    ``request_id`` (when the server sent one), ``retry_after`` (seconds, for 429/503).
    """

    next_step = "Check the endpoint name and the workspace, then run the cell again."

    def __init__(
        self,
        what: str,
        *,
        target: str = "",
        status: int | None = None,
        error_code: str | None = None,
        server_message: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        next_step: str | None = None,
        secrets: Iterable[str] = (),
    ):
        self.target = target
        self.status = status
        self.error_code = scrub(error_code, secrets)[:200] if error_code else error_code
        self.request_id = scrub(request_id, secrets)[:200] if request_id else request_id
        self.retry_after = retry_after
        if next_step is not None:
            self.next_step = next_step
        self.server_message = scrub(server_message, secrets) if server_message else server_message
        self.what = scrub(what, secrets)
        self.attempts = 1
        super().__init__(self._compose())

    def with_next_step(self, next_step: str) -> RequestError:
        """This error with another next step: a new error, made whole before it is raised (what
        an app's failure usually means, added to the transport's error)."""
        made = copy.copy(self)
        made.next_step = next_step
        made.args = (made._compose(),)
        return made

    def gave_up_after(self, attempts: int) -> RequestError:
        """Note in the message that this was the last of ``attempts`` tries."""
        self.attempts = attempts
        self.args = (self._compose(),)
        return self

    def _compose(self) -> str:
        head = self.what
        code = self.error_code if self.error_code != str(self.status) else None
        detail = " ".join(p for p in (str(self.status or ""), code or "") if p)
        if self.server_message:
            detail = f"{detail}: {self.server_message}" if detail else self.server_message
        if detail:
            head = f"{head} ({detail})"
        if self.request_id:
            head = f"{head} [request id {self.request_id}]"
        if self.attempts > 1:
            head = f"{head}, gave up after {self.attempts} attempts"
        if len(head) > 1200:  # bounded, whatever the server or a name put in it
            head = head[:1197] + "..."
        return f"{head}. {self.next_step}"


class StatusError(RequestError):
    """The workspace answered, with an error status: ``.status``, ``.error_code`` (Databricks'),
    ``.server_message`` and ``.request_id`` say what it said. The request reached the endpoint."""


class BadRequest(StatusError):
    next_step = "Fix the parameters named in the message (see the request with --dry-run)."


class AuthenticationError(StatusError):
    next_step = (
        "The token is missing, wrong or expired: set DATABRICKS_TOKEN (or the profile's token) "
        "to a valid personal access token and reconnect with dbmagic.configure()."
    )


class PermissionDenied(StatusError):
    next_step = "Ask the endpoint's owner for CAN_QUERY permission, or use another endpoint."


class EndpointNotFound(StatusError):
    next_step = "List the endpoints you can query with `%dbllm endpoints` or Client().endpoints()."


# the limits Databricks names in a 429 (Foundation Model APIs, AI Gateway): what a message says -> (window, name)
_LIMITS = ((re.compile(r"tokens per second", re.I), 1.0, "tokens per second"),  # the local workspace's quick stand-in
           (re.compile(r"\bQPS\b|per second", re.I), 1.0, "queries per second"),
           (re.compile(r"\bI?O?TPM\b|tokens per minute", re.I), 60.0, "tokens per minute"),
           (re.compile(r"\bQPM\b|per minute", re.I), 60.0, "queries per minute"),
           (re.compile(r"\bQPH\b|per hour", re.I), 3600.0, "queries per hour"),
           (re.compile(r"per day|daily|budget", re.I), 86400.0, "daily budget"))


class RateLimited(StatusError):
    """429. ``limit`` names the limit the server's message names (``queries per second``, ``tokens
    per minute``, ``queries per minute``, ``queries per hour``, ``daily budget``; None when it names
    none) and ``window`` its length in seconds: a limit that resets within seconds or a minute is
    waited out (a batch slows down to it); a longer one fails at once, saying when to come back."""

    next_step = "The endpoint is rate limited: wait a moment, lower the concurrency, or raise its limit."

    def __init__(self, what: str, **kwargs: Any):
        found = next(((w, n) for pattern, w, n in _LIMITS if pattern.search(kwargs.get("server_message") or "")),
                     (None, None))
        self.window, self.limit = found
        if self.window is not None and "next_step" not in kwargs:
            if self.window <= 60:
                kwargs["next_step"] = (f"The endpoint's {self.limit} limit was reached: a batch slows down to it by "
                                       "itself; lower --concurrency, or wait a moment and run the cell again.")
            else:
                resets = "within the hour" if self.window <= 3600 else "within the day"
                kwargs["next_step"] = (f"The endpoint's {self.limit} limit was reached; it resets only {resets}, so "
                                       "dbmagic does not wait for it. Run the rest later (resume= sends only what is "
                                       "missing), or ask a workspace admin for a higher limit (AI Gateway rate limits).")
        super().__init__(what, **kwargs)

    @property
    def tokens(self) -> str | None:
        """The tokens the limit counts when it is a token limit (``input``, ``output``, or ``total``
        when the message says tokens alone), else None: a batch then paces its tokens, not its requests."""
        message = self.server_message or ""
        if not re.search(r"\bI?O?TPM\b|tokens per", message, re.I):
            return None
        return "input" if re.search(r"input tokens|\bITPM\b", message, re.I) else \
            "output" if re.search(r"output tokens|\bOTPM\b", message, re.I) else "total"

    @property
    def outlasts(self) -> float | None:
        """The limit's window when it is longer than a minute (waiting is pointless), else None."""
        return self.window if self.window is not None and self.window > 60 else None


class EndpointTimeout(StatusError):
    """The endpoint (or a gateway before it) answered that it ran out of time: 504, 408 or
    ``DEADLINE_EXCEEDED``. The model may have run; the call is not sent again by itself."""

    next_step = (
        "The endpoint ran out of time. The request may have run (and been paid for), so dbmagic did not send it "
        "again: ask for fewer tokens (--max-tokens) or shorten the prompt, then run it again."
    )


class ServerError(StatusError):
    next_step = (
        "The endpoint failed or is scaling up from zero. The request may have run (a 500 or 502 can come after "
        "the model did), so dbmagic did not send it again: check its state with `%dbllm endpoints` and run it "
        "again in a minute."
    )


class TransportError(RequestError):
    """No answer came, or no whole one. ``.sent`` is False when the request never left (the
    connection was not made: it is safe to send again, and dbmagic does), True when it may have run."""

    def __init__(self, what: str, *, sent: bool = True, **kwargs: Any):
        self.sent = sent
        super().__init__(what, **kwargs)


class ConnectionFailed(TransportError):
    next_step = "Check the host (`%dbllm whoami`) and your network, then try again."


class RequestTimeout(TransportError):
    next_step = (
        "The endpoint did not answer in time: raise the timeout (--timeout / timeout=), "
        "ask for fewer tokens, or try again."
    )


class AnswerCut(TransportError):
    """The answer's body ended before its end. ``.partial`` holds the text that did arrive (and
    ``.completion``, when the client built one, the partial `Completion`)."""

    next_step = "What arrived is kept (in a notebook, in _dbllm.text); run the cell again for a whole answer."

    def __init__(self, what: str, *, partial: str = "", **kwargs: Any):
        self.partial = partial
        self.completion: Any = None
        super().__init__(what, **kwargs)


class StreamInterrupted(AnswerCut):
    """A streamed answer stopped before its end. ``.partial`` holds the text that did arrive."""

    next_step = "What arrived is kept (in a notebook, in _dbllm.text); run the cell again for a whole answer."


class BadResponse(RequestError):
    """An answer dbmagic cannot read (not JSON, or not the endpoint kind's shape)."""

    next_step = (
        "The endpoint's answer has an unexpected shape: pass a transform_output that reads it, "
        "or set task= to the endpoint's real task."
    )


__all__ += [name for name, value in list(globals().items())
            if isinstance(value, type) and issubclass(value, DbMagicError)]
__all__ += ["error_from_response", "error_of"]


_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;}]+")

# The one table: Databricks error_code first (it is more specific), then HTTP status.
_BY_CODE: dict[str, type[StatusError]] = {
    "INVALID_PARAMETER_VALUE": BadRequest,
    "BAD_REQUEST": BadRequest,
    "MALFORMED_REQUEST": BadRequest,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDenied,
    "RESOURCE_DOES_NOT_EXIST": EndpointNotFound,
    "ENDPOINT_NOT_FOUND": EndpointNotFound,
    "REQUEST_LIMIT_EXCEEDED": RateLimited,
    "RESOURCE_EXHAUSTED": RateLimited,
    "TEMPORARILY_UNAVAILABLE": ServerError,
    "INTERNAL_ERROR": ServerError,
    "DEADLINE_EXCEEDED": EndpointTimeout,
}
_BY_STATUS: dict[int, type[StatusError]] = {
    400: BadRequest,
    401: AuthenticationError,
    403: PermissionDenied,
    404: EndpointNotFound,
    408: EndpointTimeout,
    429: RateLimited,
    504: EndpointTimeout,
}
_WHAT: dict[type[StatusError], str] = {
    BadRequest: "{target} refused the request",
    AuthenticationError: "{host} did not accept the token for {target}",
    PermissionDenied: "No permission to query {target}",
    EndpointNotFound: "{target} was not found on {host}",
    RateLimited: "{target} is rate limited",
    ServerError: "{target} failed",
    EndpointTimeout: "{target} timed out",
    StatusError: "{target} answered with an error",
}


def error_class(status: int | None, error_code: str | None) -> type[StatusError]:
    """The error class for an HTTP status and a Databricks ``error_code``."""
    if error_code and error_code in _BY_CODE:
        return _BY_CODE[error_code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status is not None and status >= 500:
        return ServerError
    return StatusError


def error_from_response(
    status: int,
    body: bytes | str,
    *,
    target: str,
    host: str,
    request_id: str | None = None,
    retry_after: float | None = None,
    secrets: Iterable[str] = (),
) -> StatusError:
    """Build the right `StatusError` from an error answer (any body: JSON, text, HTML, empty)."""
    error_code, message = parse_error_body(body, secrets)
    cls = error_class(status, error_code)
    what = _WHAT.get(cls, _WHAT[StatusError]).format(target=target, host=host)
    return cls(
        what,
        target=target,
        status=status,
        error_code=error_code,
        server_message=message,
        request_id=request_id,
        retry_after=retry_after,
        secrets=secrets,
    )


def parse_error_body(body: bytes | str, secrets: Iterable[Any] = ()) -> tuple[str | None, str | None]:
    """``(error_code, message)`` from an error body of any shape the workspace sends, scrubbed of
    ``secrets`` and any ``Bearer`` value before anything is cut to length (so no prefix survives)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = scrub(text, secrets).strip()
    if not text:
        return None, None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested past any error's shape
        data = None
    if isinstance(data, dict):
        code = data.get("error_code")
        message = data.get("message") or data.get("error") or data.get("detail")
        if isinstance(message, dict):  # {"error": {"message": ...}} from some external models
            message = message.get("message") or json.dumps(message)
        return (str(code)[:200] if code is not None else None), (_cut(str(message)) if message else None)
    if text.lstrip().startswith("<"):  # an HTML error page (a proxy or gateway): keep its title and <pre>
        return None, _html_summary(text)
    return None, _cut(text)


def _cut(text: str, limit: int = 500) -> str:
    """A server's words, bounded (after scrubbing: no part of a secret survives the cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _html_summary(page: str) -> str:
    import html
    import re

    parts = []
    for tag in ("title", "h1", "pre"):
        match = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", page, re.S | re.I)
        if match:
            words = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", match.group(1))).split())
            if words and words not in parts:
                parts.append(words)
    summary = " — ".join(parts)[:300]
    return f"an HTML error page: {summary}" if summary else "the server sent an HTML error page"


def with_article(noun: str) -> str:
    """``a list``, ``an object``."""
    return f"an {noun}" if noun[:1].lower() in "aeiou" else f"a {noun}"


def scrub(text: str, secrets: Iterable[Any] = ()) -> str:
    """``text`` without the secrets (plain strings or `Secret`s) and without any ``Bearer`` value:
    the one scrubber every text from a server (or an SDK) goes through before it is shown or stored."""
    for secret in secrets:
        if secret:
            text = text.replace(reveal(secret), "***")
    return _BEARER.sub(r"\1***", text)


# a secret shorter than this cannot be told apart from an answer's own text (a test's token "t"): an
# answer is not scrubbed of it (no Databricks token or secret is this short; error messages still are)
MIN_SECRET = 8


def scrub_value(value: Any, secrets: Iterable[Any] = ()) -> Any:
    """A JSON value (an answer, a streamed event) with `scrub` applied to every string in it, keys
    included; the same object when its JSON text holds nothing to scrub. Iterative: any depth is fine."""
    plain = [s for s in (_reveal(x) for x in secrets) if len(s) >= MIN_SECRET]

    def clean(text: str) -> str:
        return scrub(text, plain) if _holds(text, plain) else text

    if isinstance(value, (dict, list)) and not any(_JSON_ESCAPED.search(s) for s in plain):
        # one look at the value as JSON text finds nothing in most answers, and walks nothing
        try:
            whole = json.dumps(value, ensure_ascii=False, check_circular=False)
        except (TypeError, ValueError, RecursionError):
            whole = None
        if whole is not None and not _holds(whole, plain):
            return value
    if isinstance(value, str):
        return clean(value)
    if not isinstance(value, (dict, list)):
        return value
    root: list[Any] = [value]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]  # (container, key in it, value there)
    while stack:
        holder, key, item = stack.pop()
        if isinstance(item, dict):
            fixed = {clean(k) if isinstance(k, str) else k: v for k, v in item.items()}
            holder[key] = fixed
            stack.extend((fixed, k, v) for k, v in fixed.items() if isinstance(v, (str, dict, list)))
        elif isinstance(item, list):
            fixed_list = list(item)
            holder[key] = fixed_list
            stack.extend((fixed_list, i, v) for i, v in enumerate(fixed_list) if isinstance(v, (str, dict, list)))
        else:
            cleaned = clean(item)
            if cleaned is not item:
                holder[key] = cleaned
    return root[0]


# characters json.dumps(ensure_ascii=False) writes escaped: a secret with one is not found as it is in
# the JSON text (scrub_value then walks the value)
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _holds(text: str, plain: Sequence[str]) -> bool:
    """Whether `scrub` would change ``text``: a secret in it, or a ``Bearer`` value (any case)."""
    return any(secret in text for secret in plain) or "bearer" in text.lower()


def _reveal(secret: Any) -> str:
    return reveal(secret) or ""


class StreamScrubber:
    """`scrub` for text that arrives in pieces: a secret split across two pieces (two streamed
    events) is caught too. `feed` returns what may be shown now, holding back a tail that could be
    the start of a secret or of a ``Bearer`` value; `close` gives the rest, a tail that is the start
    of a secret (6 characters or more) masked. ``hits`` counts the secrets found across pieces."""

    _OPEN_BEARER = re.compile(r"(?i)(?:b(?:e(?:a(?:r(?:e(?:r(?:\s+[^\s\"',;}]*)?)?)?)?)?)?)$")

    def __init__(self, secrets: Iterable[Any] = ()):
        self._secrets = sorted({s for s in (_reveal(x) for x in secrets) if len(s) >= MIN_SECRET}, key=len,
                               reverse=True)
        self._pending = ""
        self.hits = 0

    def feed(self, piece: str) -> str:
        text = self._pending + piece
        cleaned = scrub(text, self._secrets)
        if cleaned != text and scrub(piece, self._secrets) == piece and scrub(self._pending, self._secrets) == \
                self._pending:
            self.hits += 1  # a secret that no piece held whole
        cut = self._safe_end(cleaned)
        self._pending = cleaned[cut:]
        return cleaned[:cut]

    def close(self) -> str:
        rest, self._pending = scrub(self._pending, self._secrets), ""
        for secret in self._secrets:
            start = self._prefix_start(rest, secret)
            if start is not None and len(rest) - start >= 6:
                rest = rest[:start] + "***"
        return rest

    def _safe_end(self, text: str) -> int:
        cut = len(text)
        for secret in self._secrets:
            start = self._prefix_start(text, secret)
            if start is not None:
                cut = min(cut, start)
        match = self._OPEN_BEARER.search(text)
        if match and match.start() < len(text):
            cut = min(cut, match.start())
        return cut

    @staticmethod
    def _prefix_start(text: str, secret: str) -> int | None:
        """Where the longest tail of ``text`` that begins ``secret`` starts, or None."""
        start = max(len(text) - len(secret) + 1, 0)
        first = secret[0]
        while True:
            at = text.find(first, start)
            if at < 0:
                return None
            if secret.startswith(text[at:]):
                return at
            start = at + 1


def error_of(outcome: Any) -> BaseException | None:
    """The error a call's outcome carries: the error it failed with, or the one that cut a partial
    answer (``completion.error``); None for an answer."""
    return outcome if isinstance(outcome, BaseException) else getattr(outcome, "error", None)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its class name when it has none), bounded: how a
    library's error is quoted inside a dbmagic message."""
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0][:limit]
