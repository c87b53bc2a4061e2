"""Every ``%%dbllm`` option, defined once.

Each `Setting` says what an option is: its name, type, default, rule, help text, command-line
spelling and panel control. Everything else derives from this table:

- the ``%config DbLLM.<name>`` traits and their validation (`dbmagic.magic`),
- the ``%%dbllm`` flags and ``%%dbllm?`` (`dbmagic.magic`),
- the panel's controls and its "Copy as cell" (`dbmagic.frontends.panel`),
- `CallSpec`, what every front end hands to the cell runner (`dbmagic.frontends.cell`): a declared
  dataclass whose every field carries its `Setting` (``fields(CallSpec)[i].metadata["setting"]``),
- `CLIENT_OPTIONS`, the `Client.prepare` keywords among them, and the checks `dbmagic.Client`
  makes of the same values from Python.

So a value refused on the command line is refused by ``%config``, the panel and the Python API,
with the same message, and a new option is one entry here (plus its tests).

This module imports nothing heavy (no IPython, no requests): any layer may use its rules.
"""

from __future__ import annotations

import json
import keyword
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .call import wire as _wire
from .errors import SettingError
from .transport import MAX_TIMEOUT

__all__ = ["FORMATS", "Setting", "SETTINGS", "BY_NAME", "CALL", "CLIENT_OPTIONS", "TARGET", "CallSpec", "coerce", "from_text",
           "unescape", "escape", "parse_param", "merge", "to_argv", "cell_argv", "spec_from"]

TARGET = ("endpoint", "cluster_id", "port")
FORMATS = ("markdown", "text", "code", "json", "html")  # how an answer is shown (dbmagic.render)  # where a call goes: named together, overridden together


@dataclass(frozen=True)
class Setting:
    """One option of ``%%dbllm``.

    ``flags`` are its command-line spellings (none: not a flag); a bool's flag sets the opposite of
    its default (``--chat``, ``--no-stream``). ``widget`` is the panel's control for it: ``endpoint``,
    ``text``, ``number``, ``textarea``, ``tags``, ``choice``, ``json``, ``checkbox``, ``function``,
    or None for an option of the magic only. ``rule`` returns a message when a (typed) value is
    refused. ``escapes``: ``\\n`` and ``\\t`` typed on the command line become the characters.
    ``scope`` is ``call`` (a field of `CallSpec`) or ``cell`` (what the magic does with the answer);
    ``api``: a `Client.prepare` keyword as it is (`CLIENT_OPTIONS`). A ``sweep`` setting given several times (``-e A -e B``, ``-t 0 -t 0.8``) makes the cell compare.
    """

    name: str
    type: type
    default: Any
    help: str
    flags: tuple[str, ...] = ()
    widget: str | None = None
    rule: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()
    escapes: bool = False
    metavar: str | None = None
    scope: str = "call"
    label: str = ""
    flag_help: str | None = None  # when the flag does the opposite of the setting (--no-stream)
    sweep: bool = False  # given more than once on the line, the cell compares the values side by side
    api: bool = False  # a keyword of Client.prepare as it is (the others the cell runner applies itself)

    @property
    def flag(self) -> str:
        """The long spelling, used in messages and by Copy as cell."""
        return self.flags[-1]

    @property
    def title(self) -> str:
        """What the panel calls it."""
        return self.label or self.name.replace("_", " ").capitalize()

    @property
    def repeatable(self) -> bool:
        return self.type in (list, dict)

    @property
    def optional(self) -> bool:
        return self.default is None


# -- rules: each returns why a value is refused, or None ------------------------------------------

def _segment(value: str) -> str | None:
    # the value becomes one segment of a URL path that carries the token
    if value.strip() != value or not value:
        return "must not be empty or start or end with white space"
    if len(value) > 255:
        return "must be at most 255 characters"
    if "/" in value or "\\" in value or value in (".", "..") or any(ord(c) < 32 for c in value):
        return "must be a plain name (no '/', '\\', control characters, '.' or '..')"
    return None


# the longest wait dbmagic accepts, in seconds: Model Serving ends a request at 297 s, and a
# driver-proxy app or a stream's chunk gets an hour at most (a larger number overflows the socket)


def _target_name(value: str) -> str | None:
    # a serving endpoint (one URL segment), apps/NAME (an app), or catalog.schema.name (a model service)
    kind, bare = _wire.target_of(value)
    if kind == _wire.APP and _wire.is_url(value):  # which hosts get a token is the client's rule (`dbmagic.transport.apps.app_url_or_none`)
        bad = len(bare) > 2048 or any(c.isspace() or ord(c) < 32 for c in bare)
        return "is an app URL with white space or control characters in it, or too long" if bad else None
    if kind == _wire.APP:
        why = _segment(bare)
        return f"names an app after apps/, and its name {why}" if why else None
    if kind == _wire.MODEL_SERVICE:
        return next((f"is a catalog.schema.name whose part {part!r} {why}" for part in bare.split(".")
                     if (why := _segment(part))), None)
    return _segment(value)


def _between(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[Any], str | None]:
    def rule(value: float) -> str | None:
        if not math.isfinite(value):
            return "must be a finite number"
        if value < low or (low_open and value == low) or (high is not None and value > high):
            above = f"above {low:g}" if low_open else f"at least {low:g}"
            return f"must be {above}" + (f" and at most {high:g}" if high is not None else "")
        return None
    return rule


def _task(value: str) -> str | None:
    if _wire.known_task(value):
        return None
    return ("must be one of " + ", ".join(k for k in _wire.KINDS if k != _wire.PROXY)
            + " (or the endpoint's own task, e.g. llm/v1/chat or agent/v1/responses)")


def _identifier(value: str) -> str | None:
    import builtins

    if (not value.isidentifier() or keyword.iskeyword(value) or (value.startswith("__") and value.endswith("__"))
            or hasattr(builtins, value)):
        return "must be a valid variable name (not a keyword, a __dunder__ or a builtin such as print)"
    return None


def _endpoint_list(value: str) -> str | None:
    names = [n.strip() for n in value.split(",")]
    if not all(names):
        return "must name endpoints separated by commas, e.g. a,b,c"
    return next((f"has {n!r}, which {why}" for n in names if (why := _target_name(n))), None)


def _prompt_uri(value: str) -> str | None:
    name = value[len("prompts:/"):] if value.startswith("prompts:/") else ""
    return None if name.strip("/@") else "must be a prompt URI: prompts:/NAME/VERSION or prompts:/NAME@alias"


def is_dotted(text: str) -> bool:
    """``name`` or ``a.b.c``: identifiers joined by dots (a notebook name, a prompt variable)."""
    return all(part.isidentifier() for part in text.split("."))


def _prompt_vars(value: dict[str, Any]) -> str | None:
    # MLflow's variable names: an identifier, or dotted identifiers ({{ user.name }})
    bad = next((k for k in value if not is_dotted(k)), None)
    return f"has {bad!r}, which is not a prompt variable name (letters, digits, _ and dots)" if bad else None


def _names_list(value: str) -> str | None:
    names = [n.strip() for n in value.split(",")]
    if not all(names) or not all(n.isidentifier() for n in names):
        return "must name scorers separated by commas, e.g. polite,Safety"
    return None


def _column(value: str) -> str | None:
    return None if value.strip() and value != "error" else "must be a column name other than 'error'"


def _dotted_name(value: str) -> str | None:
    if not is_dotted(value):
        return "must name a function in the notebook (e.g. clean or helpers.clean)"
    return None


def _schema_text(value: str) -> str | None:
    return None if value.strip() else ("must be a pydantic model or JSON Schema dict in the notebook (its name), a JSON "
                                       "Schema, or the short form, e.g. 'label: str, score: float'")


def _dotted_names(value: str) -> str | None:
    names = [n.strip() for n in value.split(",")]
    if not all(names) or not all(_dotted_name(n) is None for n in names):
        return "must name functions in the notebook, comma-separated (e.g. weather,lookup)"
    return None


def _json_fields(value: dict[str, Any]) -> str | None:
    try:
        problem = _wire.json_problem(value, "extra_params")
    except RecursionError:
        problem = "it is nested too deeply"
    return f"must hold JSON values only (finite numbers, strings, lists, objects): {problem}" if problem else None


# -- the table ------------------------------------------------------------------------------------

SERVICE_TIERS = ("default", "priority")  # the body's service_tier, as the Foundation Model APIs take it

SETTINGS: tuple[Setting, ...] = (
    Setting("endpoint", str, None, "what to query (default: %config DbLLM.endpoint): a serving endpoint, "
            "apps/NAME (an agent on Databricks Apps, or its https://... URL) or catalog.schema.name (a model "
            "service); repeat it to compare",
            ("-e", "--endpoint"), "endpoint", _target_name, sweep=True, api=True),
    Setting("cluster_id", str, None, "cluster of a driver-proxy app (found by itself inside Databricks)",
            ("--cluster-id",), "text", _segment, label="Cluster", api=True),
    Setting("port", int, None, "port of a driver-proxy app", ("--port",), "number", _between(1, 65535), api=True),
    Setting("org_id", str, None, "org id for the driver-proxy URL (default: from the workspace)",
            ("--org-id",), "text", _segment, api=True),
    Setting("temperature", float, None, "sampling temperature", ("-t", "--temperature"), "number", _between(0),
            sweep=True, api=True),
    Setting("max_tokens", int, None, "largest number of tokens to generate", ("--max-tokens",), "number",
            _between(1), sweep=True, api=True),
    Setting("stop", list, [], r'stop sequence, repeatable; escapes like "\n" work', ("--stop",), "tags",
            escapes=True, api=True),
    Setting("extra_params", dict, {}, "extra request field, repeatable; VALUE is parsed as JSON when it parses",
            ("-p", "--param"), "json", _json_fields, metavar="KEY=VALUE", label="Extra fields", api=True),
    Setting("system", str, None, r'system prompt (chat endpoints); escapes like "\n" work', ("--system",),
            "textarea", escapes=True, label="System prompt", sweep=True, api=True),
    Setting("task", str, None, "override the endpoint's task: chat, completions, embeddings, responses, "
                               "chat_agent, custom",
            ("--task",), "text", _task, sweep=True, api=True),
    Setting("n", int, None, "number of answers to ask for (chat and completions): all are shown, the first is the "
            "value, _dbllm.choices holds them all",
            ("-n", "--n"), "number", _between(1, 16), label="Answers (n)", api=True),
    Setting("service_tier", str, None, "priority: Databricks' priority pay-per-token mode (served ahead of standard "
            "traffic, at a higher price per token) for a pay-per-token chat, completions, embeddings or responses "
            "endpoint; default: the standard tier", ("--service-tier",), "text", choices=SERVICE_TIERS,
            metavar="TIER", label="Service tier", api=True),
    Setting("schema", str, None, "the answer as data: a pydantic model or JSON Schema dict in the notebook (its "
            "name), a JSON Schema, or the short form 'label: str, score: float, tags: list[str], reason: str?'",
            ("--schema",), "text", _schema_text, metavar="SCHEMA", label="Schema"),
    Setting("schema_retries", int, 1, "times an answer that does not fit the schema is asked for again, with "
            "the problem appended", ("--schema-retries",), "number", _between(0, 5), metavar="N", api=True),
    Setting("tools", list, [], "functions in the notebook the model may ask to call, comma-separated; the calls "
            "are shown, and run with --run-tools", ("--tools",), "tags", _dotted_names, metavar="F,G", label="Tools"),
    Setting("run_tools", bool, False, "run the tool calls the model asks for and send the results back",
            ("--run-tools",), "checkbox", label="Run tools", api=True),
    Setting("max_steps", int, 5, "with --run-tools, at most this many requests to the endpoint in one call",
            ("--max-steps",), "number", _between(1, 50), metavar="N", api=True),
    Setting("max_tool_runs", int, 20, "with --run-tools, at most this many tool calls run in one call (however many "
            "the model asks for); the others are shown, not run", ("--max-tool-runs",), "number", _between(1, 1000),
            metavar="N", label="Max tool runs", api=True),
    Setting("max_answer_mb", float, 64.0, "the largest answer taken, in megabytes once decompressed: a larger one "
            "fails (a stream stops there and keeps what arrived)", ("--max-answer-mb",), "number",
            _between(0, 4096, low_open=True), metavar="MB", label="Max answer (MB)", api=True),
    Setting("timeout", float, None, "seconds the whole call may take: connecting, waiting and every byte of the "
            "answer (a stream kept alive without text does not extend it)",
            ("--timeout",), "number", _between(0, MAX_TIMEOUT, low_open=True), label="Timeout (s)"),
    Setting("transform_input", str, None, "function(**request) -> request from the notebook",
            ("--transform-input",), "function", _dotted_name, metavar="NAME", label="Input fn", sweep=True),
    Setting("transform_output", str, None, "function(value) -> value from the notebook",
            ("--transform-output",), "function", _dotted_name, metavar="NAME", label="Output fn", sweep=True),
    Setting("dry_run", bool, False, "show the exact request (token hidden); send nothing", ("--dry-run",),
            scope="cell"),
    Setting("output", str, None, "store the answer in this variable", ("-o", "--output"), rule=_identifier,
            metavar="VAR", scope="cell"),
    Setting("format", str, "markdown", "markdown (default), text, code, json or html", ("-f", "--format"),
            "choice", choices=FORMATS),
    Setting("insert", bool, False, "put the answer's code into the next cell", ("--insert",), scope="cell"),
    Setting("raw", bool, False, "send the prompt as written: no {{ }} templating", ("--raw",), scope="cell"),
    Setting("attach", list, [], "an image or document to add after the prompt, repeatable: a notebook variable "
            "(bytes, a PIL image) or a file's path (a PDF goes as its pages' images)", ("--attach",),
            metavar="VAR_OR_PATH", scope="cell"),
    Setting("prompt", str, None, "use this MLflow Prompt Registry template (prompts:/NAME/VERSION or "
            "prompts:/NAME@alias); the cell, if any, is appended", ("--prompt",), rule=_prompt_uri, metavar="URI",
            scope="cell"),
    Setting("vars", dict, {}, "a variable of the --prompt template, repeatable; VALUE is parsed as JSON when it "
            "parses; wins over the notebook's", ("--var",), rule=_prompt_vars, metavar="NAME=VALUE", scope="cell"),
    Setting("compare", str, None, "endpoints to compare side by side, comma-separated (as -e A -e B)",
            ("--compare",), rule=_endpoint_list, metavar="A,B,...", scope="cell"),
    Setting("repeat", int, 1, "run each compared call this many times: median latency, how often answers differ",
            ("--repeat",), rule=_between(1, 20), scope="cell"),
    Setting("over", str, None, "send the template once per row of this DataFrame or list (dbmagic.batch)",
            ("--over",), rule=_identifier, metavar="VAR", scope="cell"),
    Setting("column", str, "answer", "the answer column --over adds to a DataFrame (errors go in 'error')",
            ("--column",), rule=_column, metavar="NAME", scope="cell"),
    Setting("send_missing", bool, False, "with --over, send a row whose value is missing (None, NaN, NA) as it "
            "renders; by default it is not sent and its error names the column", ("--send-missing",), scope="cell"),
    Setting("concurrency", int, 8, "requests in flight at once with --over; fewer while the endpoint rate limits",
            ("--concurrency",), rule=_between(1, 256), scope="cell"),
    Setting("rows_per_request", int, None, "with --over, rows sent in one request where the endpoint takes many "
            "(embeddings, custom models): default 100, under 4 MB; 1 sends each row on its own",
            ("--rows-per-request",), rule=_between(1, 2048), metavar="N", scope="cell"),
    Setting("cache_mode", str, "auto", "which calls the cache (%config DbLLM.cache) answers and records: auto "
            "(temperature 0 or unset, one answer), always, or off", ("--cache",), choices=("auto", "always", "off"),
            scope="cell"),
    Setting("background", bool, False, "with --over, return at once and run the batch in the background (its "
            "progress shows in this cell); -o (or _dbllm) keeps its handle", ("--background",), scope="cell"),
    Setting("max_tokens_total", int, None, "with --over, stop sending once the answers report this many tokens "
            "(input and output); finished rows keep their answers", ("--max-tokens-total",), rule=_between(1),
            metavar="N", scope="cell"),
    Setting("max_cost", float, None, "with --over, stop sending once the answers cost this many US dollars, "
            "priced as MLflow prices a trace (needs MLflow and a price for the model)", ("--max-cost",),
            rule=_between(0, low_open=True), metavar="USD", scope="cell"),
    Setting("checkpoint", str, None, "with --over, keep every finished call in this folder (local or a volume): "
            "rows it already answers are not sent again, even after a restart", ("--checkpoint",), metavar="PATH",
            scope="cell"),
    Setting("shared_checkpoint", bool, False, "with --checkpoint, the folder is shared on purpose: the answers "
            "other users wrote there are used too (by default only your own are)", ("--shared-checkpoint",),
            scope="cell"),
    Setting("fail_on_error", bool, False, "with --over or a comparison, fail the cell when any row or compared call "
            "failed (as ai_query's failOnError); without it a cell fails only when every one failed",
            ("--fail-on-error",), scope="cell"),
    Setting("judge", str, None, "judge the answers of --over or a comparison with these MLflow scorers, "
            "comma-separated: the notebook's (dbmagic.judge(...), @scorer functions) or MLflow's built-ins "
            "(Safety)", ("--judge",), rule=_names_list, metavar="A,B", scope="cell"),
    Setting("expect", str, None, "with --judge, the column of --over's rows that holds each expected answer",
            ("--expect",), rule=_column, metavar="COLUMN", scope="cell"),
    Setting("stream", bool, True, "stream answers token by token where the endpoint streams", ("--no-stream",),
            "checkbox", label="Stream", flag_help="wait for the whole answer instead of streaming"),
    Setting("chat", bool, False, "keep a conversation with this endpoint across cells", ("--chat",), "checkbox",
            label="Keep conversation"),
)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


# -- values ---------------------------------------------------------------------------------------

def coerce(name: str, value: Any, *, typed_as: str | None = None) -> Any:
    """``value`` as setting ``name`` takes it (a copy for lists and dicts), or `SettingError`.

    ``typed_as`` is the text the user typed, when ``value`` was read from it (the message shows it).
    """
    s = BY_NAME[name]
    try:
        return _coerce(s, value)
    except SettingError as exc:
        if typed_as is None:
            raise
        raise SettingError(str(exc).rsplit("; got ", 1)[0] + f"; got {_shown(typed_as)}.") from None


def _coerce(s: Setting, value: Any) -> Any:
    name = s.name
    if value is None and (s.optional or s.repeatable):
        return _default(s)
    typed = _typed(s, value)
    if typed is _REFUSED:
        raise SettingError(f"{name} {_what(s)}; got {_shown(value)}.")
    if s.choices and typed.lower() not in s.choices:
        raise SettingError(f"{name} must be one of {', '.join(s.choices)}; got {_shown(value)}.")
    if s.choices:
        typed = typed.lower()
    if s.rule is not None:
        items = typed if s.type is list else [typed]
        for item in items:
            why = s.rule(item)
            if why:
                raise SettingError(f"{name} {why}; got {_shown(value)}.")
    return typed


_REFUSED = object()


def _typed(s: Setting, value: Any) -> Any:
    if s.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _REFUSED
    if s.type is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _REFUSED
    if s.type is bool:
        return value if isinstance(value, bool) else _REFUSED
    if s.type is str:
        return value if isinstance(value, str) else _REFUSED
    if s.type is list:
        if isinstance(value, str):
            value = [value]
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return list(value) if ok else _REFUSED
    if s.type is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) and k for k in value)
        return dict(value) if ok else _REFUSED
    raise TypeError(s.type)


def _what(s: Setting) -> str:
    return {float: "must be a number", int: "must be a whole number", bool: "must be True or False",
            str: "must be text", list: "must be a list of strings",
            dict: "must be a mapping of field names to values"}[s.type]


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _default(s: Setting) -> Any:
    return s.default.copy() if isinstance(s.default, (list, dict)) else s.default


def from_text(name: str, text: str) -> Any:
    """A value of setting ``name`` as typed on the command line or in a panel field."""
    s = BY_NAME[name]
    if s.type in (int, float):
        try:
            value: Any = s.type(text.strip())
        except ValueError:
            raise SettingError(f"{name} {_what(s)}; got {_shown(text)}.") from None
    elif s.type is dict:
        value = _json_object(name, text)
    else:
        value = unescape(text) if s.escapes else text
    return coerce(name, value, typed_as=text)


def _json_object(name: str, text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as exc:
        raise SettingError(f"{name} must be a JSON object, e.g. {{\"top_p\": 0.9}}; {exc}.") from None
    except RecursionError:  # as -p says of the same input
        raise SettingError(f"{name}: the JSON value is nested too deeply.") from None
    if not isinstance(value, dict):
        raise SettingError(f"{name} must be a JSON object, e.g. {{\"top_p\": 0.9}}; got {_shown(text)}.")
    return value


def parse_param(item: str, name: str = "extra_params") -> dict[str, Any]:
    """One ``-p KEY=VALUE`` (or ``--var NAME=VALUE``, ``name="vars"``); a VALUE that parses as JSON
    is taken as JSON (numbers, lists, ...)."""
    flag, example = ("--var", "--var audience=engineers") if name == "vars" else ("-p", "-p top_p=0.9")
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SettingError(f"{flag} takes {BY_NAME[name].metavar}, e.g. {example}; got {_shown(item)}.")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        value = text
    except RecursionError:
        raise SettingError(f"{flag} {key}: the JSON value is nested too deeply.") from None
    if name == "vars":
        return coerce("vars", {key: value})
    if key in BY_NAME:
        s = BY_NAME[key]
        hint = f"use {s.flag}" if s.flags else "set it in %config DbLLM"
        if key == "stream":
            hint = "answers stream by default; --no-stream turns it off"
        raise SettingError(f"-p {key}=... is a setting, not a request field: {hint}.")
    if key in ("prompt", "messages", "history"):
        raise SettingError(f"-p {key}=... is not a request field you set: the prompt is the cell body, "
                           "and --chat keeps the conversation.")
    return coerce("extra_params", {key: value})


def _no_constant(name: str) -> Any:
    raise SettingError(f"{name} is not a finite number, and JSON cannot carry it.")


def unescape(text: str) -> str:
    r"""Turn the ``\n``, ``\t`` and ``\\`` a user types into the characters."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def escape(text: str) -> str:
    """The inverse of `unescape`: what to type for ``text``."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


def merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The values a call uses: ``overrides`` (from the command line, say) over ``defaults`` (from
    ``%config``). A target named in ``overrides`` replaces the default target whole, so
    ``--cluster-id``/``--port`` beat ``%config DbLLM.endpoint``; request fields merge."""
    values = {s.name: _default(s) for s in SETTINGS}
    values.update((k, v) for k, v in defaults.items() if k in values)
    if overrides.get("endpoint") is not None:
        if overrides.get("cluster_id") is not None or overrides.get("port") is not None:
            raise SettingError("Give either an endpoint or a driver-proxy app (cluster id and port), not both.")
        values["cluster_id"] = values["port"] = None
    elif overrides.get("cluster_id") is not None or overrides.get("port") is not None:
        values["endpoint"] = None  # the proxy app's other half may still come from %config
    for name, value in overrides.items():
        if value is None:
            continue
        values[name] = {**values[name], **value} if BY_NAME[name].type is dict else value
    return values


MAX_COMPARED = 16


def sweeps(overrides: dict[str, Any]) -> dict[str, list[Any]]:
    """The settings given several times on one line (and ``--compare``'s endpoints): ``{name:
    [values in the order given]}``. ``overrides`` keeps the first value of each, as one call would."""
    if overrides.get("compare"):
        named = [n.strip() for n in overrides["compare"].split(",")]
        overrides["endpoint"] = [*(overrides.get("endpoint") or []), *named]
    axes: dict[str, list[Any]] = {}
    for s in SETTINGS:
        given = overrides.get(s.name)
        if not s.sweep or given is None:
            continue
        given = list(dict.fromkeys(given))  # a value given twice is one column
        overrides[s.name] = given[0]
        if len(given) > 1:
            axes[s.name] = given
    cells = math.prod(len(v) for v in axes.values())
    if cells > MAX_COMPARED:
        shape = " x ".join(f"{len(v)} {s}" for s, v in axes.items())
        raise SettingError(f"Comparing {shape} makes {cells} calls side by side; at most {MAX_COMPARED}. "
                           "Compare fewer endpoints or values at once.")
    return axes


# -- the description of one call --------------------------------------------------------------

def _field(name: str) -> Any:
    """A `CallSpec` field: setting ``name``'s default, the setting in its metadata."""
    setting = BY_NAME[name]
    return field(default_factory=lambda: _default(setting), metadata={"setting": setting})


@dataclass
class CallSpec:
    """Everything that decides one call, as the options and ``%config`` defaults resolve (each
    field's `Setting` is in its metadata). Every front end hands one to the cell runner."""

    endpoint: str | None = _field("endpoint")
    cluster_id: str | None = _field("cluster_id")
    port: int | None = _field("port")
    org_id: str | None = _field("org_id")
    temperature: float | None = _field("temperature")
    max_tokens: int | None = _field("max_tokens")
    stop: list[str] = _field("stop")
    extra_params: dict[str, Any] = _field("extra_params")
    system: str | None = _field("system")
    task: str | None = _field("task")
    n: int | None = _field("n")
    service_tier: str | None = _field("service_tier")
    schema: str | None = _field("schema")
    schema_retries: int = _field("schema_retries")
    tools: list[str] = _field("tools")
    run_tools: bool = _field("run_tools")
    max_steps: int = _field("max_steps")
    max_tool_runs: int = _field("max_tool_runs")
    max_answer_mb: float = _field("max_answer_mb")
    timeout: float | None = _field("timeout")
    transform_input: str | None = _field("transform_input")
    transform_output: str | None = _field("transform_output")
    format: str = _field("format")
    stream: bool = _field("stream")
    chat: bool = _field("chat")

    @property
    def target_key(self) -> str:
        """The conversation key: the endpoint name or ``cluster:port``."""
        return self.endpoint or f"{self.cluster_id}:{self.port}"


CALL: tuple[Setting, ...] = tuple(f.metadata["setting"] for f in fields(CallSpec))
# the call settings that are `Client.prepare` keywords as they are (the others: transforms, which
# the cell runner finds by name, and timeout, format, stream and chat, which it applies itself)
CLIENT_OPTIONS: tuple[str, ...] = tuple(s.name for s in CALL if s.api)
if {s.name for s in SETTINGS if s.scope == "call"} != {s.name for s in CALL}:  # a new call setting is a field too
    raise RuntimeError("dbmagic.settings: a setting of scope 'call' must be a CallSpec field, and only those are")


def spec_from(values: Mapping[str, Any]) -> Any:
    """The `CallSpec` of resolved ``values`` (names of other scopes are ignored)."""
    return CallSpec(**{s.name: values[s.name] for s in CALL if s.name in values})


# -- back to the command line ---------------------------------------------------------------------

def to_argv(name: str, value: Any) -> list[str]:
    """The ``%%dbllm`` words that set ``name`` to ``value`` (none when it is the built-in default)."""
    s = BY_NAME[name]
    if value == s.default or (value in (None, "", [], {}) and s.default in (None, [], {})):
        return []
    flag = s.flag  # the long spelling, joined to its value: `--stop=--` parses where `--stop --` would not
    if s.type is bool:
        return [flag]
    if s.type is list:
        return [f"{flag}={escape(item)}" for item in value]
    if s.type is dict:
        return [f"{flag}={k}={_param_text(v)}" for k, v in value.items()]
    if s.type is float:
        return [f"{flag}={value!r}"]
    return [f"{flag}={escape(value) if s.escapes else value}"]


def _param_text(value: Any) -> str:
    # a string that would not parse as JSON is written bare (-p style=terse), as parse_param reads it
    if isinstance(value, str):
        try:
            json.loads(value)
        except (ValueError, RecursionError):
            return value
    return json.dumps(value, ensure_ascii=False)


def cell_argv(values: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The ``%%dbllm`` words for a call with ``values``, given the ``%config`` defaults in force.

    Every value that is not the built-in default is written. When the ``%config`` defaults would
    still change the call (a panel field left empty while ``%config`` sets it), ``--no-config``
    makes the cell ignore ``%config``, so that it sends exactly what ``values`` describe.
    """
    written = {s.name: values.get(s.name) for s in CALL if to_argv(s.name, values.get(s.name))}
    argv = [w for name, value in written.items() for w in to_argv(name, value)]
    wanted = spec_from(merge({}, values))
    if spec_from(merge(config, written)) != wanted:
        argv.insert(0, "--no-config")
    return argv
