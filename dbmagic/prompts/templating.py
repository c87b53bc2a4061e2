"""Prompt templates: Jinja2 ``{{ name }}`` / ``{{ expr }}`` over the notebook's namespace (or a row's values).

IPython's own ``{var}``/``$var`` expansion is off for ``%%dbllm``, so JSON and code in prompts are
safe. A prompt without ``{{``, ``{%`` or ``{#`` is used as it is, without loading Jinja2.

Two kinds, one line between them: a `Template` is the user's own cell and has the notebook's whole
power (any name, any expression, as Python code in the cell would); a `RegistryTemplate` is text
from the MLflow Prompt Registry, someone else's, and renders as data (`dbmagic.prompts.untrusted`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..errors import DbMagicError, TemplateError
from .jinja import SELF, declared, parse, with_self

__all__ = ["Template", "RegistryTemplate", "Attached", "render_prompt", "JINJA_GLOBALS"]

# names Jinja2 itself defines: a template may use them without a column or variable of that name
JINJA_GLOBALS = frozenset({"range", "dict", "lipsum", "cycler", "joiner", "namespace", "loop", "image", "document"})

_MARKERS = ("{{", "{%", "{#")
class Template:
    """A prompt template compiled once, to fill many times (a batch renders one per row).

    ``names`` are the variables it reads (``required``: those that must have a value); `render`
    fills them, and an undefined one is a `TemplateError` that names it and says where it was
    looked for. ``raw``: the text as it is.
    """

    def __init__(self, source: str, *, raw: bool = False):
        self.source = source
        self._compiled: Any = None
        self.names: frozenset[str] = frozenset()
        if not raw and any(m in source for m in _MARKERS):
            import jinja2

            from .attachments import document, image

            env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
            env.globals.update(image=image, document=document)  # a picture or a document where it stands
            try:
                tree = parse(env, source)
                self.names = declared(env, tree)
                self._compiled = env.from_string(tree)
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(
                    f"The prompt template is not valid Jinja2 (line {exc.lineno}: {exc.message}). "
                    "Fix the {{ }} expression, or write {{ '{{' }} to keep literal braces."
                ) from None
        self.required: frozenset[str] = self.names  # the names that must have a value: every one it reads

    def render(self, values: Mapping[str, Any], *, where: str = "in the notebook") -> Any:
        """The prompt's text; with ``{{ image(x) }}`` or ``{{ document(x) }}``, its `Parts` (text and
        attachments, in order)."""
        if self._compiled is None:
            return self.source
        from .attachments import collecting

        try:
            with collecting() as split:
                return split(self._compiled.render(with_self(values)))  # a mapping, never **values: `self` is a name
        except DbMagicError:  # an attachment that cannot be sent says so itself
            raise
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


# MLflow's own rules (mlflow/prompt/constants.py, PromptVersion.format): the variables of a prompt,
# and what makes it a Jinja2 template rather than one filled by plain substitution
PROMPT_VARIABLE = re.compile(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*(?:\.[a-zA-Z_][a-zA-Z0-9_]*)*)\s*\}\}")


def is_jinja_prompt(texts: list[str]) -> bool:
    """MLflow's ``_is_jinja2_template``: a text (or any message of a chat prompt) with ``{%`` and ``%}``."""
    return any("{%" in t and "%}" in t for t in texts)


def substitute(text: str, values: Mapping[str, Any]) -> str:
    """MLflow's ``format_prompt``: each ``{{ name }}`` of a given name replaced by ``str(value)``, in
    one pass (a value holding ``{{ other }}`` is not filled again); everything else left as it is."""
    if not values:
        return text
    pattern = re.compile(r"\{\{\s*(" + "|".join(map(re.escape, values)) + r")\s*\}\}")
    return pattern.sub(lambda match: str(values[match.group(1)]), text)


class RegistryTemplate(Template):
    """A prompt from the MLflow Prompt Registry (``uri``), with the cell's own ``body`` after it,
    rendered exactly as MLflow's ``PromptVersion.format`` renders it:

    - a text (or chat) prompt without ``{% %}`` is filled by plain substitution of its ``{{ name }}``
      variables (MLflow's pattern: names, dotted names too); any other brace (``{{"label": 1}}``,
      ``{#id}``) is text, and a variable with no value is an error that names it;
    - a prompt with ``{% %}`` renders as Jinja2, an undefined name rendering as nothing (so an
      ``{% if name %}`` with ``name`` unset takes its ``else``), in dbmagic's cut-down sandbox
      (``{{ }}``, ``{% if %}``, ``{% for %}``, filters; output, loops and time bounded:
      `dbmagic.prompts.untrusted`), which refuses what MLflow's sandbox would allow and a prompt needs not.

    Either way the registry text is someone else's, so it gets only the variables it names, each
    plain data (`dbmagic.prompts.untrusted.plain`), from ``given`` (``--var NAME=VALUE``) first, then the
    notebook. A chat prompt (a list of ``{"role", "content"}`` messages) renders to messages
    (`render_messages`), the cell's body a last user turn after them.
    """

    def __init__(self, source: str | list[dict[str, Any]], uri: str, body: Template | None = None,
                 given: Mapping[str, Any] | None = None):
        from . import untrusted as _untrusted

        self.source, self.uri, self._body, self._given = source, uri, body, dict(given or {})
        self.chat = not isinstance(source, str)
        texts = _message_texts(source, uri) if self.chat else [source]
        self.jinja = is_jinja_prompt(texts)
        self._compiled: Any = []
        if self.jinja:
            names: set[str] = set()
            for text in texts:
                try:
                    compiled, found = _untrusted.compile_untrusted(text)
                except _untrusted.Limited as exc:
                    raise self._refused(exc) from None
                except Exception as exc:  # jinja2.TemplateSyntaxError, a RecursionError on absurd nesting
                    line = getattr(exc, "lineno", "?")
                    raise TemplateError(f"The registry prompt {uri} is not a valid template (line {line}: "
                                        f"{getattr(exc, 'message', None) or exc.__class__.__name__}).") from None
                self._compiled.append(compiled)
                names |= found
            self._declared = frozenset(names)
        else:  # MLflow reads a chat prompt's variables from its JSON text
            self._declared = frozenset(PROMPT_VARIABLE.findall(source if isinstance(source, str) else json.dumps(source)))
        reserved = sorted(n for n in self._declared if n.startswith("_") or n.split(".")[0] in _untrusted.RESERVED)
        if reserved:
            raise TemplateError(f"The registry prompt {uri} asks for {', '.join(reserved)}, which is the "
                                "notebook's own state, not a prompt variable; a registry prompt cannot read it.")
        body_names = body.names if body is not None else frozenset()
        self.names = self._declared | body_names
        # what must have a value: every variable of a plain prompt; in Jinja2 an undefined name is allowed
        self.required = (body_names if self.jinja else self.names) - self._given.keys()

    def _refused(self, exc: Exception) -> TemplateError:
        return TemplateError(f"The registry prompt {self.uri} was refused: {exc}. A registry prompt renders as "
                             "data; to use the notebook's full template language, write the text in the cell.")

    def _values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        from . import untrusted as _untrusted

        merged = {**values, **self._given}
        return {n: _untrusted.plain(merged[n], n) for n in sorted(self._declared) if n in merged}

    def _fill(self, texts: list[str], values: Mapping[str, Any], where: str) -> list[str]:
        from . import untrusted as _untrusted

        try:
            given = self._values(values)
            if not self.jinja:
                missing = sorted(self._declared - given.keys())
                if missing:
                    raise TemplateError(
                        f"The registry prompt {self.uri} needs {', '.join(missing)}, which "
                        f"{'is' if len(missing) == 1 else 'are'} not defined {where}. Define "
                        f"{'it' if len(missing) == 1 else 'them'} (plain data: text, numbers, lists, dicts), or "
                        f"give {'it' if len(missing) == 1 else 'them'} with --var NAME=VALUE.")
                return [substitute(text, given) for text in texts]
            return [_untrusted.render_untrusted(compiled, given) for compiled in self._compiled]
        except _untrusted.Limited as exc:
            raise self._refused(exc) from None
        except TemplateError:
            raise
        except Exception as exc:  # an attribute of an undefined name, a filter given the wrong type ...
            import jinja2.exceptions

            if isinstance(exc, jinja2.exceptions.SecurityError):
                raise self._refused(exc) from None
            raise render_error(exc, f"The registry prompt {self.uri}", where,
                               define="Define it (plain data: text, numbers, lists, dicts).",
                               fix="To change the prompt, copy its text into the cell.") from None

    def render(self, values: Mapping[str, Any], *, where: str = "in the notebook") -> Any:
        """The prompt's text, the cell's body after it; for a chat prompt, its messages (`render_messages`)."""
        if self.chat:
            return self.render_messages(values, where=where)
        [text] = self._fill([self.source], values, where)
        if self._body is None:
            return text
        return f"{text}\n\n{self._body.render(values, where=where)}"

    def render_messages(self, values: Mapping[str, Any], *, where: str = "in the notebook") -> list[dict[str, str]]:
        """A chat prompt's messages, rendered, with the cell's body (if any) as a last user turn."""
        contents = self._fill([m["content"] for m in self.source], values, where)
        messages = [{"role": m["role"], "content": c} for m, c in zip(self.source, contents, strict=True)]
        if self._body is not None:
            messages.append({"role": "user", "content": self._body.render(values, where=where)})
        return messages


def _message_texts(source: Any, uri: str) -> list[str]:
    """The contents of a chat prompt's messages, checked: ``{"role": str, "content": str}`` each."""
    if not isinstance(source, list) or not source or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in source):
        raise TemplateError(f"The registry prompt {uri} is neither text nor a list of {{role, content}} messages "
                            "with text content, so dbmagic cannot send it.")
    return [m["content"] for m in source]


class Attached(Template):
    """A template with attachments after what it renders (``--attach``), loaded once."""

    def __init__(self, inner: Template, items: list[Any]):
        self.inner, self.items = inner, items
        self.source, self.names, self.required = inner.source, inner.names, inner.required

    def render(self, values: Mapping[str, Any], *, where: str = "in the notebook") -> Any:
        from .attachments import Parts

        prompt = self.inner.render(values, where=where)
        if not isinstance(prompt, (str, Parts)):
            raise TemplateError("--attach adds to a text prompt; a chat prompt from the registry brings its own "
                                "messages. Put the image in the registry prompt's text, or drop --attach.")
        return Parts([*(prompt if isinstance(prompt, Parts) else [prompt]), "\n", *self.items])


def render_prompt(template: str | Template, namespace: Mapping[str, Any]) -> Any:
    """Fill ``template`` from ``namespace``; an undefined name is an error that names it. A chat
    prompt from the registry gives its messages (a list), any other template its text."""
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
