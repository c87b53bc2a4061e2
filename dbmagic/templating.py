"""Prompt templates: Jinja2 ``{{ name }}`` / ``{{ expr }}`` over the notebook's namespace (or a row's values).

IPython's own ``{var}``/``$var`` expansion is off for ``%%dbllm``, so JSON and code in prompts are
safe. A prompt without ``{{``, ``{%`` or ``{#`` is used as it is, without loading Jinja2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import TemplateError

__all__ = ["Template", "render_prompt"]

_MARKERS = ("{{", "{%", "{#")


class Template:
    """A prompt template compiled once, to fill many times (a batch renders one per row).

    ``names`` are the variables it reads; `render` fills them, and an undefined one is a
    `TemplateError` that names it and says where it was looked for. ``sandboxed`` templates (from
    outside the notebook, e.g. the MLflow Prompt Registry) render in Jinja's sandbox, which refuses
    unsafe attribute access.
    """

    def __init__(self, source: str, *, sandboxed: bool = False, raw: bool = False):
        self.source = source
        self._compiled: Any = None
        self.names: frozenset[str] = frozenset()
        if not raw and any(m in source for m in _MARKERS):
            import jinja2
            import jinja2.meta
            import jinja2.sandbox

            kind = jinja2.sandbox.SandboxedEnvironment if sandboxed else jinja2.Environment
            env = kind(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
            try:
                self.names = frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))
                self._compiled = env.from_string(source)
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(
                    f"The prompt template is not valid Jinja2 (line {exc.lineno}: {exc.message}). "
                    "Fix the {{ }} expression, or write {{ '{{' }} to keep literal braces."
                ) from None

    def render(self, values: Mapping[str, Any], *, where: str = "in the notebook") -> str:
        if self._compiled is None:
            return self.source
        import jinja2

        import jinja2.exceptions

        try:
            return self._compiled.render(**values)
        except jinja2.UndefinedError as exc:
            raise TemplateError(
                f"The prompt template uses {_undefined_name(exc)}, which is not defined {where}. "
                "Define it, or write {{ '{{' }} to keep literal braces."
            ) from None
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"The prompt template does something the sandbox refuses ({exc}).") from None
        except RecursionError:
            raise TemplateError("The prompt template recursed without end. Fix the {{ }} expression, or send "
                                "the text as it is with --raw.") from None
        except Exception as exc:  # a division by zero, a function that raises, {% include %} ...
            raise TemplateError(
                f"The prompt template failed at line {_template_line(exc)}: {exc.__class__.__name__}: "
                f"{str(exc)[:300]}. Fix the {{{{ }}}} expression, or send the text as it is with --raw."
            ) from None


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
    message = str(exc)
    if message.endswith(" is undefined"):
        return message[: -len(" is undefined")]
    return message
