"""Subscribers: your code, told about every call the client makes.

A subscriber is any object with some of the methods of `Subscriber`; dbmagic calls them as a call
goes (from the thread that runs the call). MLflow tracing (`dbmagic.autolog`) and the notebook's
conversation history are subscribers too. ``subscribe(s)`` hears every client's calls;
``client.subscribe(s)`` one client's. Both return a function that unsubscribes.

>>> import dbmagic
>>> calls = []
>>> class Log(dbmagic.Subscriber):
...     def on_done(self, call, completion):
...         calls.append((completion.endpoint, completion.latency, completion.usage.total))
...     def on_failed(self, call, error):
...         calls.append((call.prepared.name, None, repr(error)))
>>> unsubscribe = dbmagic.subscribe(Log())

A call that goes on for more than one round trip (a schema retry, tools run with ``run_tools``)
gets ``on_step`` between them; ``call.steps`` lists them.

A subscriber that raises is logged (``logging.getLogger("dbmagic")``) and left out of that event;
the call goes on. Keep the methods quick: ``on_piece`` runs once per streamed piece.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..client import Call, Completion, Step
    from ..transport.http import Response

__all__ = ["Subscriber", "subscribe", "Hooks", "EVENTS"]

log = logging.getLogger("dbmagic")

class Subscriber:
    """The events of a call, each a no-op here: subclass and override the ones you need.

    Every call gets ``on_request`` once, then exactly one of ``on_done`` (it produced a
    `Completion`: whole, or partial with ``finish_reason`` ``cut``, ``stopped`` or ``interrupted``,
    a cut one with its ``error``) and ``on_failed`` (no answer: an error status, no connection, a
    transform that raised). A request that could not even be built gets ``on_refused`` alone.
    """

    def on_request(self, call: Call) -> None:
        """The request is built (``call.prepared``: what will be sent) and about to go."""

    def on_response(self, call: Call, response: Response) -> None:
        """The answer's headers came: ``response.status``, ``.headers``, ``.attempts``, ``.elapsed``."""

    def on_event(self, call: Call, event: dict[str, Any]) -> None:
        """One event of a streamed answer arrived, as the endpoint sent it (JSON), before its text
        piece: what MLflow records as a span's chunk events."""

    def on_piece(self, call: Call, piece: str) -> None:
        """A piece of the answer's text arrived (the whole text, once, for an answer not streamed)."""

    def on_step(self, call: Call, step: Step) -> None:
        """A round trip ended and the call goes on with another (``step.why``: ``retry``, the answer
        did not fit the schema; ``tools``, the tools it asked for ran and their results go back).
        ``step.request`` was sent, ``step.completion`` came back; ``call.sending`` is the next request."""

    def on_done(self, call: Call, completion: Completion) -> None:
        """The call ended with an answer, whole or partial (``completion.is_partial``)."""

    def on_failed(self, call: Call, error: BaseException) -> None:
        """The call ended without an answer; ``error`` is what it raised."""

    def on_refused(self, endpoint: str | None, prompt: Any, error: BaseException) -> None:
        """A request could not be built (an unknown endpoint, an option its kind cannot take)."""


# the events, in the order a call meets them: the methods of `Subscriber` (named once, there)
EVENTS = tuple(name for name in vars(Subscriber) if name.startswith("on_"))


class Hooks:
    """An ordered set of subscribers, fired in order. Reads need no lock (the tuple is replaced
    whole on each change), so a call with no subscriber pays one truth test per event."""

    def __init__(self, parent: Hooks | None = None):
        self._subscribers: tuple[Any, ...] = ()
        self._parent = parent
        self._lock = threading.Lock()

    def add(self, subscriber: Any) -> Callable[[], None]:
        """Subscribe (once: adding it again does nothing); returns the function that unsubscribes."""
        with self._lock:
            if subscriber not in self._subscribers:
                self._subscribers = (*self._subscribers, subscriber)
        return lambda: self.remove(subscriber)

    def remove(self, subscriber: Any) -> None:
        with self._lock:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

    def __iter__(self) -> Any:
        return iter(self.all())

    def all(self) -> tuple[Any, ...]:
        """The global subscribers first (tracing opens its span before a client's own hear of it)."""
        return (*(self._parent.all() if self._parent is not None else ()), *self._subscribers)

    def __bool__(self) -> bool:
        return bool(self._subscribers) or bool(self._parent)

    def fire(self, event: str, *args: Any) -> None:
        for subscriber in self.all():
            method = getattr(subscriber, event, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception as exc:  # a subscriber's bug never breaks the call
                log.warning("dbmagic subscriber %s failed in %s: %s: %s", type(subscriber).__name__, event,
                            exc.__class__.__name__, exc)


GLOBAL = Hooks()


def subscribe(subscriber: Any) -> Callable[[], None]:
    """Tell ``subscriber`` about every call of every client (see the module docstring); returns
    the function that unsubscribes it."""
    return GLOBAL.add(subscriber)
