"""A JSON Schema is data: checked before anything is sent, validated in bounded time, nothing fetched.

A schema can be third-party text (a registry prompt's ``response_format``), so `validator_for`
makes a validator that reads only the schema itself:

- **References stay inside the schema.** Every ``$ref`` (``$dynamicRef``, ``$recursiveRef``)
  must be a fragment of this document (``#``, ``#/$defs/Name``, ``#anchor``); any other (a file,
  a URL, another document) is refused, naming it. The validator's registry can retrieve nothing
  (a ``referencing.Registry`` with no retrieval: jsonschema's default would read ``file://`` and
  GET ``http(s)://``). Every reference must resolve, and none may lead back to itself without
  reading any of the answer (``{"$ref": "#"}`` at the root, ``allOf`` of itself): both are refused
  here, before the paid call, rather than failing after it with jsonschema's own errors.
- **Patterns run in linear time.** ``pattern``, ``patternProperties`` and the patterns
  ``additionalProperties`` reads go through RE2 (google-re2), which never backtracks, so no
  answer can make a pattern run for hours; a pattern RE2 cannot compile (back-references,
  look-around) is refused before sending, naming its field.
- **Validation is bounded in time**: past `SECONDS` (a combinator-heavy schema against a large
  answer) it stops with a `SchemaError` rather than holding the kernel, and it runs as Python
  code, so Ctrl-C stops it.

The same limits hold for the short form and pydantic models (pydantic validates a model's answer
in its own linear-time engine).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import SchemaError, SettingError

__all__ = ["validator_for", "first_error", "field_path", "check_size", "SECONDS", "MAX_DEPTH", "MAX_VALUES"]

SECONDS = 1.0  # how long the validation of one answer may take
MAX_DEPTH = 64  # how deeply subschemas may nest
MAX_VALUES = 100_000  # how many JSON values a schema may hold (a dict built in Python counts each time it appears)

# where JSON Schema keeps subschemas: one schema, a list of them, a map of them (every draft's names)
_ONE = ("additionalItems", "additionalProperties", "contains", "else", "if", "items", "not", "propertyNames",
        "then", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("$defs", "definitions", "dependentSchemas", "dependencies", "patternProperties", "properties")
# the keywords that apply another schema to the same value (what can go round in a circle)
_SAME_VALUE_ONE = ("not", "if", "then", "else")
_SAME_VALUE_MANY = ("allOf", "anyOf", "oneOf")
_REFS = ("$ref", "$dynamicRef", "$recursiveRef")


def _subschemas(node: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(keyword path, subschema)`` for each subschema directly under ``node``."""
    for key in _ONE:
        if isinstance(node.get(key), (dict, bool)):
            yield key, node[key]
    for key in _MANY:
        if isinstance(node.get(key), list):
            for i, sub in enumerate(node[key]):
                yield f"{key}[{i}]", sub
    for key in _MAP:
        if isinstance(node.get(key), dict):
            for name, sub in node[key].items():
                if isinstance(sub, (dict, bool)):
                    yield f"{key}.{name}", sub


def _walk(root: dict[str, Any], shown: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path, schema object)`` for the root and every subschema, depth first, bounded."""
    stack: list[tuple[str, Any, int]] = [("", root, 0)]
    seen: set[int] = set()  # a dict built in Python may sit in two places: it is one schema, walked once
    while stack:
        path, node, depth = stack.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        if depth > MAX_DEPTH:
            raise SettingError(f"The schema {shown} nests subschemas more than {MAX_DEPTH} deep (at {path}): "
                               "flatten it, or use the short form.")
        yield path or "(root)", node
        stack.extend((f"{path}.{key}" if path else key, sub, depth + 1) for key, sub in _subschemas(node))


def _pointer(root: Any, ref: str) -> Any:
    """The node a ``#/a/b`` JSON Pointer names in ``root`` (percent and ``~0``/``~1`` escapes read), or
    a KeyError."""
    from urllib.parse import unquote

    node = root
    for raw in ref[2:].split("/") if ref != "#/" else [""]:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(part)
    return node


def _target(root: dict[str, Any], anchors: dict[str, dict[str, Any]], ref: str) -> Any:
    if ref == "#":
        return root
    if ref.startswith("#/"):
        return _pointer(root, ref)
    return anchors[ref[1:]]  # a plain-name fragment: an $anchor (or $dynamicAnchor)


def check_references(root: dict[str, Any], shown: str) -> None:
    """Refuse, before anything is sent, a reference outside the schema, one that does not resolve,
    and references that go round in a circle without reading any of the answer."""
    nodes = list(_walk(root, shown))
    anchors: dict[str, dict[str, Any]] = {}
    for path, node in nodes:
        for key in ("$id", "id"):
            if key in node and path != "(root)" and isinstance(node[key], str) and not node[key].startswith("#"):
                raise SettingError(f"The schema {shown} gives {path} its own {key} ({node[key][:80]!r}): dbmagic "
                                   "reads a schema as one document, with references inside it only. Use $defs "
                                   "and #/$defs/... references.")
        for key in ("$anchor", "$dynamicAnchor"):
            if isinstance(node.get(key), str):
                anchors[node[key]] = node
    targets: dict[int, list[tuple[str, dict[str, Any]]]] = {}
    for path, node in nodes:
        for key in _REFS:
            ref = node.get(key)
            if ref is None:
                continue
            if not isinstance(ref, str) or not ref.startswith("#"):
                raise SettingError(f"The schema {shown} refers to {str(ref)[:120]!r} ({path}.{key}), outside the "
                                   "schema: dbmagic never reads files or URLs for a schema. Put the definition in "
                                   "the schema's $defs and refer to it as #/$defs/Name.")
            try:
                target = _target(root, anchors, ref)
            except (KeyError, IndexError):
                raise SettingError(f"The schema {shown} refers to {ref[:120]!r} ({path}.{key}), which is not in "
                                   "the schema: define it (under $defs), or fix the reference.") from None
            if not isinstance(target, (dict, bool)):
                raise SettingError(f"The schema {shown} refers to {ref[:120]!r} ({path}.{key}), which is not a "
                                   "schema.")
            if isinstance(target, dict):
                targets.setdefault(id(node), []).append((f"{path}.{key} {ref!r}", target))
    _refuse_circles(nodes, targets, shown)


def _refuse_circles(nodes: list[tuple[str, dict[str, Any]]], targets: dict[int, list[tuple[str, dict[str, Any]]]],
                    shown: str) -> None:
    """A schema that applies itself to the same value again (through references and ``allOf``,
    ``anyOf``, ``oneOf``, ``not``, ``if``/``then``/``else``) never ends: refused, naming the way round."""
    def same_value(node: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        out = list(targets.get(id(node), ()))
        for key in _SAME_VALUE_ONE:
            if isinstance(node.get(key), dict):
                out.append((key, node[key]))
        for key in _SAME_VALUE_MANY:
            for i, sub in enumerate(node.get(key) or () if isinstance(node.get(key), list) else ()):
                if isinstance(sub, dict):
                    out.append((f"{key}[{i}]", sub))
        return out

    done: set[int] = set()
    for path, start in nodes:
        if id(start) in done:
            continue
        # iterative depth-first search; `on_path` holds the nodes of the current way down
        on_path: dict[int, str] = {id(start): path}
        stack: list[tuple[dict[str, Any], Iterator[tuple[str, dict[str, Any]]]]] = [(start, iter(same_value(start)))]
        while stack:
            node, edges = stack[-1]
            step = next(edges, None)
            if step is None:
                stack.pop()
                on_path.pop(id(node), None)
                done.add(id(node))
                continue
            how, nxt = step
            if id(nxt) in on_path:
                raise SettingError(f"The schema {shown} goes round in a circle ({on_path[id(node)]}: {how} leads "
                                   "back to where it started without reading any of the answer), so no answer "
                                   "could ever be checked. Fix the reference.")
            if id(nxt) not in done:
                on_path[id(nxt)] = how
                stack.append((nxt, iter(same_value(nxt))))


def check_size(root: Any, shown: str) -> None:
    """Refuse a schema of more than `MAX_VALUES` values, as JSON would write it (so a Python dict
    shared by many places cannot make the metaschema's check run for ever)."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SettingError(f"The schema {shown} is too large (more than {MAX_VALUES:,} values): use a "
                               "smaller one.")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


# -- patterns in RE2 ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _re2(pattern: str) -> Any:
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would print every refused pattern to the kernel's stderr
    return re2.compile(pattern, options)


def check_patterns(root: dict[str, Any], shown: str) -> None:
    """Every pattern the schema holds must compile in RE2 (no back-references, no look-around)."""
    for path, node in _walk(root, shown):
        patterns = [(f"{path}.pattern", node["pattern"])] if isinstance(node.get("pattern"), str) else []
        if isinstance(node.get("patternProperties"), dict):
            patterns += [(f"{path}.patternProperties", p) for p in node["patternProperties"]]
        for where, pattern in patterns:
            try:
                _re2(pattern)
            except Exception as exc:  # re2.error: what RE2 cannot run in linear time, or a malformed pattern
                why = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                raise SettingError(f"The schema {shown} has the pattern {pattern[:80]!r} ({where}), which dbmagic "
                                   f"cannot check in bounded time ({why}): back-references and look-around are not "
                                   "supported. Rewrite it without them, or drop it.") from None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if validator.is_type(instance, "string") and not _re2(pattern).search(instance):
        yield ValidationError(f"{instance[:80]!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        compiled = _re2(pattern)
        for key, value in instance.items():
            if compiled.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[Any]:
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "object"):
        return
    named = schema.get("properties", {})
    patterns = [_re2(p) for p in schema.get("patternProperties", {})]
    extras = [k for k in instance if k not in named and not any(p.search(k) for p in patterns)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        listed = ", ".join(repr(e) for e in sorted(extras)[:5])
        yield ValidationError(f"Additional properties are not allowed ({listed} {'was' if len(extras) == 1 else 'were'} "
                              "unexpected)")


# -- bounded validation ----------------------------------------------------------------------------

class _Deadline(threading.local):
    until = float("inf")


_deadline = _Deadline()


class _TooSlow(Exception):
    pass


def _bounded(keyword: Any) -> Any:
    def checked(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if time.monotonic() > _deadline.until:
            raise _TooSlow
        return keyword(validator, value, instance, schema) or iter(())

    return checked


@functools.lru_cache(maxsize=16)
def _bounded_class(cls: type) -> type:
    from jsonschema import validators

    keywords = dict(cls.VALIDATORS)
    keywords.update(pattern=_pattern, patternProperties=_pattern_properties)
    if "additionalProperties" in keywords:
        keywords["additionalProperties"] = _additional_properties
    return validators.extend(cls, {name: _bounded(fn) for name, fn in keywords.items()})


def validator_for(json_schema: dict[str, Any], shown: str) -> Any:
    """A validator for ``json_schema`` that reads nothing outside it, runs patterns in RE2 and
    stops after `SECONDS`; a `SettingError` (before anything is sent) for a schema it cannot be."""
    import jsonschema
    from referencing import Registry

    try:
        check_size(json_schema, shown)
        check_references(json_schema, shown)
        keys = {key for _, node in _walk(json_schema, shown) for key in node}
        if {"unevaluatedProperties", "patternProperties"} <= keys:
            raise SettingError(f"The schema {shown} combines unevaluatedProperties with patternProperties, which "
                               "dbmagic cannot check in bounded time: use additionalProperties instead.")
        check_patterns(json_schema, shown)
        cls = jsonschema.validators.validator_for(json_schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(json_schema)
    except jsonschema.SchemaError as exc:
        raise SettingError(f"The schema {shown} is not valid JSON Schema: {exc.message[:200]}. Fix it, or use the "
                           "short form.") from None
    except RecursionError:
        raise SettingError(f"The schema {shown} is nested too deeply.") from None
    # no retrieval: a reference the schema does not hold is Unresolvable, never fetched nor read
    return _bounded_class(cls)(json_schema, registry=Registry())


def first_error(validator: Any, data: Any, seconds: float = SECONDS) -> tuple[str | None, str] | None:
    """``(path of the field, what is wrong)`` for the first problem of ``data``, or None when it
    fits; a `SchemaError` when checking takes longer than ``seconds``."""
    from jsonschema.exceptions import best_match

    _deadline.until = time.monotonic() + seconds
    try:
        if validator.is_valid(data):  # the common case, without collecting errors
            return None
        error = best_match(validator.iter_errors(data))
    except _TooSlow:
        raise SchemaError(f"Checking the answer against the schema took longer than {seconds:g} s, so it was "
                          "stopped: simplify the schema (fewer anyOf/oneOf), or ask for a shorter answer.",
                          problem=f"checking took longer than {seconds:g} s") from None
    except RecursionError:
        raise SchemaError("The answer is nested too deeply to check against the schema.",
                          problem="nested too deeply") from None
    finally:
        _deadline.until = float("inf")
    if error is None:
        return None
    return (field_path(error.absolute_path) or None), error.message[:300]


def field_path(parts: Any) -> str:
    """``tags[1]``, ``address.city``: where in the answer a problem is."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
