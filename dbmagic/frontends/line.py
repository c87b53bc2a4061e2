"""The ``%dbllm`` line's grammar: which words are options (and which take a value), where the
one-line prompt starts, a comment after it, the subcommands and the words each takes, and the
argparse options the settings table makes. No IPython state: `dbmagic.frontends.magic` applies it."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Callable, Collection, Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument

from .. import settings
from ..errors import SettingError

# the subcommands' exact grammar: the words each takes after its name ("conversations": names of
# kept conversations). A line whose first word is a subcommand is that subcommand, or an error.
GRAMMAR: dict[str, tuple[str, ...] | str] = {
    "whoami": (), "endpoints": (), "last": (), "panel": (), "prompts": (),
    "history": "conversations", "reset": "conversations", "trace": ("on", "off"), "cache": ("clear",),
}
SUBCOMMANDS = tuple(GRAMMAR)
NO_CONFIG = "--no-config"
# which words on the %%dbllm line are options, and which of them take a value
FLAGS: dict[str, bool] = {flag: s.type is not bool for s in settings.SETTINGS for flag in s.flags}
FLAGS[NO_CONFIG] = False


def flag_arguments(func: Callable[..., Any]) -> Callable[..., Any]:
    """``@argument`` for every setting that has a flag, in the table's order, then the prompt."""
    decorators = [argument(*s.flags, **_argparse_options(s)) for s in settings.SETTINGS if s.flags]
    decorators.append(argument(NO_CONFIG, action="store_true", help="ignore the %%config DbLLM defaults for this cell"))
    decorators.append(argument("text", metavar="prompt", nargs="*", help="the prompt, for the one-line %%dbllm (the cell body "
                                                         "otherwise); -- before it when it starts with a dash"))
    for decorate in reversed(decorators):  # magic_arguments reads them bottom-up, as written in source
        func = decorate(func)
    return func


def _argparse_options(s: settings.Setting) -> dict[str, Any]:
    options: dict[str, Any] = {"dest": s.name, "default": None,
                               "help": (s.flag_help or s.help).replace("%", "%%")}
    if s.type is bool:
        return {**options, "action": "store_const", "const": not s.default}
    if s.metavar:
        options["metavar"] = s.metavar
    elif s.choices:
        options["metavar"] = "{" + ",".join(s.choices) + "}"
    if s.repeatable or s.sweep:
        options["action"] = "append"
    else:
        options["action"] = _Once
    options["type"] = _converter(s)
    return options


_DASHES = "\x00--"  # a value "--" on its way through argparse (see split_options)


class _Once(argparse.Action):
    """An option that takes one value: given twice on a line, it is an error, never silently the last."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if getattr(namespace, self.dest, None) is not None:
            hint = (" Give the endpoints once, comma-separated (--compare A,B), or as -e A -e B."
                    if self.dest == "compare" else "")
            raise argparse.ArgumentError(self, f"given twice; it takes one value.{hint}")
        setattr(namespace, self.dest, values)


def _converter(s: settings.Setting) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        text = "--" if text == _DASHES else text
        try:
            if s.type is dict:
                return settings.parse_param(text, s.name)
            value = settings.from_text(s.name, text)
        except SettingError as exc:  # argparse shows it after the flag's name
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value[0] if s.type is list else value

    convert.__name__ = s.name
    return convert


def subcommand(line: str, kept: Callable[[], Collection[str]]) -> tuple[str, list[str]] | None:
    """``(subcommand, its words)`` when ``line`` is one (`GRAMMAR`), None for a prompt; a UsageError
    for a line that starts like a subcommand but does not follow its grammar, with how to send the
    line as a prompt instead (after ``--``). ``kept``: the names of the kept conversations."""
    words = line.split()
    if not words:
        return None
    name, args = words[0], words[1:]
    as_prompt = f"To send it as a prompt, write %dbllm -- {line.strip()}"
    listed = "The subcommands: " + ", ".join(SUBCOMMANDS) + "; %dbllm? shows the options."
    rule = GRAMMAR.get(name)
    if rule is None:
        import difflib

        if len(words) == 1 and (name.lower() in ("help", "-h", "commands") or
                                difflib.get_close_matches(name.lower(), SUBCOMMANDS, n=1, cutoff=0.75)):
            raise UsageError(f"{name!r} is not a subcommand of %dbllm. {listed} {as_prompt}.")
        return None
    if rule == "conversations":
        names = kept()
        unknown = [a for a in args if a not in names]
        if unknown:
            raise UsageError(f"%dbllm {name} takes the names of kept conversations ({', '.join(names) or 'none yet'}), "
                             f"not {' '.join(unknown)!r}. {as_prompt}.")
    elif len(args) > (1 if rule else 0) or any(a not in rule for a in args):
        takes = f"{' or '.join(rule)} (or nothing)" if rule else "no words after it"
        raise UsageError(f"%dbllm {name} takes {takes}. {as_prompt}.")
    return name, args


def split_options(line: str) -> tuple[list[str], str]:
    """Split ``line`` into the leading options (as argv) and the raw rest (the one-line prompt),
    so a prompt keeps its quotes and apostrophes exactly as typed.

    Options are the words of `dbmagic.settings` (and ``--no-config``); the prompt starts at the
    first other word, or after ``--``. A word like ``-5`` starts a prompt; an unknown ``--word``
    is an error rather than a prompt, so a typo in an option is never sent to the endpoint.
    """
    argv: list[str] = []
    expecting_value = False
    for start, end in word_spans(line):
        if line[start] == "#":  # a comment, as in Python: the rest of the line
            return argv, ""
        try:
            (word,) = shlex.split(line[start:end])
        except ValueError:  # an unbalanced quote: it belongs to the prompt
            return argv, prompt_without_comment(line[start:])
        if expecting_value:
            argv.append(word)
            expecting_value = False
        elif word == "--":
            return argv, prompt_without_comment(line[end:])
        elif word.split("=", 1)[0] in FLAGS:
            # argparse drops a value that is exactly "--" (`--stop=--`): it travels as _DASHES
            argv.append(word[:-2] + _DASHES if word.endswith("=--") else word)
            expecting_value = FLAGS[word.split("=", 1)[0]] and "=" not in word
        elif word.startswith("--") and word[2:3].isalpha():
            raise UsageError(f"Unknown option {word.split('=', 1)[0]!r} (see %%dbllm?). "
                             "If the prompt starts with it, put -- before the prompt.")
        else:
            return argv, prompt_without_comment(line[start:])
    return argv, ""


_PROMPT_COMMENT = re.compile(r"\s{2,}#.*$")


def prompt_without_comment(prompt: str) -> str:
    """A one-line prompt without a trailing comment: two spaces or more, then ``#`` (Python's style
    for a comment after code), so a ``#`` of the prompt itself stays (``C#``, ``tag #1``)."""
    return _PROMPT_COMMENT.sub("", prompt).strip()


def without_comment(line: str) -> str:
    """A subcommand's line without its comment: ``#`` after white space ends it (``%dbllm whoami  # who``)."""
    return re.sub(r"(^|\s)#.*$", "", line).strip()


def word_spans(line: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each shell word of ``line``, quotes and backslashes respected."""
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            return
        start, quote = i, None
        while i < n:
            c = line[i]
            if quote:
                if c == quote:
                    quote = None
                elif c == "\\" and quote == '"':
                    i += 1
            elif c in "'\"":
                quote = c
            elif c == "\\":
                i += 1
            elif c.isspace():
                break
            i += 1
        yield start, min(i, n)


LINE_MAGIC = re.compile(r"^(?P<indent>[ \t]*)%dbllm(?P<rest>[ \t].*)?$")


def whole_dbllm_lines(lines: list[str]) -> list[str]:
    """IPython input transformer (a cleanup one, run before IPython reads ``?`` as a help request):
    a ``%dbllm`` line that ends in ``?`` reaches the magic whole, so ``%dbllm How are you?`` is a
    prompt and not "Object `you` not found". ``%dbllm?`` and ``%%dbllm`` cells are left as they are."""
    if not lines or lines[0].lstrip().startswith("%%"):
        return lines
    out = []
    for line in lines:
        match = LINE_MAGIC.match(line.rstrip("\r\n"))
        rest = (match.group("rest") or "").strip() if match else ""
        if match and rest.endswith("?") and not line.rstrip().endswith("\\"):
            line = f"{match.group('indent')}get_ipython().run_line_magic('dbllm', {rest!r})\n"
        out.append(line)
    return out
