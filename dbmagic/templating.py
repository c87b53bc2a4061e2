"""Prompt templates: Jinja2 ``{{ name }}`` / ``{{ expr }}`` over the notebook's namespace (or a row's values).

IPython's own ``{var}``/``$var`` expansion is off for ``%%dbllm``, so JSON and code in prompts are
safe. A prompt without ``{{``, ``{%`` or ``{#`` is used as it is, without loading Jinja2.

Two kinds, one line between them: a `Template` is the user's own cell and has the notebook's whole
power (any name, any expression, as Python code in the cell would); a `RegistryTemplate` is text
from the MLflow Prompt Registry, someone else's, and renders as data (`dbmagic._untrusted`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import TemplateError

__all__ = ["Template", "RegistryTemplate", "render_prompt", "JINJA_GLOBALS"]

# names Jinja2 itself defines: a template may use them without a column or variable of that name
JINJA_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop"})

_MARKERS = ("{{", "{%", "{#")
# Jinja2 reserves `self` (a template's own blocks); a variable or column of that name is renamed in
# the parsed template, so `{{ self }}` is its value like any other name
SELF = "_dbmagic_self"


def parse(env: Any, source: str) -> Any:
    """``source`` parsed by ``env``, with `self` a name like any other (see `SELF`)."""
    from jinja2 import nodes

    tree = env.parse(source)
    for node in tree.find_all(nodes.Name):
        if node.name == "self":
            node.name = SELF
    return tree


def declared(env: Any, tree: Any) -> frozenset[str]:
    """The variables a parsed template reads (`self` under its own name)."""
    import jinja2.meta

    return frozenset("self" if n == SELF else n for n in jinja2.meta.find_undeclared_variables(tree))


def with_self(values: Mapping[str, Any]) -> Mapping[str, Any]:
    return {**values, SELF: values["self"]} if "self" in values else values


class Template:
    """A prompt template compiled once, to fill many times (a batch renders one per row).

    ``names`` are the variables it reads; `render` fills them, and an undefined one is a
    `TemplateError` that names it and says where it was looked for. ``raw``: the text as it is.
    """

    def __init__(self, source: str, *, raw: bool = False):
        self.source = source
        self._compiled: Any = None
        self.names: frozenset[str] = frozenset()
        if not raw and any(m in source for m in _MARKERS):
            import jinja2

            env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
            try:
                tree = parse(env, source)
                self.names = declared(env, tree)
                self._compiled = env.from_string(tree)
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(
                    f"The prompt template is not valid Jinja2 (line {exc.lineno}: {exc.message}). "
                    "Fix the {{ }} expression, or write {{ '{{' }} to keep literal braces."
                ) from None

    def render(self, values: Mapping[str, Any], *, where: str = "in the notebook") -> str:
        if self._compiled is None:
            return self.source
        try:
            return self._compiled.render(with_self(values))  # a mapping, never **values: `self` is a name
        except Exception as exc:  # an undefined name, a division by zero, a function that raises, {% include %} ...
            raise render_error(exc, "The prompt template", where, define="Define it, or write {{ '{{' }} to keep "
                               "literal braces.", fix="Fix the {{ }} expression, or send the text as it is with "
                               "--raw.") from None


def render_error(exc: Exception, what: str, where: str, *, define: str, fix: str) -> TemplateError:
    """The one message for a template that failed while rendering: a name not defined ``where``,
    endless recursion, or an error at a line of the template (``define`` and ``fix``: the next step)."""
    import jinja2

    if isinstance(exc, jinja2.UndefinedError):
        return TemplateError(f"{what} uses {_undefined_name(exc)}, which is not defined {where}. {define}")
    if isinstance(exc, RecursionError):
        return TemplateError(f"{what} recursed without end. {fix}")
    return TemplateError(f"{what} failed at line {_template_line(exc)}: {exc.__class__.__name__}: "
                         f"{str(exc)[:300]}. {fix}")


class RegistryTemplate(Template):
    """A prompt from the MLflow Prompt Registry (``uri``), with the cell's own ``body`` after it.

    The registry text is someone else's, so it renders as data: only the variables it declares,
    each of them plain data, in a cut-down Jinja2 (``{{ }}``, ``{% if %}``, ``{% for %}``, filters),
    with its output, loops and time bounded (`dbmagic._untrusted.LIMITS`). ``body`` is the user's
    own cell and renders as any `Template`.
    """

    def __init__(self, source: str, uri: str, body: Template | None = None):
        from . import _untrusted

        self.source, self.uri, self._body = source, uri, body
        try:
            self._compiled, self._declared = _untrusted.compile_untrusted(source)
        except _untrusted.Limited as exc:
            raise self._refused(exc) from None
        except Exception as exc:  # jinja2.TemplateSyntaxError, a RecursionError on absurd nesting
            line = getattr(exc, "lineno", "?")
            raise TemplateError(f"The registry prompt {uri} is not a valid template (line {line}: "
                                f"{getattr(exc, 'message', None) or exc.__class__.__name__}).") from None
        reserved = sorted(n for n in self._declared if n.startswith("_") or n in _untrusted.RESERVED)
        if reserved:
            raise TemplateError(f"The registry prompt {uri} asks for {', '.join(reserved)}, which is the "
                                "notebook's own state, not a prompt variable; a registry prompt cannot read it.")
        self.names = self._declared | (body.names if body is not None else frozenset())

    def _refused(self, exc: Exception) -> TemplateError:
        return TemplateError(f"The registry prompt {self.uri} was refused: {exc}. A registry prompt renders as "
                             "data; to use the notebook's full template language, write the text in the cell.")

    def render(self, values: Mapping[str, Any], *, where: str = "in the notebook") -> str:
        from . import _untrusted

        try:
            given = {n: _untrusted.plain(values[n], n) for n in sorted(self._declared) if n in values}
            text = _untrusted.render_untrusted(self._compiled, given)
        except _untrusted.Limited as exc:
            raise self._refused(exc) from None
        except Exception as exc:  # an undefined name, a filter given the wrong type ...
            import jinja2.exceptions

            if isinstance(exc, jinja2.exceptions.SecurityError):
                raise self._refused(exc) from None
            raise render_error(exc, f"The registry prompt {self.uri}", where,
                               define="Define it (plain data: text, numbers, lists, dicts).",
                               fix="To change the prompt, copy its text into the cell.") from None
        if self._body is None:
            return text
        return f"{text}\n\n{self._body.render(values, where=where)}"


def render_prompt(template: str | Template, namespace: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``namespace``; an undefined name is an error that names it."""
    return (template if isinstance(template, Template) else Template(template)).render(namespace)


def _template_line(exc: BaseException) -> int | str:
    """The template's line where ``exc`` was raised (Jinja maps its frames to ``<template>``)."""
    import traceback

    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
    return lines[-1] if lines else "?"


def _undefined_name(exc: Exception) -> str:
    # Jinja2 says "'notes' is undefined" or "'dict object' has no attribute 'x'"
    message = str(exc).replace(SELF, "self")
    if message.endswith(" is undefined"):
        return message[: -len(" is undefined")]
    return message
