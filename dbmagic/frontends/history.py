"""The notebook's conversations: ``%%dbllm --chat`` and the panel keep turns per endpoint.

A subscriber of the client's calls (`dbmagic.hooks`): a call tagged ``conversation=KEY`` that
ends with a whole answer adds its user turn and the answer to conversation ``KEY``. The client
itself keeps no history; `of` gives the one attached to a client (the kernel's shared client:
one history per kernel).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ..call import wire as _wire
from ..call.hooks import Subscriber

if TYPE_CHECKING:
    from ..client import Call, Client, Completion

__all__ = ["Conversations", "of"]

_attach = threading.Lock()


class Conversations(Subscriber):
    """Chat turns per endpoint, kept for the client's life."""

    def __init__(self) -> None:
        self._turns: dict[str, list[dict[str, str]]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> list[dict[str, str]]:
        """The conversation with ``key`` (an endpoint name, or ``cluster:port``), oldest first."""
        with self._lock:
            return list(self._turns.get(key, ()))

    def add(self, key: str, user: str, assistant: str) -> None:
        with self._lock:
            self._turns.setdefault(key, []).extend(
                [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    def reset(self, key: str | None = None) -> None:
        """Forget one conversation, or all of them."""
        with self._lock:
            if key is None:
                self._turns.clear()
            else:
                self._turns.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            return [k for k, v in self._turns.items() if v]

    def on_done(self, call: Call, completion: Completion) -> None:
        key = call.tags.get("conversation")
        if key and not completion.is_partial and completion.error is None:  # a cut or refused answer is not a turn
            self.add(key, _wire.user_turn(call.prepared.kind, call.prepared.body), completion.text)


def of(client: Client) -> Conversations:
    """The conversations kept with ``client`` (subscribed to it on first use)."""
    with _attach:
        found = next((s for s in client.hooks if isinstance(s, Conversations)), None)
        if found is None:
            found = Conversations()
            client.subscribe(found)
    return found
