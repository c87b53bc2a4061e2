"""Rendering third-party prompt text (the MLflow Prompt Registry) as data, never as code.

A registry prompt is text someone else wrote. One that uses ``{% %}`` renders here (the others are
filled by plain substitution, as MLflow fills them: `dbmagic.templating.RegistryTemplate`), with
only the variables it declares, each a plain data value (`plain`), in a Jinja2 environment cut down
to what a prompt needs: ``{{ }}`` substitutions, ``{% if %}``, ``{% for %}``, whitelisted filters
and a few read-only methods of text and dicts. There is no ``{% set %}``, no macros, no includes, no
calls of anything else, and every value it builds, every loop and the whole output are bounded
(`LIMITS`), so it can neither run code in the kernel nor exhaust its memory or time.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import operator
import threading
import time
from typing import Any

from ..errors import with_article

__all__ = ["LIMITS", "Limited", "plain", "compile_untrusted", "render_untrusted", "RESERVED"]

LIMITS = {"chars": 2_000_000, "loop items": 100_000, "seconds": 5.0, "source chars": 200_000, "depth": 32}

# IPython's own names: a registry prompt that declares one does not get the notebook's history
RESERVED = frozenset({"In", "Out", "get_ipython", "exit", "quit"})

_FILTERS = frozenset({
    "abs", "capitalize", "count", "d", "default", "dictsort", "e", "escape", "first", "float", "int", "items",
    "join", "last", "length", "list", "lower", "map", "max", "min", "reject", "rejectattr", "replace", "reverse",
    "round", "select", "selectattr", "sort", "string", "striptags", "sum", "title", "tojson", "trim",
    "truncate", "unique", "upper", "wordcount",
})
_METHODS = {
    str: frozenset({"upper", "lower", "title", "capitalize", "casefold", "strip", "lstrip", "rstrip", "split",
                    "rsplit", "splitlines", "startswith", "endswith", "count", "find", "rfind", "isdigit",
                    "isalpha", "isalnum", "isspace", "islower", "isupper", "removeprefix", "removesuffix"}),
    dict: frozenset({"items", "keys", "values", "get"}),
    list: frozenset({"count", "index"}),
    tuple: frozenset({"count", "index"}),
}
_GLOBALS = ("range", "dict", "joiner", "cycler")  # Jinja's own, less lipsum (text) and namespace (state)


class Limited(Exception):
    """A registry prompt went past one of `LIMITS` or used what registry prompts cannot."""


# -- plain data -------------------------------------------------------------------------------------

def plain(value: Any, name: str, _depth: int = 0, _seen: frozenset[int] = frozenset()) -> Any:
    """``value`` as plain data (str, int, float, bool, None, lists and str-keyed dicts of them), or
    `Limited` naming ``name``: a registry prompt never receives an object, a function or a module."""
    kind = type(value)
    if value is None or kind in (str, int, float, bool):
        return value
    if _depth > LIMITS["depth"]:
        raise Limited(f"its variable {name!r} is nested more than {LIMITS['depth']} levels deep")
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):  # a subclass: its text, without its methods
        return "".join((value,))
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if kind.__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return plain(value.item(), name, _depth + 1, _seen)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (list, tuple, dict)):
        if id(value) in _seen:
            raise Limited(f"its variable {name!r} contains itself")
        seen = _seen | {id(value)}
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if type(key) is not str:
                    raise Limited(f"its variable {name!r} is a dict with a key that is not text ({key!r:.40})")
                out[key] = plain(item, f"{name}[{key!r}]", _depth + 1, seen)
            return out
        return [plain(item, f"{name}[{i}]", _depth + 1, seen) for i, item in enumerate(value)]
    raise Limited(
        f"its variable {name!r} is {with_article(kind.__name__)}, and a registry prompt takes plain data only (text, "
        "numbers, True/False, None, and lists and dicts of them), never objects, functions or modules"
    )


def _weight(value: Any, budget: int) -> int:
    """Roughly the characters ``value`` comes to as text, counting a shared part each time it
    appears; stops counting past ``budget``."""
    total, stack = 0, [value]
    while stack and total <= budget:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += 2 + len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, range):
            total += 8 * len(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _bounded(value: Any) -> Any:
    if _weight(value, LIMITS["chars"]) > LIMITS["chars"]:
        raise Limited(f"it builds a value of more than {LIMITS['chars']:,} characters")
    return value


# -- the environment --------------------------------------------------------------------------------

class _Budget(threading.local):
    items = 0
    deadline = 0.0


_budget = _Budget()


def _in_time() -> None:
    if time.monotonic() > _budget.deadline:
        raise Limited(f"it took longer than {LIMITS['seconds']:g} s to render")


def _tick() -> None:
    _budget.items += 1
    if _budget.items > LIMITS["loop items"]:
        raise Limited(f"it loops over more than {LIMITS['loop items']:,} items")
    _in_time()


def _each(iterable: Any) -> Any:
    """A ``{% for %}`` loop's items, each counted and bounded."""
    for item in iterable:
        _tick()
        yield _bounded(item)


def _concat(items: list[Any]) -> str:
    _bounded(items)
    return "".join(map(str, items))


_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
              "//": operator.floordiv, "%": operator.mod, "**": operator.pow}


def _binop(operator_name: str, left: Any, right: Any) -> Any:
    numbers = all(isinstance(v, (int, float)) for v in (left, right))
    if operator_name == "**":
        if not numbers or abs(right) > 64 or (isinstance(left, int) and left.bit_length() * abs(right) > 4096):
            raise Limited("it raises to a power past what a prompt needs")
    elif operator_name == "*":
        if isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple)):
            seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if not isinstance(n, int) or len(seq) * max(n, 0) > LIMITS["chars"]:
                raise Limited(f"it repeats a value past {LIMITS['chars']:,} characters")
        elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4096:
            raise Limited("it multiplies numbers past what a prompt needs")
    elif operator_name == "%" and not numbers:
        raise Limited("it formats text with %, which registry prompts cannot use (write {{ }} instead)")
    return _bounded(_OPERATORS[operator_name](left, right))


def _estimate(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, before it runs, a filter whose output would grow faster than its input."""
    if name == "join" and args:
        items = args[0]
        sep = kwargs.get("d", args[1] if len(args) > 1 else "")
        if isinstance(sep, str) and hasattr(items, "__len__") and len(items) * len(sep) > LIMITS["chars"]:
            raise Limited(f"it joins past {LIMITS['chars']:,} characters")
    if name == "replace" and len(args) >= 3 and isinstance(args[0], str):
        text, old, new = str(args[0]), str(args[1]), str(args[2])
        hits = text.count(old) if old else len(text) + 1
        if len(text) + hits * len(new) > LIMITS["chars"]:
            raise Limited(f"it replaces text past {LIMITS['chars']:,} characters")


def _wrap_filter(name: str, function: Any) -> Any:
    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        plain_args = tuple(a for a in args if not hasattr(a, "environment"))  # less a context/environment
        _estimate(name, plain_args, kwargs)
        return _bounded(function(*args, **kwargs))

    return bounded


def _callable_ok(obj: Any, safe_range: Any) -> bool:
    if obj is safe_range or obj is dict:
        return True
    owner = getattr(obj, "__self__", None)
    methods = _METHODS.get(type(owner))
    if methods is not None:
        return getattr(obj, "__name__", "") in methods
    from jinja2.runtime import LoopContext
    from jinja2.utils import Cycler, Joiner

    return isinstance(owner, (LoopContext, Cycler)) or isinstance(obj, Joiner)


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2
    import jinja2.sandbox

    class Environment(jinja2.sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _binop(operator, left, right)

        def wrap_str_format(self, value: Any) -> None:
            return None  # str.format is not callable here at all (see call)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            if isinstance(__obj, jinja2.Undefined):
                __obj()  # `lipsum(...)`: a name it does not have; calling an Undefined raises its error
            if not _callable_ok(__obj, jinja2.sandbox.safe_range):
                raise Limited(f"it calls {getattr(__obj, '__name__', type(__obj).__name__)}(), which registry "
                              "prompts cannot call")
            return _bounded(super().call(__context, __obj, *args, **kwargs))

    # as MLflow's PromptVersion.format makes its environment: an undefined name renders as nothing,
    # a trailing newline is dropped (Jinja2's defaults)
    env = Environment(undefined=jinja2.Undefined, autoescape=False, finalize=_bounded)
    env.globals = {name: env.globals[name] for name in _GLOBALS if name in env.globals}
    env.filters = {name: _wrap_filter(name, f) for name, f in env.filters.items() if name in _FILTERS}
    env.filters.update({"_dbmagic_each": _each, "_dbmagic_concat": _concat, "_dbmagic_value": _bounded})
    return env


_REFUSED = {
    "Assign": "{% set %}", "AssignBlock": "{% set %}", "With": "{% with %}", "Macro": "{% macro %}",
    "CallBlock": "{% call %}", "Include": "{% include %}", "Import": "{% import %}", "FromImport": "{% from %}",
    "Extends": "{% extends %}", "Block": "{% block %}", "FilterBlock": "{% filter %}",
    "ScopedEvalContextModifier": "{% autoescape %}", "EvalContextModifier": "{% autoescape %}",
}


def compile_untrusted(source: str) -> tuple[Any, frozenset[str]]:
    """``(compiled template, the names it declares)``; `Limited` for what registry prompts cannot use.
    `jinja2.TemplateSyntaxError` passes through."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    from .jinja import declared, parse

    if len(source) > LIMITS["source chars"]:
        raise Limited(f"it is longer than {LIMITS['source chars']:,} characters")
    env = _environment()
    tree = parse(env, source)
    for node in tree.find_all(nodes.Node):
        what = _REFUSED.get(type(node).__name__)
        if what is None and isinstance(node, nodes.For) and node.recursive:
            what = "a recursive {% for %}"
        if what:
            raise Limited(f"it uses {what} (line {node.lineno}), which registry prompts cannot use: they take "
                          "{{ }}, {% if %}, {% for %} and filters")
    names = declared(env, tree) - set(_GLOBALS)

    def filtered(node: Any, name: str) -> Any:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    class Bound(NodeTransformer):
        def visit_For(self, node: Any) -> Any:
            self.generic_visit(node)
            node.iter = filtered(node.iter, "_dbmagic_each")
            return node

        def visit_Concat(self, node: Any) -> Any:
            self.generic_visit(node)
            return filtered(nodes.List(node.nodes, lineno=node.lineno), "_dbmagic_concat")

        def visit_List(self, node: Any) -> Any:  # a literal built in the template: bounded too
            self.generic_visit(node)
            return filtered(node, "_dbmagic_value")

        visit_Dict = visit_List

        def visit_Tuple(self, node: Any) -> Any:
            return self.visit_List(node) if node.ctx == "load" else node

    Bound().visit(tree)
    return env.from_string(tree), names


def render_untrusted(compiled: Any, values: dict[str, Any]) -> str:
    """Render with a budget: `Limited` past the output size, the loop items or the time of `LIMITS`."""
    from .jinja import with_self

    _budget.items, _budget.deadline = 0, time.monotonic() + LIMITS["seconds"]
    pieces, size = [], 0
    for piece in compiled.generate(with_self(values)):
        size += len(piece)
        if size > LIMITS["chars"]:
            raise Limited(f"it renders more than {LIMITS['chars']:,} characters")
        _in_time()
        pieces.append(piece)
    return "".join(pieces)
