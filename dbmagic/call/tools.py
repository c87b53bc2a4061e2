"""Tools: functions in the notebook that the model may ask to call (``--tools f,g``, ``tools=[f, g]``).

>>> def weather(city: str, unit: str = "C") -> str:
...     '''The weather in a city now.'''
...     return f"15 {unit} in {city}"
>>> client.complete("Weather in Paris?", endpoint="...", tools=[weather])          # shows the call asked for
>>> client.complete("Weather in Paris?", endpoint="...", tools=[weather], run_tools=True)   # runs it

Each function becomes a tool definition: its name, the first paragraph of its docstring as the
description, and a JSON Schema of its parameters from their annotations and defaults (pydantic
writes it). By default dbmagic only shows the calls the model asks for (``Completion.tool_calls``).
With ``run_tools`` it runs them and sends the results back, up to ``max_steps`` round trips:

- only the functions given can run: a call of any other name gets an error result (the model can
  correct itself), and nothing is ever looked up elsewhere;
- arguments are checked against the signature before the call (pydantic validates them); a
  refused call gets an error result that says which argument was wrong;
- what a function raises is sent back as an error result, never raised in the cell; what it
  returns is sent as text (JSON for other values);
- at most ``max_tool_runs`` (default 20) calls run in one call, however many an answer asks for;
- a function runs one call at a time, even when a batch's rows ask for it at once from many
  threads, unless it is marked safe to run in parallel with `thread_safe`.

Tools need a chat endpoint or a Responses agent (``tools`` in the request).
"""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError, SettingError
from ..prompts.namespace import Unresolved, lookup

__all__ = ["Tool", "Toolbox", "toolbox_of", "toolbox_named", "thread_safe"]

MAX_RESULT = 20_000  # characters of one tool result sent back (a huge result is cut, and says so)
_LOCKS: dict[Any, threading.Lock] = {}  # a function -> the lock that runs it one call at a time
_LOCKS_LOCK = threading.Lock()


def thread_safe(function: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a tool function as safe to run from many threads at once (a batch's rows call their
    tools in parallel only then; otherwise one call at a time)::

        @dbmagic.tools.thread_safe
        def lookup(sku: str) -> dict: ...
    """
    function.__dbmagic_thread_safe__ = True  # type: ignore[attr-defined]
    return function


def _lock_of(function: Callable[..., Any]) -> threading.Lock | None:
    if getattr(function, "__dbmagic_thread_safe__", False):
        return None
    key = getattr(function, "__func__", function)  # a bound method: its function
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(key, threading.Lock())


@dataclass(frozen=True, eq=False)
class Tool:
    """One function the model may call: ``name``, ``description``, ``parameters`` (JSON Schema)."""

    function: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]
    _arguments: Any  # the pydantic model of the parameters

    @classmethod
    def of(cls, function: Callable[..., Any], name: str | None = None) -> Tool:
        if not callable(function) or isinstance(function, type):
            raise ConfigurationError(f"tools takes functions; got {type(function).__name__} {function!r:.60}.")
        name = name or getattr(function, "__name__", "") or ""
        if not name.isidentifier():
            raise ConfigurationError(f"tools: {function!r:.60} has no usable name; give it one (def name(...)).")
        arguments = _arguments_model(function, name)
        parameters = arguments.model_json_schema()
        parameters.pop("title", None)
        for sub in (parameters.get("properties") or {}).values():
            if isinstance(sub, dict):
                sub.pop("title", None)
        doc = inspect.getdoc(function) or ""
        return cls(function, name, doc.split("\n\n")[0].strip()[:1000], parameters, arguments)

    def definition(self) -> dict[str, Any]:
        """``{"name", "description", "parameters"}`` (`dbmagic.call.wire.with_tools` puts it in the kind's shape)."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def check(self, arguments: Mapping[str, Any] | None) -> dict[str, Any]:
        """The keyword arguments for the call, validated against the signature; ValueError says
        which argument is wrong."""
        import pydantic

        try:
            checked = self._arguments.model_validate(dict(arguments or {}))
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc") or ()) or "the arguments"
            raise ValueError(f"{where}: {first.get('msg')}") from None
        return {k: getattr(checked, k) for k in type(checked).model_fields}


class Toolbox:
    """The tools of one call, by name. `run` is the only way a tool call reaches a function."""

    def __init__(self, tools: Sequence[Tool]):
        self.tools = {t.name: t for t in tools}
        if len(self.tools) != len(tools):
            twice = sorted({t.name for t in tools if sum(u.name == t.name for u in tools) > 1})
            raise ConfigurationError(f"tools: more than one function is called {', '.join(twice)}.")

    def __repr__(self) -> str:
        return f"Toolbox({', '.join(self.tools)})"

    def __bool__(self) -> bool:
        return bool(self.tools)

    def definitions(self) -> list[dict[str, Any]]:
        return [t.definition() for t in self.tools.values()]

    def run(self, call: Any) -> None:
        """Run one `dbmagic.call.answers.ToolCall`: its ``output`` is set to what the function returned, or
        to an error result (``error`` says why) for an unknown name, arguments the signature refuses,
        or a function that raised."""
        tool = self.tools.get(call.name)
        call.ran = True
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return _refuse(call, f"there is no tool {call.name!r}; the tools are {known}")
        if call.arguments is None:
            return _refuse(call, call.problem or "the arguments are not a JSON object")
        try:
            kwargs = tool.check(call.arguments)
        except ValueError as exc:
            return _refuse(call, f"the arguments do not fit {tool.name}'s signature: {exc}")
        lock = _lock_of(tool.function)
        try:
            if lock is None:
                result = tool.function(**kwargs)
            else:
                with lock:  # a batch's rows run a notebook function one call at a time
                    result = tool.function(**kwargs)
        except Exception as exc:  # the function's own failure goes back to the model, not into the cell
            return _refuse(call, f"{tool.name} raised {exc.__class__.__name__}: {str(exc)[:500]}")
        call.output = _result_text(result)


def _refuse(call: Any, why: str) -> None:
    call.error = why
    call.output = json.dumps({"error": why}, ensure_ascii=False)


def _result_text(result: Any) -> str:
    if isinstance(result, str):
        text = result
    else:
        try:
            text = json.dumps(result, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(result)
    return text if len(text) <= MAX_RESULT else text[:MAX_RESULT] + f"... [cut: {len(text)} characters in all]"


def _arguments_model(function: Callable[..., Any], name: str) -> Any:
    import pydantic

    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        raise ConfigurationError(f"tools: Python cannot read the signature of {name}; wrap it in a def.") from None
    try:
        hints = __import__("typing").get_type_hints(function)
    except Exception:  # an annotation that does not resolve: its text stands, pydantic decides
        hints = {}
    fields: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise ConfigurationError(f"tools: {name} has a positional-only parameter ({parameter.name}); the model "
                                     "passes arguments by name.")
        annotation = hints.get(parameter.name, parameter.annotation)
        annotation = Any if annotation is inspect.Parameter.empty else annotation
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (annotation, default)
    try:
        model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid",
                                                                                         arbitrary_types_allowed=False),
                                      **fields)
        model.model_json_schema()
    except Exception as exc:
        raise ConfigurationError(f"tools: {name}'s parameters cannot be described as JSON "
                                 f"({exc.__class__.__name__}: {str(exc)[:200]}). Annotate them with JSON-friendly "
                                 "types (str, int, float, bool, list, dict, a pydantic model).") from None
    return model


def toolbox_of(spec: Any) -> Toolbox | None:
    """The `Toolbox` for ``tools=``: a list of functions (or a `Toolbox`), or None."""
    if spec is None or isinstance(spec, Toolbox):
        return spec or None
    if callable(spec):
        spec = [spec]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise SettingError("tools takes a list of functions, e.g. tools=[weather, lookup] (from %%dbllm: "
                           "--tools weather,lookup).")
    return Toolbox([Tool.of(f) for f in spec]) or None


def toolbox_named(names: Sequence[str], namespace: Mapping[str, Any]) -> Toolbox | None:
    """The `Toolbox` that ``--tools f,g`` means: the functions so named in the notebook (a dotted
    name reaches an attribute: ``helpers.lookup``), looked up once, here."""
    tools = []
    for written in names:
        for name in (n.strip() for n in written.split(",")):
            if not name:
                continue
            try:
                obj = lookup(name, namespace)
            except Unresolved as exc:
                if exc.where is not None:
                    raise SettingError(f"--tools {name}: {exc}.") from None
                raise SettingError(f"--tools {name}: the notebook has no function {exc.head!r}. Define it first "
                                   f"(def {exc.head}(...): ...).") from None
            if not callable(obj) or isinstance(obj, type):
                raise SettingError(f"--tools {name} is {type(obj).__name__}, not a function.")
            tools.append(Tool.of(obj, name.split(".")[-1]))
    return Toolbox(tools) if tools else None
