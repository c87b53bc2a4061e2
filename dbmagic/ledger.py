"""The call ledger: an append-only record of finished calls, so that no row is paid for twice.

``dbmagic.batch(..., checkpoint="/Volumes/main/default/work/tickets")`` (``%%dbllm --over df
--checkpoint PATH``) writes each finished call here as it finishes, and a batch that meets the
same checkpoint again (after a kernel restart, from another notebook) sends only the rows whose
request is not in it yet.

**Request identity** (`identity`): a SHA-256 of the URL a request goes to and its exact JSON body
(after templates, transforms, schema and tools put their parts in). The same prompt to the same
target with the same settings is the same request, whatever template or notebook made it; another
template, target, schema or setting makes another request, which the checkpoint does not answer.
So a checkpoint is never refused: it answers exactly the rows whose request it holds (and a batch
says how many that was).

**Format**: a folder of JSON Lines files, one record a line. Each writer (a batch in a process)
creates files of its own and never appends to or rewrites a file another wrote: the safe subset of
what a Unity Catalog volume's FUSE mount (and DBFS) supports, as well as local disk. Each record is
flushed as its call finishes, so a killed process loses at most the calls in flight; a file is
closed (and fsynced) every `ROTATE` records, for mounts that keep a file's data only once it is
closed. A line cut short by a kill is skipped when read.

A record: ``{"v": 1, "id", "url", "at" (epoch seconds), "text", "value" (the answer's own JSON
value when it is not its text: an embedding, a custom model's prediction; never what a schema or
``transform_output`` made of it, which are applied again when it is reused), "finish_reason", "usage" ({"input", "output", ...}), "served_model",
"latency_ms", "request_id"}``, or for a failed call ``"error": {"type", "message"}`` instead of the
answer (kept for the record; a failed call is sent again). No token or secret is ever written.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

__all__ = ["Ledger", "identity", "ROTATE", "Cache", "use_cache", "cache", "CACHE_MODE", "completion_of"]

ROTATE = 1000  # records a file, then the next file


# how an answer is delivered, not what it is: left out of a request's identity
_DELIVERY = ("stream", "stream_options")


def identity(url: str, body: Any) -> str:
    """The request identity of ``body`` sent to ``url``: a SHA-256 of both, keys sorted (whether the
    answer streams is left out: the same request, streamed or not, has the same answer)."""
    if isinstance(body, dict) and any(k in body for k in _DELIVERY):
        body = {k: v for k, v in body.items() if k not in _DELIVERY}
    text = json.dumps({"url": url, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class Ledger:
    """The records in folder ``path`` (made when missing), and a writer of new ones."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise ConfigurationError(f"checkpoint {str(self.path)!r} is a file: a checkpoint is a folder (dbmagic "
                                     "writes its records there). Name a folder, new or used by a batch before.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"checkpoint {str(self.path)!r} cannot be made ({exc.strerror}): name a folder "
                                     "you can write, e.g. on a volume: /Volumes/<catalog>/<schema>/<volume>/...") from None
        self._lock = threading.Lock()
        self._file: Any = None
        self._written = 0
        self.answers: dict[str, dict[str, Any]] = {}  # request identity -> its last answered record
        self.records = 0
        for record in self._read():
            self.records += 1
            if "error" not in record and isinstance(record.get("id"), str):
                self.answers[record["id"]] = record

    def _read(self) -> Iterator[dict[str, Any]]:
        for file in sorted(self.path.glob("*.jsonl")):
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # a line a killed writer left half written
                    continue
                if isinstance(record, dict) and record.get("v") == 1:
                    yield record

    def answer(self, request_id: str) -> dict[str, Any] | None:
        """The answered record of a request identity, or None."""
        return self.answers.get(request_id)

    def append(self, request_id: str, url: str, outcome: Any) -> None:
        """Record how a call ended (a `Completion`, or the error it failed with); flushed at once."""
        record: dict[str, Any] = {"v": 1, "id": request_id, "url": url, "at": round(time.time(), 3)}
        if isinstance(outcome, BaseException):
            record["error"] = {"type": type(outcome).__name__, "message": str(outcome)[:2000]}
        else:  # the answer as it came: a schema and transform_output read it again when it is reused
            value = getattr(outcome, "natural", None)
            record.update(text=outcome.text, finish_reason=outcome.finish_reason, usage=outcome.usage.as_dict(),
                          served_model=outcome.served_model, latency_ms=outcome.latency_ms,
                          request_id=outcome.request_id)
            if is_json(value) and value != outcome.text:
                record["value"] = value
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock:
            if self._file is None:
                name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
                self._file = open(self.path / name, "x", encoding="utf-8")  # noqa: SIM115 (kept open, rotated)
            self._file.write(line)
            self._file.flush()  # a killed process loses at most the calls in flight
            self._written += 1
            self.records += 1
            if "error" not in record:
                self.answers[request_id] = record
            if self._written >= ROTATE:
                self._close()

    def _close(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file, self._written = None, 0

    def close(self) -> None:
        with self._lock:
            self._close()


def is_json(value: Any) -> bool:
    """Whether ``value`` can be written as JSON (a record's value, an evaluation's input)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def completion_of(record: dict[str, Any], request: Any, transform_output: Any = None) -> Any:
    """A recorded answer as the `Completion` of ``request`` (``cached``), read as a fresh one would
    be: by the request's schema, then ``transform_output``; a `SchemaError` for an answer that did
    not fit then either (it is not sent again)."""
    from dataclasses import replace

    from ._wire import Usage
    from .client import Completion, _apply_output_transform
    from .errors import SchemaError

    text = record.get("text") or ""
    value: Any = record["value"] if "value" in record else text
    completion = Completion(text=text, value=value, endpoint=request.name or request.target, kind=request.kind,
                            usage=Usage(**{k: v for k, v in (record.get("usage") or {}).items()
                                           if k in Usage.__dataclass_fields__}),
                            latency=(record.get("latency_ms") or 0) / 1000, request=request.body,
                            request_id=record.get("request_id"), served_model=record.get("served_model"),
                            finish_reason=record.get("finish_reason"), schema=request.schema, where=request.where,
                            cached=True)
    if request.schema is not None:
        try:
            value = request.schema.parse(text, target=request.target)
        except SchemaError as exc:
            exc.completion = completion
            return exc
    if transform_output is not None:
        value = _apply_output_transform(transform_output, value)
    return replace(completion, value=value, text=value if isinstance(value, str) else text)


# -- the cache: the same request answered from the ledger (Run All pays nothing the second time) ---------

CACHE_MODES = ("auto", "always", "off")
# the cell's --cache: auto (calls whose temperature is 0 or unset, one answer each), always, off; read
# when a call is made (`dbmagic.client.Call`), in the thread that makes it
CACHE_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dbmagic_cache_mode", default=None)


class Cache:
    """The kernel's cache (`use_cache`): a `Ledger` whose answers answer the same requests again.
    ``mode`` says which calls it answers and records: ``auto`` those whose ``temperature`` is 0 or
    unset (and that ask for one answer: ``n`` 1 or unset), where the same request means the same
    answer; ``always`` every call; ``off`` none."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "auto"):
        if mode not in CACHE_MODES:
            raise ConfigurationError(f"The cache's mode is one of {', '.join(CACHE_MODES)}; got {mode!r}.")
        self.ledger = Ledger(path)
        self.mode = mode

    def serves(self, request: Any, mode: str | None = None) -> bool:
        """Whether the cache answers and records ``request`` (``mode``: the cell's, else the cache's)."""
        mode = mode or self.mode
        if mode == "off" or request.where == "driver-proxy app":
            return False
        if mode == "always":
            return True
        body = request.body if isinstance(request.body, dict) else {}
        temperature, n = body.get("temperature"), body.get("n")
        return not (isinstance(temperature, (int, float)) and temperature > 0) and n in (None, 1)

    def lookup(self, request: Any, transform_output: Any = None, mode: str | None = None) -> Any:
        """The cached `Completion` (or `SchemaError`) of ``request``, or None."""
        if not self.serves(request, mode):
            return None
        record = self.ledger.answer(identity(request.url, request.body))
        return completion_of(record, request, transform_output) if record is not None else None

    def record(self, request: Any, completion: Any, mode: str | None = None) -> None:
        if self.serves(request, mode) and not completion.cached:
            self.ledger.append(identity(request.url, request.body), request.url, completion)

    def describe(self) -> dict[str, str]:
        files = list(self.ledger.path.glob("*.jsonl"))
        size = sum(f.stat().st_size for f in files)
        return {"folder": str(self.ledger.path), "mode": self.mode, "answers": str(len(self.ledger.answers)),
                "records": str(self.ledger.records), "size": f"{size / 1024:.1f} KiB in {len(files)} files"}

    def clear(self) -> int:
        """Delete every record; returns how many answers were dropped."""
        self.ledger.close()
        dropped = len(self.ledger.answers)
        for file in self.ledger.path.glob("*.jsonl"):
            file.unlink()
        self.ledger.answers.clear()
        self.ledger.records = 0
        return dropped


_cache: Cache | None = None


def use_cache(path: str | os.PathLike[str] | None, mode: str = "auto") -> Cache | None:
    """Answer every dbmagic call whose exact request the folder ``path`` holds from it, and record
    the new ones there (``None``: no cache). Off by default; ``%config DbLLM.cache = "PATH"`` in a
    notebook. See `Cache` for ``mode``."""
    global _cache
    if _cache is not None:
        _cache.ledger.close()
    _cache = Cache(path, mode) if path else None
    return _cache


def cache() -> Cache | None:
    """The kernel's cache, or None."""
    return _cache
