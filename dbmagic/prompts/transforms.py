"""Transforms are plain callables in the notebook, found by name and checked once.

``transform_input(**request) -> request`` and ``transform_output(value) -> value``, with the meaning
of LangChain's ``transform_input_fn``/``transform_output_fn``. Dotted names (``helpers.clean``)
are allowed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import TransformError
from .namespace import Unresolved, lookup

__all__ = ["resolve_transform", "callables_in", "apply_input", "apply_output", "name_of"]

def resolve_transform(name: str | None, namespace: Mapping[str, Any], role: str) -> Callable[..., Any] | None:
    """The callable called ``name`` in ``namespace`` (``role`` is ``transform_input`` or
    ``transform_output``, for the messages), or None when no name is given."""
    if not name:
        return None
    try:
        obj = lookup(name, namespace)
    except Unresolved as exc:
        if exc.where is not None:
            raise TransformError(f"{role} {name!r}: {exc}.", transform=name) from None
        example = "def {}(**request): ...; return request" if role == "transform_input" else "def {}(value): ..."
        raise TransformError(
            f"{role} {name!r} is not defined in the notebook. Define it first, e.g. `{example.format(exc.head)}`.",
            transform=name,
        ) from None
    if not callable(obj):
        raise TransformError(
            f"{role} {name!r} is a {type(obj).__name__}, not a function. Name a function defined in the notebook.",
            transform=name,
        )
    _check_signature(obj, name, role)
    return obj


def _check_signature(fn: Callable[..., Any], name: str, role: str) -> None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    kinds = {p.kind for p in params}
    if role == "transform_input":
        if inspect.Parameter.VAR_KEYWORD not in kinds and not any(p.name == "prompt" for p in params):
            raise TransformError(
                f"transform_input {name!r} must take the request as keyword arguments: "
                f"`def {name.split('.')[-1]}(**request): ...; return request`.",
                transform=name,
            )
    else:
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        required = [p for p in positional if p.default is p.empty and p.kind != p.VAR_POSITIONAL]
        if not positional or len(required) > 1:
            raise TransformError(
                f"transform_output {name!r} must take exactly one argument, the answer: "
                f"`def {name.split('.')[-1]}(value): ...`.",
                transform=name,
            )



def callables_in(namespace: Mapping[str, Any]) -> list[str]:
    """Names of the user's own functions in ``namespace``, for the panel's transform pickers:
    no private names, classes, modules or IPython's helpers."""
    import types

    hidden = {"exit", "quit", "get_ipython", "open"}
    names = []
    for key, value in namespace.items():
        if key.startswith("_") or key in hidden or isinstance(value, (type, types.ModuleType)):
            continue
        if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
            names.append(key)
    return sorted(names)


def apply_input(transform: Callable[..., Any], request: dict[str, Any]) -> dict[str, Any]:
    """``transform(**request)``, which must give the request back (a dict); a `TransformError` that
    names the function otherwise (its own traceback is the error's cause)."""
    name = name_of(transform)
    try:
        result = transform(**request)
    except Exception as exc:
        raise TransformError(
            f"transform_input {name!r} raised {exc.__class__.__name__}: {exc}. "
            "Fix the function (its traceback is shown with this message) or run without it.",
            transform=name,
        ) from exc
    if not isinstance(result, dict):
        raise TransformError(
            f"transform_input {name!r} returned {type(result).__name__}, not a dict. "
            "It must return the request, e.g. `def f(**request): ...; return request`.",
            transform=name,
        )
    return result


def apply_output(transform: Callable[..., Any], value: Any) -> Any:
    """``transform(value)``; a `TransformError` that names the function when it raises."""
    name = name_of(transform)
    try:
        return transform(value)
    except Exception as exc:
        raise TransformError(
            f"transform_output {name!r} raised {exc.__class__.__name__}: {exc}. "
            "Fix the function (its traceback is shown with this message) or run without it.",
            transform=name,
        ) from exc


def name_of(fn: Any) -> str:
    """A function's name as messages give it (``helpers.clean``)."""
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
