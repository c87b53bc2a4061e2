"""The local workspace's HTTP side: routes, tokens, faults, streaming, and an app's own server."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from ._model import (
    CODES,
    CUSTOM_REQUEST_LIMIT,
    LIMIT_MESSAGES,
    PAT_TOKEN_TYPE,
    REQUEST_LIMIT,
    TOKEN_EXCHANGE,
    WINDOWS,
    Endpoint,
    Fault,
    RecordedRequest,
    secret_fingerprint,
    token_limit_message,
)
from ._replies import (
    SHAPES,
    chat_tool_call,
    echo_predictions,
    embed,
    function_call_item,
    nth,
    nth_text,
    output_item,
    pieces_of,
    question_of,
    records_of,
    refused_by_quirks,
    reply_to,
    responses_usage,
    text_of,
    tokens_asked,
)

if TYPE_CHECKING:
    from ._server import App, LocalWorkspace



_INVOCATIONS = re.compile(r"^/serving-endpoints/([^/]+)/invocations/?$")
_ENDPOINT = re.compile(r"^/api/2\.0/serving-endpoints/([^/]+)/?$")
_APP = re.compile(r"^/api/2\.0/apps/([^/]+)/?$")
_OPENAI_ROUTES = {"/serving-endpoints/chat/completions": "llm/v1/chat", "/serving-endpoints/completions":
                  "llm/v1/completions", "/serving-endpoints/embeddings": "llm/v1/embeddings"}
_PROXY = re.compile(r"^/driver-proxy-api/o/([^/]+)/([^/]+)/(\d+)(/.*)?$")



class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    workspace: LocalWorkspace
    server_version = "dbmagic-local-workspace"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without NODELAY, Nagle + delayed ACK add ~40 ms
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.workspace.lock:
            self.workspace.connections += 1

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (Stop, Ctrl-C)
            pass

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- routing --------------------------------------------------------------------------------

    def _read(self) -> tuple[bytes, Any, dict[str, str], str, str]:
        """The request: its raw body, the body's JSON (None when it is not JSON), the headers as
        recorded (the Authorization value masked), the Authorization value sent, and the path."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self._request_bytes = len(raw)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        sent_auth = self.headers.get("Authorization", "")  # header names are case-insensitive (openai's is lower case)
        headers = {k: (v.split(" ", 1)[0] + " ***" if k.lower() == "authorization" else v)
                   for k, v in self.headers.items()}
        return raw, body, headers, sent_auth, self.path.split("?", 1)[0]

    def _dispatch(self, method: str) -> None:
        ws = self.workspace
        raw, body, headers, sent_auth, path = self._read()
        with ws.lock:  # one decision: a request that races the token's expiry is refused, never let through
            authorized = ws.accepts(sent_auth)
            if authorized and ws.expire_after is not None and _INVOCATIONS.match(path):
                authorized = ws.count_towards_expiry()
        self._record = RecordedRequest(method, path, headers, body, authorized, at=time.monotonic())
        self._authorization, self._fault_now = sent_auth, None
        ws.requests.append(self._record)
        if method == "GET" and path == "/.well-known/databricks-config":  # public, as on a workspace
            if self._fault(path) is True:
                return
            return self._json(200, {"workspace_id": ws.workspace_id, "oidc_endpoint": f"{ws.host}/oidc"})
        if method == "GET" and path == "/oidc/.well-known/oauth-authorization-server":
            return self._json(200, {"issuer": f"{ws.host}/oidc", "token_endpoint": f"{ws.host}/oidc/v1/token",
                                    "authorization_endpoint": f"{ws.host}/oidc/v1/authorize"})
        if method == "POST" and path == "/oidc/v1/token":
            if self._fault(path) is True:
                return
            return self._token_endpoint(raw, sent_auth)
        if method == "GET" and path == ws.metadata_path:
            return self._metadata_service()
        if not authorized:
            return self._error(401, "Credential was not sent or was of an unsupported type for this API.")
        if raw and body is None:
            return self._error(400, "Malformed JSON in the request body.", "MALFORMED_REQUEST")

        if method == "GET" and path.rstrip("/") == "/api/2.0/preview/scim/v2/Me":
            if self._fault(path) is True:
                return
            return self._json(200, scim_me(ws.user_of(sent_auth) or {}))
        if method == "GET" and path.rstrip("/") == "/api/2.0/apps":
            return self._json(200, self._page("apps", [a.describe() for a in ws.apps.values()]))
        match = _APP.match(path)
        if method == "GET" and match:
            found = ws.apps.get(urllib.parse.unquote(match.group(1)))
            if found is None:
                return self._error(404, f"App with name {match.group(1)} does not exist.", "RESOURCE_DOES_NOT_EXIST")
            return self._json(200, found.describe())
        if method == "GET" and path.rstrip("/") == "/api/2.1/unity-catalog/model-services":
            return self._json(200, self._page("model_services", [
                {"name": f"model-services/{name}", "owner": "local@dbmagic.test",
                 "supported_api_types": ["CHAT_COMPLETIONS"], "comment": f"serves {e.model}"}
                for name, e in ws.model_services.items()]))
        if method == "POST" and path in ("/ai-gateway/mlflow/v1/chat/completions", "/ai-gateway/mlflow/v1/responses"):
            model = body.get("model") if isinstance(body, dict) else None
            service = ws.model_services.get(model) if isinstance(model, str) else None
            if service is None:
                return self._error(404, f"Model service '{model}' does not exist, or you lack EXECUTE on it.",
                                   "RESOURCE_DOES_NOT_EXIST")
            if path.endswith("/responses"):  # the same service through the Responses API
                service = dataclasses.replace(service, task="agent/v1/responses")
            return self._serve(service, body, path, named=True, usage_when_asked=True)
        if method == "POST" and path in _OPENAI_ROUTES:  # what the openai client sends, base_url {host}/serving-endpoints
            model = body.get("model") if isinstance(body, dict) else None
            endpoint = ws.endpoints.get(model) if isinstance(model, str) else None
            if endpoint is None:
                return self._not_found(str(model))
            if endpoint.task != _OPENAI_ROUTES[path]:
                return self._error(400, f"Endpoint {model} does not serve {path.rsplit('/', 1)[-1]}.", "BAD_REQUEST")
            return self._serve(endpoint, body, path, named=True)
        if method == "GET" and path.rstrip("/") == "/api/2.0/serving-endpoints":
            if self._fault(path) is True:
                return
            return self._json(200, {"endpoints": [e.describe() for e in ws.endpoints.values()]})
        match = _ENDPOINT.match(path)
        if method == "GET" and match:
            endpoint = ws.endpoints.get(match.group(1))
            if endpoint is None:
                return self._not_found(match.group(1))
            if self._fault(path) is True:
                return
            return self._json(200, {**endpoint.describe(), "permission_level": "CAN_QUERY"})
        match = _INVOCATIONS.match(path)
        if method == "POST" and match:
            endpoint = ws.endpoints.get(match.group(1))
            if endpoint is None:
                return self._not_found(match.group(1))
            return self._serve(endpoint, body, path)
        match = _PROXY.match(path)
        if method == "POST" and match:
            key = (match.group(2), int(match.group(3)))
            app = ws.proxy_apps.get(key)
            if app is None:
                return self._error(404, f"No app is listening on cluster {key[0]} port {key[1]}.")
            if self._fault(f"{key[0]}:{key[1]}", path) is True:
                return
            try:
                return self._json(200, app(body))
            except Exception as exc:  # the app's own failure, as a real driver app would give
                return self._text(500, f"{exc.__class__.__name__}: {exc}")
        return self._error(404, f"No API found for '{method} {path}'.", "ENDPOINT_NOT_FOUND")

    def _fault(self, *keys: str) -> Fault | bool | None:
        """Apply a queued fault. True when it answered; a Fault for streaming faults to apply later."""
        fault = self.workspace.take_fault(*keys)
        if fault is None:
            return None
        if fault.barrier is not None:
            try:
                fault.barrier.wait(fault.gather_timeout)
            except threading.BrokenBarrierError:
                self._error(409, f"Only some of {fault.gather} requests arrived within {fault.gather_timeout:g} s "
                                 "of each other.", "REQUESTS_DID_NOT_OVERLAP")
                return True
        if fault.delay:
            time.sleep(fault.delay)
        if fault.limit is not None:
            self._error(429, LIMIT_MESSAGES[fault.limit], "REQUEST_LIMIT_EXCEEDED", extra=dict(fault.headers))
            return True
        if fault.status is not None:
            extra = dict(fault.headers)
            if fault.retry_after is not None:
                extra["Retry-After"] = str(fault.retry_after)
            if fault.body is None:
                self._error(fault.status, f"Injected failure {fault.status}.", extra=extra)
            elif isinstance(fault.body, (dict, list)):
                self._json(fault.status, fault.body, extra=extra)
            else:
                self._text(fault.status, str(fault.body), extra=extra)
            return True
        if fault.malformed and fault.cut_after is None:
            self._send(200, b'{"choices": [{"message": ', "application/json")
            return True
        if fault.drop:
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return True
        if fault.short_body:
            self._record.status = 200
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "400")
            self.end_headers()
            self.wfile.write(b'{"choices": [{"message": {"role": "assistant", "content": "Echo')
            self.wfile.flush()
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return True
        return fault

    # -- signing in ------------------------------------------------------------------------------

    def _token_endpoint(self, raw: bytes, authorization: str) -> None:
        """OAuth client credentials (RFC 6749 4.4): the client authenticates with HTTP Basic or form fields."""
        ws = self.workspace
        form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode("utf-8", "replace")).items()}
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        if authorization.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
            except ValueError:
                pass
        with ws.lock:
            ws.client_credentials_seen.append((urllib.parse.unquote(client_id),
                                               secret_fingerprint(urllib.parse.unquote(secret))))
        if form.get("grant_type") == TOKEN_EXCHANGE:  # RFC 8693: a notebook token for an OAuth token
            subject = form.get("subject_token", "")
            if form.get("subject_token_type") != PAT_TOKEN_TYPE or not ws.accepts(f"Bearer {subject}"):
                return self._json(400, {"error": "invalid_request", "error_description": "The subject token is not "
                                                                                         "a valid token."})
            with ws.lock:
                ws.token_exchanges += 1
            return self._json(200, {"access_token": ws.issue_token(), "token_type": "Bearer",
                                    "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                                    "expires_in": int(ws.token_lifetime), "scope": form.get("scope", "all-apis")})
        if form.get("grant_type") != "client_credentials":
            return self._json(400, {"error": "unsupported_grant_type", "error_description": "client_credentials only"})
        expected = ws.service_principals.get(urllib.parse.unquote(client_id))
        if expected is None or not secrets.compare_digest(urllib.parse.unquote(secret), expected):
            return self._json(401, {"error": "invalid_client", "error_description": "Client authentication failed"})
        principal = urllib.parse.unquote(client_id)  # the service principal's own token: Me answers with it
        token = ws.issue_token()
        with ws.lock:
            ws.issued_to[token] = {"id": "sp-" + secret_fingerprint(principal), "userName": principal,
                                    "applicationId": principal, "displayName": principal}
        self._json(200, {"access_token": token, "token_type": "Bearer",
                         "expires_in": int(ws.token_lifetime), "scope": form.get("scope", "all-apis")})

    def _metadata_service(self) -> None:
        """What the VS Code extension's metadata service answers (databricks-sdk's metadata-service)."""
        ws = self.workspace
        if self.headers.get("X-Databricks-Metadata-Version") != "1" or self.headers.get("X-Databricks-Host") != ws.host:
            return self._json(400, {"error": "wrong metadata version or host"})
        self._json(200, {"access_token": ws.issue_token(), "token_type": "Bearer",
                         "expires_on": int(time.time() + ws.token_lifetime)})

    def _serve(self, endpoint: Endpoint, body: Any, path: str, *, named: bool = False,
               usage_when_asked: bool = False) -> None:
        """An invocation of ``endpoint``: its rate limit, a queued fault, its latency, then its answer.
        ``named``: the body names it (``model``: a model service, an OpenAI-compatible route), which
        is not part of what the endpoint reads. ``usage_when_asked``: as OpenAI's API, a stream
        carries usage only when ``stream_options.include_usage`` asks for it (model services, and
        external models anywhere)."""
        ws = self.workspace
        user = ws.user_of(getattr(self, "_authorization", "")) or {}
        if user.get("userName") in ws.denied.get(endpoint.name, ()):
            return self._error(403, f"User {user['userName']} does not have permission 'CAN QUERY' on endpoint "
                                    f"{endpoint.name}.", "PERMISSION_DENIED")
        wait = ws.admit(endpoint)
        if wait:
            return self._error(429, LIMIT_MESSAGES[WINDOWS[endpoint.rate_window][1]], "REQUEST_LIMIT_EXCEEDED",
                               extra={"Retry-After": f"{wait:.3f}"} if endpoint.retry_after else None)
        wait = ws.admit_tokens(endpoint, tokens_asked(body))
        if wait:
            return self._error(429, token_limit_message(endpoint.token_kind, endpoint.token_window),
                               "REQUEST_LIMIT_EXCEEDED",
                               extra={"Retry-After": f"{wait:.3f}"} if endpoint.retry_after else None)
        fault = self._fault(endpoint.name, path)
        if fault is True:
            return
        self._fault_now = fault
        if endpoint.latency:
            time.sleep(endpoint.latency)
        if named and isinstance(body, dict):
            body = {k: v for k, v in body.items() if k != "model"}
        return self._invoke(endpoint, body, fault, usage_when_asked=usage_when_asked)

    def _page(self, key: str, items: list[Any]) -> dict[str, Any]:
        """One page of a list API (``page_size`` of the workspace a page), with ``next_page_token``
        while more remain, as Databricks' list APIs page."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        start = int((query.get("page_token") or ["0"])[0] or 0)
        size = self.workspace.page_size
        page: dict[str, Any] = {key: items[start:start + size]}
        if start + size < len(items):
            page["next_page_token"] = str(start + size)
        return page

    # -- endpoint behaviours --------------------------------------------------------------------

    def _invoke(self, endpoint: Endpoint, body: Any, fault: Fault | None, usage_when_asked: bool = False) -> None:
        if not isinstance(body, dict):
            return self._error(400, "The request body must be a JSON object.")
        task = endpoint.task
        limit = CUSTOM_REQUEST_LIMIT if task is None else REQUEST_LIMIT
        if getattr(self, "_request_bytes", 0) > limit:
            return self._error(400, f"Request size {self._request_bytes / (1 << 20):.1f} MB exceeds the limit of "
                                    f"{limit >> 20} MB.", "BAD_REQUEST")
        if task == "llm/v1/embeddings":
            inputs = body.get("input")
            if inputs is None:
                return self._error(400, "Missing required field 'input'.", "INVALID_PARAMETER_VALUE")
            items = inputs if isinstance(inputs, list) else [inputs]
            if endpoint.max_inputs is not None and len(items) > endpoint.max_inputs:
                return self._error(400, f"Input batch size {len(items)} exceeds the maximum of {endpoint.max_inputs}.",
                                   "INVALID_PARAMETER_VALUE")
            return self._json(200, {
                "object": "list", "model": endpoint.model,
                "data": [{"object": "embedding", "index": i, "embedding": embed(t)} for i, t in enumerate(items)],
                "usage": {"prompt_tokens": sum(len(pieces_of(str(t))) for t in items),
                          "total_tokens": sum(len(pieces_of(str(t))) for t in items)},
            })
        if task is None:
            records = records_of(body)
            if records is None:
                return self._error(400, "Provide one of dataframe_split, dataframe_records, instances, inputs.")
            if endpoint.max_inputs is not None and len(records) > endpoint.max_inputs:
                return self._error(400, f"Input batch size {len(records)} exceeds the maximum of "
                                        f"{endpoint.max_inputs}.", "INVALID_PARAMETER_VALUE")
            predict = endpoint.predict or echo_predictions
            try:
                predictions = predict(records)
                if endpoint.echo_headers:
                    predictions = [f"{p} (it came with Authorization: {getattr(self, '_authorization', '')})"
                                   for p in predictions]
            except Exception as exc:  # the model's own failure, answered as serving answers it
                return self._error(400, f"Model prediction failed: {exc.__class__.__name__}: {exc}", "BAD_REQUEST")
            return self._json(200, {endpoint.output_key: predictions})
        shape = SHAPES.get(task, "completions")
        if shape in ("chat", "chat_agent", "responses"):
            field = "input" if shape == "responses" else "messages"
            turns = body.get(field)
            if isinstance(turns, str):
                turns = [{"role": "user", "content": turns}]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
                return self._error(400, f"Missing required field '{field}'.", "INVALID_PARAMETER_VALUE")
            system = next((text_of(m.get("content")) for m in turns if m.get("role") == "system"), None)
            prompt = question_of(turns)
            prompt_tokens = sum(len(pieces_of(text_of(m.get("content")))) for m in turns)
        else:
            if "prompt" not in body:
                return self._error(400, "Missing required field 'prompt'.", "INVALID_PARAMETER_VALUE")
            system, prompt = None, body["prompt"]
            prompt_tokens = len(pieces_of(str(prompt)))
        for name, kind in (("temperature", (int, float)), ("max_tokens", int), ("n", int)):
            if name in body and not isinstance(body[name], kind):
                return self._error(400, f"Invalid value for '{name}': {body[name]!r}.", "INVALID_PARAMETER_VALUE")
        turns = body.get("input" if shape == "responses" else "messages") if shape != "completions" else []
        refused = refused_by_quirks(endpoint, body, shape, turns if isinstance(turns, list) else [])
        if refused:
            return self._error(400, refused, "INVALID_PARAMETER_VALUE")
        try:
            reply = reply_to(endpoint, body, shape, turns if isinstance(turns, list) else [], str(prompt), system, fault)
        except ValueError as exc:
            return self._error(400, str(exc), "INVALID_PARAMETER_VALUE")
        text, finish, calls = reply["text"], reply["finish"], reply.get("tool_calls")
        if endpoint.echo_headers:
            text += f" (it came with Authorization: {getattr(self, '_authorization', '')})"
        completion_tokens = len(pieces_of(text)) + sum(len(c["arguments"]) // 4 + 1 for c in calls or ())
        self.workspace.spent(endpoint, completion_tokens)
        if endpoint.usage == "low":  # an endpoint that under-reports
            prompt_tokens = completion_tokens = 1
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if body.get("stream"):
            asked = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True
            only_when_asked = usage_when_asked or endpoint.endpoint_type == "EXTERNAL_MODEL"
            return self._stream(endpoint, text, finish, usage, shape, fault, calls,
                                usage_chunk=False if endpoint.usage == "no" else asked if only_when_asked else None,
                                n=body.get("n") or 1)
        n = body.get("n") or 1
        answer: dict[str, Any]
        if shape == "responses":
            output = [function_call_item(c) for c in calls] if calls else [output_item(text)]
            answer = {"object": "response", "id": f"resp_{invocation_count(self)}", "status": "completed",
                      "output": output, "usage": responses_usage(usage)}
        elif shape == "chat_agent":
            answer = {"messages": [{"role": "assistant", "content": text, "id": "msg_1"}]}
        elif shape == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                message = {"role": "assistant", "content": None, "tool_calls": [chat_tool_call(c) for c in calls]}
            answer = {"id": f"chatcmpl-{invocation_count(self)}", "object": "chat.completion", "created": 1700000000,
                      "model": endpoint.model, "usage": usage,
                      "choices": [{"index": i, "message": nth(message, i), "finish_reason": finish}
                                  for i in range(n)]}
        else:
            answer = {"id": f"cmpl-{invocation_count(self)}", "object": "text_completion", "created": 1700000000,
                      "model": endpoint.model, "usage": usage,
                      "choices": [{"index": i, "text": nth_text(text, i), "finish_reason": finish}
                                  for i in range(n)]}
        if endpoint.usage == "no":
            answer.pop("usage", None)
        self._json(200, answer)

    def _stream(self, endpoint: Endpoint, text: str, finish: str, usage: dict, shape: str, fault: Fault | None,
                calls: list[dict[str, Any]] | None = None, usage_chunk: bool | None = None, n: int = 1) -> None:
        """``usage_chunk`` None: usage in the last chunk (as the Foundation Model APIs send it); True:
        in a chunk of its own after it, with no choices (OpenAI's ``include_usage``); False: none."""
        ws = self.workspace
        chunked = ws.stream_mode == "chunked"
        self._record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self._record.request_id = ws.next_id()
        self.send_header("x-request-id", self._record.request_id)
        self.send_header("x-databricks-org-id", ws.workspace_id)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

        sent_at = self._record.chunks_sent_at

        def write(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            self.wfile.flush()
            sent_at.append(time.perf_counter())

        def event(data: dict[str, Any]) -> None:
            write(b"data: " + json.dumps(data).encode() + b"\n\n")

        if fault is not None and fault.keepalive:  # kept alive with comments, no event, as proxies do
            until = time.monotonic() + fault.keepalive_for
            while time.monotonic() < until:
                write(b": keep-alive\n\n")
                time.sleep(fault.keepalive)
        if calls:
            return self._stream_calls(endpoint, usage, shape, calls, event, write, chunked)
        pieces = pieces_of(text)
        if fault is not None and fault.chunk_chars:
            pieces = [text[i:i + fault.chunk_chars] for i in range(0, len(text), fault.chunk_chars)]
        for i, piece in enumerate(pieces):
            if fault is not None and fault.cut_after is not None and i >= fault.cut_after:
                if fault.malformed:
                    write(b"data: {\"choices\": [{\"delta\": \n\n")
                elif isinstance(fault.body, dict):  # an error event mid-stream, as gateways send
                    event(fault.body)
                self.close_connection = True
                return  # drop the connection mid-stream: no [DONE], no final chunk
            last = i == len(pieces) - 1
            if shape == "responses":
                event({"type": "response.output_text.delta", "item_id": "msg_1", "delta": piece})
            elif shape == "chat_agent":
                event({"delta": {"role": "assistant", "content": piece, "id": "msg_1"}})
            else:
                if shape == "chat":
                    delta: dict[str, Any] = {"content": piece}
                    if i == 0:
                        delta["role"] = "assistant"
                    choice = {"index": 0, "delta": delta, "finish_reason": finish if last else None}
                    chunk: dict[str, Any] = {"id": "chatcmpl-0", "object": "chat.completion.chunk",
                                             "created": 1700000000, "model": endpoint.model, "choices": [choice]}
                else:
                    choice = {"index": 0, "text": piece, "finish_reason": finish if last else None}
                    chunk = {"id": "cmpl-0", "object": "text_completion", "created": 1700000000, "model": endpoint.model,
                             "choices": [choice]}
                if last and usage_chunk is None:
                    chunk["usage"] = usage
                event(chunk)
                for k in range(1, n):  # the other answers (n), each in chunks of its own index
                    other = {**choice, "index": k}
                    extra = nth_text(" ", k)[1:] if last else ""
                    if "delta" in other:
                        other["delta"] = {"content": piece + extra}
                    else:
                        other["text"] = piece + extra
                    event({**{key: v for key, v in chunk.items() if key != "usage"}, "choices": [other]})
                if last and usage_chunk:
                    event({**chunk, "choices": [], "usage": usage})
            if ws.chunk_delay:
                time.sleep(ws.chunk_delay)
            if fault is not None and fault.stall_after == i + 1:
                time.sleep(fault.stall)
        if shape == "responses":  # the whole item again, as MLflow's agent server sends it; then, as the
            # Responses API ends a stream, the whole response with its usage
            event({"type": "response.output_item.done", "item": output_item(text)})
            event({"type": "response.completed", "response": {"object": "response", "status": "completed",
                                                              "output": [output_item(text)],
                                                              "usage": responses_usage(usage)}})
        write(b"data: [DONE]\n\n")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _stream_calls(self, endpoint: Endpoint, usage: dict, shape: str, calls: list[dict[str, Any]],
                      event: Callable[[dict[str, Any]], None], write: Callable[[bytes], None], chunked: bool) -> None:
        """Tool calls streamed as the APIs stream them: the arguments in pieces to concatenate."""
        for index, call in enumerate(calls):
            arguments = call["arguments"]
            pieces = [arguments[i:i + 7] for i in range(0, len(arguments), 7)] or [""]
            if shape == "responses":
                item = function_call_item(call)
                event({"type": "response.output_item.added", "output_index": index, "item": {**item, "arguments": ""}})
                for piece in pieces:
                    event({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                           "output_index": index, "delta": piece})
                event({"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                       "arguments": arguments})
                event({"type": "response.output_item.done", "output_index": index, "item": item})
                continue
            head = {"index": index, "id": call["id"], "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}
            first = {"role": "assistant", "content": None, "tool_calls": [head]} if index == 0 else {"tool_calls": [head]}
            event({"object": "chat.completion.chunk", "model": endpoint.model,
                   "choices": [{"index": 0, "delta": first, "finish_reason": None}]})
            for piece in pieces:
                event({"object": "chat.completion.chunk", "model": endpoint.model,
                       "choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, "function": {"arguments": piece}}]},
                                    "finish_reason": None}]})
        if shape == "responses":
            event({"type": "response.completed", "response": {
                "object": "response", "status": "completed", "output": [function_call_item(c) for c in calls],
                "usage": responses_usage(usage)}})
        else:
            event({"object": "chat.completion.chunk", "model": endpoint.model, "usage": usage,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        write(b"data: [DONE]\n\n")
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    # -- answers --------------------------------------------------------------------------------

    def _not_found(self, name: str) -> None:
        self._error(404, f"Endpoint with name '{name}' does not exist.")

    def _error(self, status: int, message: str, code: str | None = None, extra: dict[str, str] | None = None) -> None:
        self._json(status, {"error_code": code or CODES.get(status, str(status)), "message": message}, extra=extra)

    def _json(self, status: int, data: Any, extra: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", extra)

    def _text(self, status: int, text: str, extra: dict[str, str] | None = None) -> None:
        self._send(status, text.encode(), "text/plain; charset=utf-8", extra)

    def _send(self, status: int, payload: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self._record.status, self._record.retry_after = status, (extra or {}).get("Retry-After")
        fault = getattr(self, "_fault_now", None) if status == 200 else None
        if fault is not None and fault.gzip_bomb:
            payload, extra = _gzip_bomb(fault.gzip_bomb), {**(extra or {}), "Content-Encoding": "gzip"}
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self._record.request_id = self.workspace.next_id()
        self.send_header("x-request-id", self._record.request_id)
        self.send_header("x-databricks-org-id", self.workspace.workspace_id)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if fault is not None and fault.trickle:
            for i in range(len(payload)):
                self.wfile.write(payload[i:i + 1])
                self.wfile.flush()
                time.sleep(fault.trickle)
            return
        self.wfile.write(payload)


def _gzip_bomb(size: int) -> bytes:
    """A chat answer's JSON, gzip-compressed, whose text is ``size`` bytes of ``x`` (sent: a few KB)."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    parts = [packer.compress(b'{"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", '
                             b'"content": "')]
    block = b"x" * (1 << 20)
    for _ in range(size // len(block)):
        parts.append(packer.compress(block))
    parts.append(packer.compress(b"x" * (size % len(block)) + b'"}}]}'))
    parts.append(packer.flush())
    return b"".join(parts)


class AppHandler(Handler):
    """An app's own server: ``POST /responses`` to OAuth tokens only."""

    app: App

    def _dispatch(self, method: str) -> None:
        ws, app = self.workspace, self.app
        _, body, headers, sent, path = self._read()
        token = sent[len("Bearer "):] if sent.startswith("Bearer ") else ""
        with ws.lock:
            oauth = ws.issued.get(token, 0) > time.time()
        credential = ("oauth" if oauth else "personal access token" if token and secrets.compare_digest(token, ws.token)
                      else "other" if sent else "none")
        if not app.running:  # stopped while a connection stayed open: as a stopped app, no answer
            self.close_connection = True
            self.request.shutdown(socket.SHUT_RDWR)
            return
        self._record = RecordedRequest(method, path, headers, body, oauth, at=time.monotonic(), credential=credential)
        app.requests.append(self._record)
        if not oauth:
            return self._json(401, {"error": "unauthorized", "message": "Databricks Apps accept OAuth tokens only."})
        if method != "POST" or path.rstrip("/") != "/responses":
            return self._json(404 if method == "POST" else 405, {"error": f"Not Found: {method} {path}"})
        return self._serve(app.endpoint, body, path)  # its rate limit, a fault queued for apps/NAME, its latency


def scim_me(user: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /api/2.0/preview/scim/v2/Me`` answers (a user; a service principal has ``applicationId``)."""
    return {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], **user, "active": True,
            "emails": [{"value": user.get("userName", ""), "type": "work", "primary": True}]}


def invocation_count(handler: Handler) -> int:
    return handler.workspace.counter
