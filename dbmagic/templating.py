"""Prompt templates: Jinja2 ``{{ name }}`` / ``{{ expr }}`` over the notebook's namespace.

IPython's own ``{var}``/``$var`` expansion is off for ``%%dbllm``, so JSON and code in prompts are
safe. A prompt without ``{{``, ``{%`` or ``{#`` is returned as it is, without loading Jinja2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import TemplateError

__all__ = ["render_prompt"]

_MARKERS = ("{{", "{%", "{#")


def render_prompt(template: str, namespace: Mapping[str, Any]) -> str:
    """Fill ``template`` from ``namespace``; an undefined name is an error that names it."""
    if not any(m in template for m in _MARKERS):
        return template
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    try:
        return env.from_string(template).render(**namespace)
    except jinja2.UndefinedError as exc:
        raise TemplateError(
            f"The prompt template uses {_undefined_name(exc)}, which is not defined in the notebook. "
            "Define it in a cell above, or write {{ '{{' }} to keep literal braces."
        ) from None
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(
            f"The prompt template is not valid Jinja2 (line {exc.lineno}: {exc.message}). "
            "Fix the {{ }} expression, or write {{ '{{' }} to keep literal braces."
        ) from None


def _undefined_name(exc: Exception) -> str:
    # Jinja2 says "'notes' is undefined" or "'dict object' has no attribute 'x'"
    message = str(exc)
    if message.endswith(" is undefined"):
        return message[: -len(" is undefined")]
    return message
