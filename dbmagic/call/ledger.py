"""The call ledger: an append-only record of finished calls, so that no row is paid for twice.

``dbmagic.batch(..., checkpoint="/Volumes/main/default/work/tickets")`` (``%%dbllm --over df
--checkpoint PATH``) writes each finished call here as it finishes, and a batch that meets the
same checkpoint again (after a kernel restart, from another notebook) sends only the rows whose
request is not in it yet. The kernel's cache (`use_cache`, ``%config DbLLM.cache``) is a ledger too.

**Request identity** (`identity`): a SHA-256 of the URL a request goes to and its exact JSON body
(after templates, transforms, schema and tools put their parts in). The same prompt to the same
target with the same settings is the same request, whatever template or notebook made it.

**Whose answer it is.** A record carries the principal that paid for it (``by``: the workspace
and the user or service principal as SCIM's ``Me`` names them, so a notebook's rotated token is
still the same principal) and an HMAC of the whole record (``mac``) with a key that never lives in
the folder (`Signer`: under ``~/.config/dbmagic``, or on Databricks in the user's own workspace
home, so a checkpoint still works after a cluster restart). A record is served only to the
principal that wrote it, and only when its HMAC verifies: a record another user wrote, or one this
user's dbmagic did not write (planted, copied, edited), is not served, and the batch's summary
counts them. A folder may be **shared** on purpose (``shared=True``): then records of other
principals are served too (everyone who can write the folder is trusted), and records in this
principal's name must still verify.

**Reading any folder.** Only regular files named ``*.jsonl`` are read (never through a symlink,
never a FIFO or a device), each up to `MAX_FILE` bytes and lines up to `MAX_LINE`; a line that is
not UTF-8, not JSON (a line a killed writer left half written, one nested too deeply) or not a
record of the right shape is skipped and counted.

**Writing any answer.** Records are JSON with every non-ASCII character escaped, so an answer
holding a lone surrogate (a model cut off mid-emoji) is written and read back as it came. Each
writer (a batch in a process) creates files of its own (``0600``, in folders made ``0700``) and
never appends to or rewrites another's: the safe subset of what a Unity Catalog volume's FUSE mount
(and DBFS) supports. Each record is flushed as its call finishes; a file is closed (and fsynced)
every `ROTATE` records, for mounts that keep a file's data only once it is closed.

**Two batches on one checkpoint** (threads or processes) never send the same request twice: before
sending a row, a batch reads what the others wrote, and writes a *claim* for its request; when two
claims meet, the earlier wins and the other batch waits for its answer (and sends the row itself
only if that batch fails it, dies, or its claim outlives `CLAIM_TTL`).

A record: ``{"v": 2, "id", "url", "at" (epoch seconds), "by", "writer", "text", "value" (the
answer's own JSON value when it is not its text), "finish_reason", "usage", "served_model",
"latency_ms", "request_id", "tool_calls" (asked for, not run), "mac"}``; a failed call has
``"error": {"type", "message"}`` instead of the answer (it is sent again); a claim has ``"claim":
{"host", "pid"}``. No token or secret is ever written.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError

__all__ = ["Ledger", "identity", "ROTATE", "Cache", "use_cache", "cache", "CACHE_MODE", "Principal",
           "Signer", "key_folder", "MAX_FILE", "MAX_LINE", "CLAIM_TTL"]

ROTATE = 1000  # records a file, then the next file
_MAX_TRIES = 100  # names tried for a new file before giving up
MAX_FILE = 1 << 30  # bytes read of one file (a file larger is read this far, the rest skipped)
MAX_LINE = 80 << 20  # bytes of one record (an answer's size cap, and room around it)
CLAIM_TTL = 900.0  # seconds a claim from another machine holds (a call's retry deadline and its read timeout)
_POLL = 0.05  # seconds between two looks at what another batch wrote, while waiting for its answer
_VERSION = 2
_HOST = socket.gethostname()

# how an answer is delivered, not what it is: left out of a request's identity
_DELIVERY = ("stream", "stream_options")


def identity(url: str, body: Any) -> str:
    """The request identity of ``body`` sent to ``url``: a SHA-256 of both, keys sorted (whether the
    answer streams is left out: the same request, streamed or not, has the same answer)."""
    if isinstance(body, dict) and any(k in body for k in _DELIVERY):
        body = {k: v for k, v in body.items() if k not in _DELIVERY}
    text = json.dumps({"url": url, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -- who paid for a record ----------------------------------------------------------------------

@dataclass(frozen=True)
class Principal:
    """A workspace's user or service principal, as ``GET /api/2.0/preview/scim/v2/Me`` names it:
    ``host``, the SCIM ``id`` (stable across rotated tokens) and ``name`` (``userName``, or a
    service principal's ``applicationId``)."""

    host: str
    id: str
    name: str

    @property
    def key(self) -> str:
        """What a record's ``by`` holds."""
        return f"{self.host}#{self.id}"


def key_folder(principal: Principal, on_databricks: bool) -> Path:
    """Where this principal's ledger key lives, never in a ledger's folder: on Databricks the
    user's own workspace home (``/Workspace/Users/<name>/.dbmagic``: private to the user, kept
    across cluster restarts), elsewhere ``~/.config/dbmagic``."""
    if on_databricks and Path("/Workspace/Users").is_dir():
        return Path("/Workspace/Users") / principal.name / ".dbmagic"
    return Path.home() / ".config" / "dbmagic"


class Signer:
    """Signs the records a principal writes and verifies the ones it reads (HMAC-SHA256)."""

    def __init__(self, principal: Principal, key: bytes):
        self.principal = principal
        self._key = key

    def __repr__(self) -> str:
        return f"Signer({self.principal.name!r}, key=***)"

    @classmethod
    def load(cls, principal: Principal, folder: Path) -> Signer:
        """The principal's key in ``folder`` (made ``0700``, the key ``0600``, on first use)."""
        path = folder / "ledger.key"
        try:
            key = path.read_bytes()
            if not key:  # another process is making it this moment: its key, once written
                key = _written_key(path)
        except FileNotFoundError:
            make_folder(folder)
            key = secrets.token_bytes(32)
            # written whole under a name of its own, then linked into place: a reader never sees half a key,
            # and of two processes making one at once, the first link wins and the other reads it
            spare = folder / f".ledger.key.{uuid.uuid4().hex}"
            descriptor = os.open(spare, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(key)
            try:
                os.link(spare, path)
            except FileExistsError:
                key = _written_key(path)
            except OSError:  # no hard links here (some FUSE mounts): the key made is kept unless one is there
                if path.exists():
                    key = _written_key(path)
                else:
                    os.replace(spare, path)
            finally:
                spare.unlink(missing_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"The ledger's key {str(path)!r} cannot be read ({exc.strerror}): dbmagic "
                                     "signs the answers it keeps with it. Make the folder readable, or delete the "
                                     "key to make a new one (the answers signed with the old one are then sent "
                                     "again).") from None
        if len(key) < 32:
            raise ConfigurationError(f"The ledger's key {str(path)!r} is too short: delete it, and dbmagic makes a "
                                     "new one.")
        return cls(principal, key)

    def mac(self, record: Mapping[str, Any]) -> str:
        canonical = json.dumps({k: v for k, v in record.items() if k != "mac"}, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=True)
        return hmac.new(self._key, canonical.encode(), hashlib.sha256).hexdigest()

    def verifies(self, record: Mapping[str, Any]) -> bool:
        mac = record.get("mac")
        return isinstance(mac, str) and hmac.compare_digest(mac, self.mac(record))


def _written_key(path: Path) -> bytes:
    """A key another process is writing: read once it is whole (a second at most)."""
    for _ in range(100):
        key = path.read_bytes()
        if len(key) >= 32:
            return key
        time.sleep(0.01)
    return key


def make_folder(path: Path) -> None:
    """``path`` and its missing parents, each made ``0700``. A Databricks path (``/Volumes/...``,
    ``/Workspace/...``, ``/dbfs/...``) is never made on a machine that does not have its root: a
    ``/Volumes`` at the root of a laptop is never what was meant."""
    parts = path.parts
    if len(parts) > 1 and parts[0] == "/" and parts[1] in ("Volumes", "Workspace", "dbfs") \
            and not Path("/", parts[1]).exists():
        raise ConfigurationError(f"{str(path)!r} is a path on Databricks (/{parts[1]}/...), and this machine has no "
                                 f"/{parts[1]}: it is not a Databricks cluster. Use a local folder here, e.g. "
                                 f"./{path.name}.")
    missing = []
    for parent in (path, *path.parents):
        if parent.exists():
            break
        missing.append(parent)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass


# -- the records ----------------------------------------------------------------------------------

_OPTIONAL = {"text": str, "finish_reason": str, "served_model": str, "request_id": str, "latency_ms": (int, float),
             "usage": dict, "error": dict, "claim": dict, "tool_calls": list}


def _shape_ok(record: Any) -> bool:
    """A record of the right shape (any field of the wrong type, and it is skipped)."""
    if not isinstance(record, dict) or record.get("v") != _VERSION:
        return False
    if not all(isinstance(record.get(k), str) for k in ("id", "url", "by", "writer", "mac")):
        return False
    if not isinstance(record.get("at"), (int, float)) or isinstance(record.get("at"), bool):
        return False
    for key, kind in _OPTIONAL.items():
        value = record.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            return False
    usage = record.get("usage") or {}
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in usage.values())


class _Source:
    """How far one other writer's file has been read."""

    def __init__(self) -> None:
        self.offset = 0
        self.pending = b""  # a last line not ended yet (its writer is still writing it)
        self.dropping = False  # inside a line longer than MAX_LINE: skipped to its end


class Ledger:
    """The records in folder ``path`` (made when missing), and a writer of new ones; see the module
    docstring. ``shared``: the folder is shared on purpose, and other principals' records are served."""

    def __init__(self, path: str | os.PathLike[str], *, shared: bool = False):
        self.path = Path(path).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise ConfigurationError(f"checkpoint {str(self.path)!r} is a file: a checkpoint is a folder (dbmagic "
                                     "writes its records there). Name a folder, new or used by a batch before.")
        try:
            make_folder(self.path)
        except OSError as exc:
            raise ConfigurationError(f"checkpoint {str(self.path)!r} cannot be made ({exc.strerror}): name a folder "
                                     "you can write, e.g. on a volume: /Volumes/<catalog>/<schema>/<volume>/...") from None
        self.shared = shared
        self.writer = uuid.uuid4().hex[:16]
        self._lock = threading.RLock()
        self._file: Any = None
        self._name: str | None = None
        self._made = 0  # files this writer has made (a number in each one's name)
        self._written = 0
        self._sources: dict[str, _Source] = {}
        self.records = 0  # answers and failures read and written (claims not counted)
        self.skipped = 0  # lines (and files) that could not be read as records
        self._answers: dict[str, list[dict[str, Any]]] = {}  # request identity -> its answered records, oldest first
        self._claims: dict[str, list[dict[str, Any]]] = {}  # request identity -> its claims
        self._settled: set[tuple[str, str]] = set()  # (writer, identity) a record ended
        self.refused: dict[str, str] = {}  # identity -> why its records were not served ("other", "unsigned")
        self._lock_file = _open_lock(self.path / ".claims.lock")
        self.refresh()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r}, {self.records} records)"

    # -- reading --------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Read what other writers added since the last look."""
        with self._lock:
            try:
                entries = sorted(os.scandir(self.path), key=lambda e: e.name)
            except OSError:
                return
            for entry in entries:
                if not entry.name.endswith(".jsonl") or entry.name == self._name:
                    continue
                source = self._sources.get(entry.name)
                if source is None:
                    source = self._sources[entry.name] = _Source()
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not stat.S_ISREG(info.st_mode):  # a symlink, a FIFO, a device: never opened
                    if source.offset == 0:
                        self.skipped += 1
                        source.offset = -1
                    continue
                if 0 <= source.offset < min(info.st_size, MAX_FILE):
                    self._read_from(entry.path, source)

    def _read_from(self, path: str, source: _Source) -> None:
        try:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return
        with os.fdopen(descriptor, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):  # swapped since the look: not read
                return
            file.seek(source.offset)
            while source.offset < MAX_FILE:
                chunk = file.read(min(1 << 20, MAX_FILE - source.offset))
                if not chunk:
                    break
                source.offset += len(chunk)
                for line in self._lines(source, chunk):
                    self._take(line)
            if source.offset >= MAX_FILE and source.pending:
                self.skipped += 1
                source.pending = b""

    def _lines(self, source: _Source, chunk: bytes) -> Iterator[bytes]:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                rest = chunk[start:]
                if source.dropping:
                    return
                if len(source.pending) + len(rest) > MAX_LINE:  # far longer than any record: skipped to its end
                    self.skipped += 1
                    source.pending, source.dropping = b"", True
                else:
                    source.pending += rest
                return
            if source.dropping:
                source.dropping = False
            else:
                line = source.pending + chunk[start:end]
                if len(line) > MAX_LINE:
                    self.skipped += 1
                else:
                    yield line
            source.pending = b""
            start = end + 1

    def _take(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError):  # not UTF-8, not JSON (half written), nested too deeply
            self.skipped += 1
            return
        if not _shape_ok(record):
            self.skipped += 1
            return
        self._index(record)

    def _index(self, record: dict[str, Any]) -> None:
        key = record["id"]
        if "claim" in record:
            self._claims.setdefault(key, []).append(record)
            return
        self.records += 1
        self._settled.add((record["writer"], key))
        if "error" not in record:
            self._answers.setdefault(key, []).append(record)

    @property
    def answers(self) -> dict[str, dict[str, Any]]:
        """Every answered request identity and its newest record, whoever wrote it (`answer` says
        which of them may answer whom)."""
        with self._lock:
            return {key: found[-1] for key, found in self._answers.items()}

    def _servable(self, record: dict[str, Any], signer: Signer) -> str | None:
        """None when ``record`` may answer ``signer``'s principal, else why not (``other``: another
        principal's, in a folder not shared; ``unsigned``: in this principal's name, and its HMAC
        does not verify: planted or edited)."""
        if record["by"] == signer.principal.key:
            return None if signer.verifies(record) else "unsigned"
        return None if self.shared else "other"

    def answer(self, request_id: str, signer: Signer) -> dict[str, Any] | None:
        """The newest answered record of a request identity that may answer ``signer``'s principal,
        or None (`refused` then says why the records it has were not served)."""
        with self._lock:
            why = None
            for record in reversed(self._answers.get(request_id, ())):
                why = self._servable(record, signer)
                if why is None:
                    self.refused.pop(request_id, None)
                    return record
            if why is not None:
                self.refused[request_id] = why
            return None

    def not_served(self, ids: Any) -> dict[str, int]:
        """How many of ``ids`` had records that were not served, by why (`answer`)."""
        counts: dict[str, int] = {}
        with self._lock:
            for request_id in ids:
                why = self.refused.get(request_id)
                if why is not None:
                    counts[why] = counts.get(why, 0) + 1
        return counts

    # -- claims: two batches on one folder ---------------------------------------------------------

    def turn(self, request_id: str, url: str, signer: Signer, stop: threading.Event) -> dict[str, Any] | None:
        """Whether this writer sends ``request_id`` now: None when it may (its claim is written and
        is the earliest live one), or the answered record another writer gave meanwhile (waited
        for). Returns None when ``stop`` is set, without sending (the caller checks ``stop``)."""
        while True:
            with self._lock, self._claiming():
                self.refresh()
                found = self.answer(request_id, signer)
                if found is not None:
                    return found
                rival = self._rival(request_id, signer)
                mine = self._my_claim(request_id)
                if mine is None and rival is None:
                    mine = self._write(request_id, url, {"claim": {"host": _HOST, "pid": os.getpid()}}, signer)
                if mine is not None and (rival is None or _order(mine) < _order(rival)):
                    return None
            if stop.wait(_POLL):
                return None

    @contextlib.contextmanager
    def _claiming(self) -> Iterator[None]:
        """Claims are decided one at a time across processes (``flock`` on the folder's lock file), so
        two batches never both see no claim and both write one. Where the mount has no locks (some
        FUSE mounts), the earlier claim wins by its time, which is best effort across machines."""
        try:
            import fcntl
        except ImportError:  # Windows: claims go by their time
            fcntl = None
        if self._lock_file is None or fcntl is None:
            yield
            return
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        except OSError:  # no locks on this mount
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)

    def _my_claim(self, request_id: str) -> dict[str, Any] | None:
        return next((c for c in self._claims.get(request_id, ()) if c["writer"] == self.writer
                     and (self.writer, request_id) not in self._settled), None)

    def _rival(self, request_id: str, signer: Signer) -> dict[str, Any] | None:
        """The earliest live claim of another writer whose answer could be served here."""
        live = [c for c in self._claims.get(request_id, ()) if c["writer"] != self.writer
                and (c["writer"], request_id) not in self._settled and self._servable(c, signer) is None
                and _alive(c)]
        return min(live, key=_order, default=None)

    # -- writing --------------------------------------------------------------------------------

    def append(self, request_id: str, url: str, outcome: Any, signer: Signer) -> None:
        """Record how a call ended (a `Completion`, or the error it failed with); flushed at once."""
        if isinstance(outcome, BaseException):
            fields: dict[str, Any] = {"error": {"type": type(outcome).__name__, "message": str(outcome)[:2000]}}
        else:  # the answer as it came: a schema and transform_output read it again when it is reused
            value = getattr(outcome, "natural", None)
            fields = {"text": outcome.text, "finish_reason": outcome.finish_reason, "usage": outcome.usage.as_dict(),
                      "served_model": outcome.served_model, "latency_ms": outcome.latency_ms,
                      "request_id": outcome.request_id}
            calls = [{"id": c.id, "name": c.name, "arguments": c.raw_arguments} for c in outcome.tool_calls
                     if not c.ran]
            if calls:
                fields["tool_calls"] = calls
            if is_json(value) and value != outcome.text:
                fields["value"] = value
        self._write(request_id, url, fields, signer)

    def _write(self, request_id: str, url: str, fields: dict[str, Any], signer: Signer) -> dict[str, Any]:
        record: dict[str, Any] = {"v": _VERSION, "id": request_id, "url": url, "at": round(time.time(), 6),
                                  "by": signer.principal.key, "writer": self.writer, **fields}
        # as written and read back (every non-ASCII character escaped: a lone surrogate too), then signed
        record = json.loads(json.dumps(record, ensure_ascii=True, default=str))
        record["mac"] = signer.mac(record)
        line = json.dumps(record, ensure_ascii=True) + "\n"
        with self._lock:
            if self._file is None:
                self._file = self._new_file()
            self._file.write(line)
            self._file.flush()  # a killed process loses at most the calls in flight
            self._written += 1
            self._index(record)
            if self._written >= ROTATE:
                self._close()
        return record

    def _new_file(self) -> Any:
        """The next file this writer appends to, made new (never one that is there: a file of the
        same name, planted or left over, is passed over). Numbered: a writer that fills `ROTATE`
        records within one second makes several files in that second."""
        for _ in range(_MAX_TRIES):
            self._made += 1
            name = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{self.writer}-{self._made}.jsonl"
            try:
                descriptor = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            self._name = name
            return os.fdopen(descriptor, "w", encoding="ascii")
        raise ConfigurationError(f"checkpoint {str(self.path)!r}: every name tried for a new file was taken "
                                 f"({_MAX_TRIES} of them). Name another folder.")

    def _close(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
            self._file.close()
            self._file, self._written = None, 0
            self._sources[self._name or ""] = _Source()  # now read like any other file: nothing new in it
            self._sources[self._name or ""].offset = -1
            self._name = None

    def close(self) -> None:
        with self._lock:
            self._close()
            if self._lock_file is not None:
                os.close(self._lock_file)
                self._lock_file = None

    def files(self) -> tuple[list[Path], int]:
        """The regular ``*.jsonl`` files of the folder, and how many other entries have that name."""
        found, odd = [], 0
        for entry in os.scandir(self.path):
            if entry.name.endswith(".jsonl"):
                try:
                    regular = stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode)
                except OSError:
                    regular = False
                if regular:
                    found.append(Path(entry.path))
                else:
                    odd += 1
        return found, odd


def _open_lock(path: Path) -> int | None:
    """The folder's lock file (never through a symlink, never blocking on a FIFO), or None where it
    cannot be opened (claims then go by their time alone)."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0),
                             0o600)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        return None
    return descriptor


def _order(claim: dict[str, Any]) -> tuple[float, str]:
    return claim["at"], claim["writer"]


def _alive(claim: dict[str, Any]) -> bool:
    """A claim whose writer may still answer: on this machine, its process is running; from another
    machine, it is younger than `CLAIM_TTL`."""
    where = claim.get("claim") or {}
    if where.get("host") == _HOST and isinstance(where.get("pid"), int):
        try:
            os.kill(where["pid"], 0)
        except ProcessLookupError:
            return False
        except OSError:  # it runs as another user: alive
            return True
        return True
    return time.time() - claim["at"] < CLAIM_TTL


def is_json(value: Any) -> bool:
    """Whether ``value`` can be written as JSON (a record's value, an evaluation's input)."""
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


# -- the cache: the same request answered from the ledger (Run All pays nothing the second time) ---------

CACHE_MODES = ("auto", "always", "off")
# the cell's --cache: auto (calls whose temperature is 0 or unset, one answer each), always, off; read
# when a call is made (`dbmagic.client.Call`), in the thread that makes it
CACHE_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("dbmagic_cache_mode", default=None)


class Cache:
    """The kernel's cache (`use_cache`): a `Ledger` whose answers answer the same requests again.
    ``mode`` says which calls it answers and records: ``auto`` those whose ``temperature`` is 0 or
    unset (and that ask for one answer: ``n`` 1 or unset), where the same request means the same
    answer; ``always`` every call; ``off`` none. ``shared``: see `Ledger`."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "auto", *, shared: bool = False):
        if mode not in CACHE_MODES:
            raise ConfigurationError(f"The cache's mode is one of {', '.join(CACHE_MODES)}; got {mode!r}.")
        self.ledger = Ledger(path, shared=shared)
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

    def lookup(self, request: Any, signer: Signer, mode: str | None = None) -> dict[str, Any] | None:
        """The record that answers ``request`` for ``signer``'s principal, or None (the call makes its
        `Completion`: `dbmagic.call.call.completion_of`)."""
        if not self.serves(request, mode):
            return None
        self.ledger.refresh()
        return self.ledger.answer(identity(request.url, request.body), signer)

    def record(self, request: Any, completion: Any, signer: Signer, mode: str | None = None) -> None:
        if self.serves(request, mode) and not completion.cached:
            self.ledger.append(identity(request.url, request.body), request.url, completion, signer)

    def describe(self) -> dict[str, str]:
        files, odd = self.ledger.files()
        size = 0
        for file in files:
            try:
                size += file.stat().st_size
            except OSError:
                pass
        info = {"folder": str(self.ledger.path), "mode": self.mode, "shared": "yes" if self.ledger.shared else "no",
                "answers": str(len(self.ledger.answers)), "records": str(self.ledger.records),
                "size": f"{size / 1024:.1f} KiB in {len(files)} files"}
        if self.ledger.skipped or odd:
            info["skipped"] = f"{self.ledger.skipped} unreadable lines or entries" + (
                f", {odd} entries that are not files dbmagic wrote" if odd else "")
        return info

    def clear(self) -> int:
        """Delete every record file; returns how many requests' answers were dropped. Entries that
        are not regular files (a symlink, a FIFO) are left alone: dbmagic did not write them."""
        with self.ledger._lock:
            self.ledger.close()
            dropped = len(self.ledger._answers)
            files, _ = self.ledger.files()
            for file in files:
                try:
                    file.unlink()
                except FileNotFoundError:
                    pass
            self.ledger._answers.clear()
            self.ledger._claims.clear()
            self.ledger._sources.clear()
            self.ledger.records = self.ledger.skipped = 0
        return dropped


_cache: Cache | None = None


def use_cache(path: str | os.PathLike[str] | None, mode: str = "auto", *, shared: bool = False) -> Cache | None:
    """Answer every dbmagic call whose exact request the folder ``path`` holds from it, and record
    the new ones there (``None``: no cache). Off by default; ``%config DbLLM.cache = "PATH"`` in a
    notebook. See `Cache` for ``mode``; ``shared=True`` serves the answers other principals wrote
    there too (see the module docstring)."""
    global _cache
    if _cache is not None:
        _cache.ledger.close()
    _cache = Cache(path, mode, shared=shared) if path else None
    return _cache


def cache() -> Cache | None:
    """The kernel's cache, or None."""
    return _cache
