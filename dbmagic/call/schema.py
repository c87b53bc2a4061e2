"""Schemas for answers: ``--schema S``, ``schema=S``. The answer comes back as data, checked.

``S`` is one of:

- a **Pydantic model** (``class Ticket(BaseModel): label: str; score: float``): the answer's
  value is a ``Ticket``, validated by pydantic; ``%%dbllm --schema Ticket`` names the class in the
  notebook;
- a **JSON Schema** dict (``{"type": "object", "properties": {...}}``, or the ``{"name", "schema",
  "strict"}`` object the OpenAI API takes): the value is a dict, validated by ``jsonschema``;
- the **short form**, for the common case: ``"label: str, score: float, tags: list[str], reason: str?"``.
  Types: ``str``, ``int``, ``float``, ``bool``, ``list[T]``, a choice of quoted words
  (``'pos'|'neg'|'neutral'``); ``?`` after a type makes the field optional (it may be null or left
  out). Every field is required otherwise, and no other field is allowed.

How it reaches the endpoint (`dbmagic.call.wire.with_schema`): chat endpoints get
``response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``,
Responses agents ``text.format``; completions endpoints, custom models, ChatAgents and driver-proxy
apps cannot take a schema, so it is written into the prompt as an instruction, and the answer is
read and checked the same way. The answer's JSON is found in its text (a code fence and prose
around it are tolerated), then validated; an answer that does not fit is a `SchemaError` that
keeps the raw text and names the field.

This module imports nothing heavy: pydantic and jsonschema load when a schema is first used.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SchemaError, SettingError
from ..prompts.namespace import Unresolved, lookup
from ..settings import is_dotted
from .jsonschema import check_size, field_path, first_error, validator_for

__all__ = ["Schema", "schema_of", "schema_named", "extract_json", "retry_note", "INSTRUCTION", "RETRY_NOTE",
           "SHORT_FORM_EXAMPLE"]

SHORT_FORM_EXAMPLE = "label: str, score: float, tags: list[str], reason: str?"
# what a kind that cannot take a schema on the wire gets after its prompt (the local workspace reads it too)
INSTRUCTION = "Answer with only a JSON value that fits this JSON Schema, and no other text:"
# what an answer that did not fit gets as the next turn (the local workspace answers the question before it)
RETRY_NOTE = "Your answer did not fit the JSON Schema"
_SHORT_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
_NAME = re.compile(r"[^A-Za-z0-9_-]+")
_SHORT_HELP = ("the short form is NAME: TYPE, comma-separated, with TYPE one of str, int, float, bool, list[T] or "
               "'a'|'b' (a choice), and ? after a type for an optional field: e.g. " + repr(SHORT_FORM_EXAMPLE))


@dataclass(frozen=True, eq=False)
class Schema:
    """One answer schema (see the module docstring). ``json_schema`` is what goes on the wire,
    ``name`` the name it is sent under, ``model`` the pydantic class (None for a JSON Schema or the
    short form), ``source`` how it was written (for messages). Make one with `schema_of`."""

    json_schema: dict[str, Any]
    name: str = "answer"
    model: Any = None
    source: str = ""
    strict: bool = False
    _validator: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"Schema({self.source or self.name})"

    def portable(self) -> Schema:
        """The same schema checked by its JSON Schema alone (no pydantic class): what travels to a
        Spark executor, where a notebook's class may not unpickle (pydantic keeps the namespace it
        was defined in, a SparkSession included)."""
        return Schema(self.json_schema, self.name, None, self.source, self.strict) if self.model is not None else self

    def __getstate__(self) -> dict[str, Any]:  # to a Spark executor: the validator is made again there
        return {k: v for k, v in self.__dict__.items() if k != "_fields"} | {"_validator": None}

    # -- the wire ------------------------------------------------------------------------------

    def wire(self) -> dict[str, Any]:
        """``{"name", "schema", "strict"}``: the ``json_schema`` object of a chat ``response_format``
        (the Responses API's ``text.format`` takes the same keys beside ``"type"``)."""
        return {"name": self.name, "schema": self.json_schema, "strict": self.strict}

    def instruction(self) -> str:
        """The text after the prompt for an endpoint that cannot take a schema on the wire."""
        return f"{INSTRUCTION}\n{json.dumps(self.json_schema, ensure_ascii=False)}"

    # -- reading an answer ---------------------------------------------------------------------

    def parse(self, text: str, *, target: str = "the endpoint") -> Any:
        """The answer's value: its JSON found in ``text`` and validated (a model instance for a
        pydantic schema, else the JSON value); a `SchemaError` otherwise."""
        found, data = extract_json(text)
        if not found:
            problem = "it holds no JSON value" if text.strip() else "it is empty"
            raise SchemaError(f"The answer from {target} does not fit the schema {self.source or self.name}: {problem}.",
                              text=text, problem=problem)
        return self.validate(data, text=text, target=target)

    def validate(self, data: Any, *, text: str = "", target: str = "the endpoint") -> Any:
        """``data`` checked against the schema (see `parse`)."""
        if self.model is not None:
            return self._validated_by_model(data, text, target)
        if isinstance(data, dict) and self.json_schema.get("type") == "object":
            data = self._optional_filled(data)
        try:
            error = first_error(self.validator(), data)
        except SchemaError as exc:  # it took too long, or the answer is nested too deeply
            raise self._refused(None, exc.problem, text, target) from None
        if error is not None:
            path, problem = error
            raise self._refused(path, problem, text, target)
        return data

    def _validated_by_model(self, data: Any, text: str, target: str) -> Any:
        import pydantic

        try:
            return self.model.model_validate(data)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            path = field_path(first.get("loc") or ())
            raise self._refused(path or None, str(first.get("msg") or "invalid"), text, target) from None

    def _refused(self, path: str | None, problem: str, text: str, target: str) -> SchemaError:
        where = f"{path}: " if path else ""
        return SchemaError(f"The answer from {target} does not fit the schema {self.source or self.name}: "
                           f"{where}{problem}.", text=text, field=path, problem=problem)

    def _optional_filled(self, data: dict[str, Any]) -> dict[str, Any]:
        # a field that may be null may also be left out (the short form's `reason: str?`)
        missing = [k for k, s in self.fields().items() if k not in data and _nullable(s)]
        return {**data, **dict.fromkeys(missing)} if missing else data

    def validator(self) -> Any:
        """The jsonschema validator of ``json_schema`` (`dbmagic.call.jsonschema.validator_for`: nothing
        outside the schema is read, patterns run in RE2, checking is bounded in time), made once."""
        if self._validator is None:
            object.__setattr__(self, "_validator", validator_for(self.json_schema, self.source or self.name))
        return self._validator

    # -- columns -------------------------------------------------------------------------------

    def fields(self) -> dict[str, dict[str, Any]]:
        """The top-level fields and their (resolved) schemas, in order; empty when the answer is
        not an object."""
        found = self.__dict__.get("_fields")
        if found is None:
            found = self._fields_of()
            object.__setattr__(self, "_fields", found)
        return found

    def _fields_of(self) -> dict[str, dict[str, Any]]:
        root = self.resolve(self.json_schema)
        if root.get("type") != "object" and "properties" not in root:
            return {}
        return {name: self.resolve(s) for name, s in (root.get("properties") or {}).items()}

    def resolve(self, node: Any) -> dict[str, Any]:
        """``node`` with a local ``$ref`` (``#/$defs/Name``, as pydantic writes nested models) followed."""
        seen = 0
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 32:
            ref = node["$ref"]
            target: Any = self.json_schema
            for part in ref.lstrip("#/").split("/") if ref.startswith("#/") else ():
                target = target.get(part, {}) if isinstance(target, dict) else {}
            node, seen = ({**target, **{k: v for k, v in node.items() if k != "$ref"}} if ref.startswith("#/") else {},
                          seen + 1)
        return node if isinstance(node, dict) else {}

    def record(self, value: Any) -> dict[str, Any]:
        """The top-level fields of a parsed value, as plain data (a model is dumped)."""
        if self.model is not None and hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        return dict(value) if isinstance(value, Mapping) else {}


def kind_of(node: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """``(JSON type, the schema of that type)`` of a field, looking through ``null`` alternatives
    (``["string", "null"]``, ``anyOf: [{...}, {"type": "null"}]``): ``string``, ``integer``,
    ``number``, ``boolean``, ``array``, ``object``, or None when it is not one type."""
    if "enum" in node and "type" not in node:
        values = [v for v in node["enum"] if v is not None]
        types = {_json_type(v) for v in values}
        return (types.pop() if len(types) == 1 else None), node
    typed = node.get("type")
    if isinstance(typed, list):
        named = [t for t in typed if t != "null"]
        return (named[0] if len(named) == 1 else None), node
    if isinstance(typed, str):
        return typed, node
    for key in ("anyOf", "oneOf"):
        options = [o for o in node.get(key) or () if isinstance(o, dict) and o.get("type") != "null"]
        if len(options) == 1:
            return options[0].get("type") if "$ref" not in options[0] else "object", options[0]
    if "properties" in node:
        return "object", node
    return None, node


def _nullable(node: Mapping[str, Any]) -> bool:
    typed = node.get("type")
    if typed == "null" or (isinstance(typed, list) and "null" in typed):
        return True
    return any(isinstance(o, dict) and o.get("type") == "null" for o in node.get("anyOf") or node.get("oneOf") or ())


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), "object")


def retry_note(error: SchemaError) -> str:
    """The turn that asks again for an answer that did not fit (``--schema-retries``)."""
    where = f"{error.field}: " if error.field else ""
    return f"{RETRY_NOTE} ({where}{error.problem}). Answer again with only JSON that fits the schema."


# -- finding the JSON in an answer ----------------------------------------------------------------

_FENCED = re.compile(r"```[ \t]*(?:json[c5]?|JSON)?[ \t]*\n(.*?)(?:```|\Z)", re.S)
_MAX_STARTS = 64  # where a JSON value may start, tried in order: bounded, so prose cannot make it slow


def extract_json(text: str) -> tuple[bool, Any]:
    """``(True, value)`` for the JSON an answer holds, else ``(False, None)``: the whole text, a
    fenced block (```` ```json ````), or the first object or array in it (prose before or after)."""
    stripped = text.strip()
    if not stripped:
        return False, None
    try:
        return True, json.loads(stripped)
    except (ValueError, RecursionError):
        pass
    for match in _FENCED.finditer(stripped):
        try:
            return True, json.loads(match.group(1))
        except (ValueError, RecursionError):
            continue
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[\[{]", stripped)][:_MAX_STARTS]
    for start in starts:
        try:
            value, _ = decoder.raw_decode(stripped, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, (dict, list)):
            return True, value
    return False, None


# -- making one ---------------------------------------------------------------------------------

def schema_of(spec: Any) -> Schema | None:
    """The `Schema` for what ``schema=`` was given: a pydantic model class, a JSON Schema dict (or
    ``{"name", "schema", "strict"}``), the short form (a str), a `Schema`, or None."""
    if spec is None or isinstance(spec, Schema):
        return spec
    if isinstance(spec, type) and callable(getattr(spec, "model_json_schema", None)) \
            and callable(getattr(spec, "model_validate", None)):
        return _from_model(spec)
    if isinstance(spec, Mapping):
        return _from_dict(dict(spec), "given")
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            return _from_dict(_json_schema_text(text), "given")
        if is_dotted(text):
            raise SettingError(f"schema {text!r} is a name, not a schema: from Python pass the class itself "
                               f"(schema={text}), a JSON Schema dict, or the short form ({SHORT_FORM_EXAMPLE!r}).")
        return _from_short(text)
    raise SettingError(f"schema takes a pydantic model class, a JSON Schema dict or the short form "
                       f"({SHORT_FORM_EXAMPLE!r}); got {type(spec).__name__}.")


def schema_named(text: str | None, namespace: Mapping[str, Any]) -> Schema | None:
    """The `Schema` that ``--schema TEXT`` (``%config DbLLM.schema``, the panel) means: a name
    (``Ticket``, ``models.Ticket``) is a pydantic model or JSON Schema dict in the notebook; text
    starting with ``{`` is a JSON Schema; anything else is the short form."""
    if not text or not text.strip():
        return None
    text = text.strip()
    if not is_dotted(text):
        return schema_of(text)
    try:
        obj = lookup(text, namespace)
    except Unresolved as exc:
        if exc.where is not None:
            raise SettingError(f"schema {text!r}: {exc}.") from None
        raise SettingError(f"schema {text!r} is not defined in the notebook: define a pydantic model (class "
                           f"{exc.head}(BaseModel): ...) or a JSON Schema dict first, or write the short form, e.g. "
                           f"--schema {SHORT_FORM_EXAMPLE!r}.") from None
    if isinstance(obj, str) or not (isinstance(obj, (Mapping, Schema)) or isinstance(obj, type)):
        raise SettingError(f"schema {text!r} is {type(obj).__name__}, not a pydantic model class or a JSON Schema "
                           "dict.")
    found = schema_of(obj)
    return Schema(found.json_schema, found.name, found.model, text, found.strict) if found else None


def _from_model(model: type) -> Schema:
    try:
        json_schema = model.model_json_schema()
    except Exception as exc:  # a model pydantic cannot describe (an arbitrary type in a field)
        raise SettingError(f"schema {model.__name__}: pydantic cannot write its JSON Schema "
                           f"({exc.__class__.__name__}: {str(exc)[:200]}). Use JSON-friendly field types.") from None
    return Schema(json_schema, _wire_name(model.__name__), model, model.__name__, _strict_ok(json_schema))


def _from_dict(data: dict[str, Any], shown: str) -> Schema:
    check_size(data, shown)  # first: what follows walks it
    wrapped = isinstance(data.get("schema"), dict) and "type" not in data and "properties" not in data
    json_schema = data["schema"] if wrapped else data
    name = data.get("name") if wrapped else json_schema.get("title")
    strict = data.get("strict") if wrapped and isinstance(data.get("strict"), bool) else _strict_ok(json_schema)
    problem = _json_problem(json_schema)
    if problem:
        raise SettingError(f"The schema {shown} {problem}.")
    schema = Schema(json_schema, _wire_name(name if isinstance(name, str) else "answer"), None,
                    shown if not isinstance(name, str) else name, strict)
    schema.validator()  # a schema that is not valid JSON Schema is refused here, before anything is sent
    return schema


def _json_schema_text(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SettingError(f"schema: the JSON Schema does not parse ({exc}).") from None
    except RecursionError:
        raise SettingError("schema: the JSON Schema is nested too deeply.") from None
    if not isinstance(data, dict):
        raise SettingError("schema: a JSON Schema is a JSON object, e.g. {\"type\": \"object\", \"properties\": {...}}.")
    return data


def _json_problem(value: Any) -> str | None:
    from .wire import json_problem

    try:
        found = json_problem(value, "the schema")
    except RecursionError:
        return "is nested too deeply"
    return f"cannot be sent as JSON ({found})" if found else None


def _wire_name(name: str) -> str:
    """A name the OpenAI-style APIs take (``^[A-Za-z0-9_-]{1,64}$``; Databricks requires one)."""
    return (_NAME.sub("_", name).strip("_") or "answer")[:64]


def _strict_ok(node: Any) -> bool:
    """Whether the schema is what strict structured output takes: every object closed
    (``additionalProperties: false``) with every property required."""
    if isinstance(node, list):
        return all(_strict_ok(n) for n in node)
    if not isinstance(node, dict):
        return True
    if node.get("type") == "object" or "properties" in node:
        props = node.get("properties") or {}
        if node.get("additionalProperties") is not False or set(node.get("required") or ()) != set(props):
            return False
    children = [*(node.get("properties") or {}).values(), *(node.get("$defs") or {}).values(),
                *node.get("anyOf", ()), *([node["items"]] if "items" in node else [])]
    return all(_strict_ok(child) for child in children)


def _from_short(text: str) -> Schema:
    properties: dict[str, Any] = {}
    for item in _split(text, ","):
        name, sep, typed = item.partition(":")
        name = name.strip()
        if not item.strip():
            raise SettingError(f"schema {text!r} has an empty field; {_SHORT_HELP}.")
        if not sep or not name:
            raise SettingError(f"schema {text!r}: {item.strip()!r} has no type; {_SHORT_HELP}.")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SettingError(f"schema {text!r}: {name!r} is not a field name (letters, digits and _).")
        if name in properties:
            raise SettingError(f"schema {text!r} names the field {name!r} twice.")
        properties[name] = _short_type(typed.strip(), name, text)
    json_schema = {"type": "object", "properties": properties, "required": list(properties),
                   "additionalProperties": False}
    return Schema(json_schema, "answer", None, repr(text) if len(text) < 60 else repr(text[:57] + "..."), True)


def _short_type(typed: str, name: str, text: str) -> dict[str, Any]:
    optional = typed.endswith("?")
    base = typed[:-1].strip() if optional else typed
    if base in _SHORT_TYPES:
        node: dict[str, Any] = {"type": _SHORT_TYPES[base]}
    elif base.startswith("list[") and base.endswith("]"):
        node = {"type": "array", "items": _short_type(base[5:-1].strip(), name, text)}
    elif base[:1] in "'\"" and base:
        choices = [c.strip() for c in _split(base, "|")]
        if not all(len(c) >= 2 and c[0] == c[-1] and c[0] in "'\"" for c in choices):
            raise SettingError(f"schema {text!r}: the choices of {name!r} are quoted words separated by |, "
                               "e.g. 'pos'|'neg'.")
        node = {"type": "string", "enum": list(dict.fromkeys(c[1:-1] for c in choices))}
    else:
        raise SettingError(f"schema {text!r}: {name!r} has the type {typed or '(none)'!r}; {_SHORT_HELP}.")
    if optional:
        node = ({**node, "type": [node["type"], "null"]} if "enum" not in node
                else {"anyOf": [node, {"type": "null"}]})
    return node


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, c in enumerate(text):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts
