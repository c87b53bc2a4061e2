"""The vocabulary of a call: endpoint kinds (the request and answer shapes), where a call goes,
and the one rule that reads a target's name (`target_of`).

Kinds: ``chat`` (``llm/v1/chat``, and the older ``agent/v1/chat`` agents), ``completions``
(``llm/v1/completions``), ``embeddings`` (``llm/v1/embeddings``), ``responses`` (ResponsesAgent,
``agent/v1/responses``), ``chat_agent`` (ChatAgent, ``agent/v2/chat``), ``custom`` (a custom MLflow
model) and ``proxy`` (a cluster driver-proxy app).
"""

from __future__ import annotations

CHAT, COMPLETIONS, EMBEDDINGS, CUSTOM, PROXY = "chat", "completions", "embeddings", "custom", "proxy"
RESPONSES, CHAT_AGENT = "responses", "chat_agent"
KINDS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, CHAT_AGENT, CUSTOM, PROXY)
STREAMING_KINDS = frozenset({CHAT, COMPLETIONS, RESPONSES, CHAT_AGENT})
# kinds that take a system prompt and earlier turns, so --system and --chat apply
CONVERSATIONAL = frozenset({CHAT, RESPONSES, CHAT_AGENT})
_TASKS = {"llm/v1/chat": CHAT, "llm/v1/completions": COMPLETIONS, "llm/v1/embeddings": EMBEDDINGS,
          "agent/v1/responses": RESPONSES, "agent/v2/chat": CHAT_AGENT, "agent/v1/chat": CHAT}


# where a call goes: the one rule that reads a target's name (`target_of`)
SERVING, MODEL_SERVICE, APP, DRIVER_PROXY = "serving endpoint", "model service", "app", "driver-proxy app"
APPS_PREFIX = "apps/"
MODEL_SERVICES_PATH = "/ai-gateway/mlflow/v1"


def target_of(name: str) -> tuple[str, str]:
    """What a name given as ``-e NAME`` means, and the bare name: ``apps/NAME`` is an agent on
    Databricks Apps (``("app", "NAME")``), and so is an app's own URL (``https://...``, taken only
    on the Databricks Apps domains); a three-part Unity Catalog name ``catalog.schema.name`` is a
    Unity AI Gateway model service; anything else is a Model Serving endpoint (their names have
    no dots)."""
    if is_url(name):
        return APP, name
    if name.startswith(APPS_PREFIX):
        return APP, name[len(APPS_PREFIX):]
    if name.count(".") == 2 and all(name.split(".")):
        return MODEL_SERVICE, name
    return SERVING, name


def is_url(name: str) -> bool:
    """An app given by its URL rather than by name."""
    return name.startswith(("https://", "http://"))


def kind_for(task: str | None) -> str:
    """The request shape for an endpoint ``task`` (``llm/v1/chat``, ``chat``, ``agent/v1/responses`` ...)."""
    if not task:
        return CUSTOM
    if task in KINDS:
        return task
    if task in _TASKS:
        return _TASKS[task]
    if task.startswith("agent/") and "chat" in task:
        return CHAT
    return CUSTOM


def known_task(task: str) -> bool:
    """Whether ``task`` names a request shape dbmagic knows (for a user's explicit override)."""
    return task in KINDS or task in _TASKS or task.startswith("agent/")


# the kinds that take a schema on the wire; the others get it as an instruction after the prompt
SCHEMA_ON_WIRE = frozenset({CHAT, RESPONSES})
# the kinds that take tool definitions and answer with tool calls
TOOL_KINDS = frozenset({CHAT, RESPONSES})
