"""``%%dbllm`` and ``%dbllm``: Databricks-served LLMs in a notebook cell.

In [1]: %load_ext dbmagic

In [2]: %dbllm whoami                      # the workspace, where its credentials came from, token ***

In [3]: %dbllm endpoints                   # name, task, state and type of each serving endpoint

In [4]: %config DbLLM.endpoint = "databricks-meta-llama-3-3-70b-instruct"

In [5]: %%dbllm -t 0.2 --max-tokens 200 --system "Be brief." -o answer
   ...: Summarize {{ notes }} for {{ audience }}.

In [6]: %dbllm What is 2+2?                # a one-line prompt

In [7]: %%dbllm --cluster-id 0123-456789-abc --port 7777     # a driver-proxy app
   ...: How are you?

In [8]: %%dbllm --transform-input add_context --transform-output to_upper --dry-run
   ...: Show me the request, do not send it.

- The cell body is a Jinja2 template over the notebook's variables (``{{ name }}``, ``{{ expr }}``);
  IPython's own ``{}``/``$`` expansion is off, so JSON and code are safe in prompts.
- Every option has a ``%config DbLLM.<name>`` default (``%config DbLLM`` lists them).
- The answer streams into the cell output when the endpoint streams (``--no-stream`` to wait).
- ``-o NAME`` stores the answer (after ``--transform-output``); the full `Completion` (raw response,
  usage, latency) is always in ``_dbllm``. The output's metadata records endpoint, model, usage.
- Errors fail the cell with a short message and the next step; a transform's own traceback is shown.

Subcommands of the line magic: ``whoami``, ``endpoints``, ``history``, ``reset [ENDPOINT]``, ``last``,
``panel`` (an ipywidgets panel for interactive prompting over the same client).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Bool, CaselessStrEnum, Dict, Float, Int, List, Unicode

from . import _cell
from .errors import DbMagicError, TransformError
from .render import FORMATS, extract_code

__all__ = ["DbLLM", "load_ipython_extension", "unload_ipython_extension"]

SUBCOMMANDS = ("whoami", "endpoints", "history", "reset", "last", "panel")
_TAKE_ARGS = ("history", "reset")


def _positive(kind: type) -> Any:
    def convert(text: str) -> Any:
        value = kind(text)  # argparse turns a ValueError into "invalid <kind> value"
        if value <= 0:
            raise ValueError(text)
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def get_client() -> Any:
    # the client (and requests) load on first use, keeping %load_ext as cheap as a bare start
    from .client import get_client

    return get_client()


@magics_class
class DbLLM(Magics):
    """Defaults for ``%%dbllm``; set them with ``%config DbLLM.<name> = value``."""

    endpoint = Unicode(None, allow_none=True, help="Serving endpoint to query.").tag(config=True)
    cluster_id = Unicode(None, allow_none=True, help="Cluster of a driver-proxy app.").tag(config=True)
    port = Int(None, allow_none=True, help="Port of a driver-proxy app.").tag(config=True)
    org_id = Unicode(None, allow_none=True, help="Org (workspace) id for driver-proxy URLs.").tag(config=True)
    task = Unicode(None, allow_none=True, help="Override the endpoint's task (e.g. llm/v1/chat).").tag(config=True)
    system = Unicode(None, allow_none=True, help="System prompt for chat endpoints.").tag(config=True)
    temperature = Float(None, allow_none=True, help="Sampling temperature.").tag(config=True)
    max_tokens = Int(None, allow_none=True, help="Largest number of tokens to generate.").tag(config=True)
    stop = List(Unicode(), help="Stop sequences.").tag(config=True)
    params = Dict(help="Extra request fields, e.g. {'top_p': 0.9}.").tag(config=True)
    timeout = Float(None, allow_none=True, help="Seconds to wait for an answer (or each streamed chunk).").tag(
        config=True)
    format = CaselessStrEnum(FORMATS, default_value="markdown", help="How answers are shown.").tag(config=True)
    stream = Bool(True, help="Stream answers token by token where the endpoint streams.").tag(config=True)
    transform_input = Unicode(None, allow_none=True, help="Name of a transform_input(**request) function.").tag(
        config=True)
    transform_output = Unicode(None, allow_none=True, help="Name of a transform_output(value) function.").tag(
        config=True)
    chat = Bool(False, help="Keep a conversation per endpoint across cells.").tag(config=True)
    dry_run = Bool(False, help="Show every request instead of sending it.").tag(config=True)
    output = Unicode(None, allow_none=True, help="Variable that receives every answer.").tag(config=True)
    insert = Bool(False, help="Put each answer's code into the next cell.").tag(config=True)

    @no_var_expand
    @magic_arguments()
    @argument("-e", "--endpoint", help="serving endpoint to query (default: %%config DbLLM.endpoint)")
    @argument("--cluster-id", help="cluster of a driver-proxy app (found by itself inside Databricks)")
    @argument("--port", type=_positive(int), help="port of a driver-proxy app")
    @argument("--org-id", help="org id for the driver-proxy URL (default: from the workspace)")
    @argument("-t", "--temperature", type=float, help="sampling temperature")
    @argument("--max-tokens", type=_positive(int), help="largest number of tokens to generate")
    @argument("--stop", action="append", help=r'stop sequence, repeatable; escapes like "\n" work')
    @argument("-p", "--param", action="append", metavar="KEY=VALUE",
              help="extra request field, repeatable; VALUE is parsed as JSON when it parses")
    @argument("--system", help=r'system prompt (chat endpoints); escapes like "\n" work')
    @argument("--task", help="override the endpoint's task: chat, completions, embeddings, custom")
    @argument("--timeout", type=_positive(float), help="seconds to wait for the answer, or for each streamed chunk")
    @argument("--transform-input", metavar="NAME", help="function(**request) -> request from the notebook")
    @argument("--transform-output", metavar="NAME", help="function(value) -> value from the notebook")
    @argument("--dry-run", action="store_true", help="show the exact request (token hidden); send nothing")
    @argument("-o", "--output", metavar="VAR", help="store the answer in this variable")
    @argument("-f", "--format", choices=FORMATS, help="markdown (default), text, code, json or html")
    @argument("--insert", action="store_true", help="put the answer's code into the next cell")
    @argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming")
    @argument("--chat", action="store_true", help="keep a conversation with this endpoint across cells")
    @argument("prompt", nargs="*", help="the prompt, for the one-line %%dbllm (the cell body otherwise)")
    @line_cell_magic
    def dbllm(self, line: str, cell: str | None = None) -> None:
        """Send the cell (a Jinja2 template) to a Databricks serving endpoint or driver-proxy app."""
        try:
            self._run(line, cell)
        except TransformError as exc:
            self._show_user_traceback(exc)
            raise UsageError(str(exc)) from None
        except DbMagicError as exc:
            raise UsageError(str(exc)) from None

    # -- the adapter ---------------------------------------------------------------------------

    def _run(self, line: str, cell: str | None) -> None:
        words = line.split()
        # `%dbllm last week's numbers?` is a prompt: only history and reset take words after them
        if cell is None and words and words[0] in SUBCOMMANDS and (len(words) == 1 or words[0] in _TAKE_ARGS):
            return getattr(self, f"_cmd_{words[0]}")(words[1:])
        argv, rest = split_options(self.dbllm.parser, line)
        args = self.dbllm.parser.parse_args(argv)  # raises UsageError on bad values
        if cell is None:
            template = rest
            if not template.strip():
                raise UsageError(
                    "No prompt: write it after the options (%dbllm -e NAME What is 2+2?) or use %%dbllm with "
                    "the prompt in the cell. Subcommands: " + ", ".join(SUBCOMMANDS) + "."
                )
        else:
            if rest.strip():
                raise UsageError(f"Unexpected words after the options: {rest.strip()!r}. "
                                 "With %%dbllm the prompt goes in the cell body.")
            template = cell
            if not template.strip():
                raise UsageError("The cell is empty: write the prompt below the %%dbllm line.")
        output = args.output or self.output
        if output is not None and not output.isidentifier():
            raise UsageError(f"-o {output!r} is not a valid variable name.")
        spec = self._spec(args)
        namespace = self.shell.user_ns
        client = get_client()
        rich = type(self.shell).__name__ != "TerminalInteractiveShell"
        if args.dry_run or self.dry_run:
            _cell.dry_run(spec, template, namespace, client, rich=rich)
            return None
        completion = _cell.run_prompt(spec, template, namespace, client, rich=rich)
        if output:
            namespace[output] = completion.value
        if args.insert or self.insert:
            self.shell.set_next_input(extract_code(completion.text)[0], replace=False)
        return None

    def _spec(self, args: Any) -> _cell.CallSpec:
        def pick(name: str) -> Any:
            value = getattr(args, name)
            return value if value is not None else getattr(self, name)

        # an endpoint or proxy app named on the line beats one from %config
        if args.endpoint:
            endpoint, cluster_id, port = args.endpoint, None, None
        elif args.cluster_id or args.port:
            endpoint, cluster_id, port = None, pick("cluster_id"), pick("port")
        else:
            endpoint, cluster_id, port = self.endpoint, self.cluster_id, self.port
        params = dict(self.params)
        params.update(parse_params(args.param or []))
        return _cell.CallSpec(
            endpoint=endpoint, cluster_id=cluster_id, port=port, org_id=pick("org_id"),
            task=pick("task"), system=unescape(args.system) if args.system is not None else self.system,
            temperature=pick("temperature"),
            max_tokens=pick("max_tokens"),
            stop=[unescape(s) for s in args.stop] if args.stop else list(self.stop),
            params=params, timeout=pick("timeout"), format=(args.format or self.format).lower(),
            stream=self.stream and not args.no_stream, chat=args.chat or self.chat,
            transform_input=pick("transform_input"), transform_output=pick("transform_output"),
        )

    def _show_user_traceback(self, exc: TransformError) -> None:
        """Show the user's own traceback from inside the transform (our frames left out)."""
        cause = exc.__cause__
        if cause is None or cause.__traceback__ is None:
            return
        tb = cause.__traceback__.tb_next or cause.__traceback__  # skip dbmagic's calling frame
        self.shell.showtraceback((type(cause), cause, tb))

    # -- subcommands ---------------------------------------------------------------------------

    def _cmd_whoami(self, args: list[str]) -> None:
        info = get_client().whoami()
        _show_table(["", ""], [[k, v] for k, v in info.items()], header=False)

    def _cmd_endpoints(self, args: list[str]) -> None:
        rows = [[e.name, e.task or "(custom model)", e.state, e.endpoint_type or "", ", ".join(e.served)]
                for e in get_client().endpoints()]
        if not rows:
            raise UsageError("The workspace has no serving endpoints you can see.")
        _show_table(["name", "task", "state", "type", "serves"], rows)

    def _cmd_history(self, args: list[str]) -> None:
        conversations = get_client().conversations
        keys = args or conversations.keys()
        if not keys:
            print("No conversation yet: add --chat to %%dbllm to keep one.")
            return
        for key in keys:
            print(f"--- {key}")
            for turn in conversations.get(key):
                print(f"{turn['role']}: {turn['content']}")

    def _cmd_reset(self, args: list[str]) -> None:
        conversations = get_client().conversations
        if args:
            for key in args:
                conversations.reset(key)
            print("Forgot the conversation with " + ", ".join(args) + ".")
        else:
            conversations.reset()
            print("Forgot every conversation.")

    def _cmd_panel(self, args: list[str]) -> None:
        from ._panel import panel

        panel(self.shell)

    def _cmd_last(self, args: list[str]) -> None:
        completion = self.shell.user_ns.get(_cell.LAST)
        if completion is None:
            raise UsageError("No answer yet in this kernel.")
        usage = completion.usage or {}
        rows = [["endpoint", completion.endpoint], ["served model", completion.served_model or ""],
                ["finish", completion.finish_reason or ""], ["latency", f"{completion.latency * 1000:.0f} ms"],
                ["tokens", " / ".join(f"{k.split('_')[0]} {v}" for k, v in usage.items())],
                ["request id", completion.request_id or ""]]
        _show_table(["", ""], rows, header=False)


def _show_table(headers: list[str], rows: list[list[str]], *, header: bool = True) -> None:
    from IPython.display import display

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    md = []
    if header:
        md += ["| " + " | ".join(headers) + " |"]
    else:
        md += ["| | |"]
    md += ["|" + "---|" * len(headers)]
    md += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    widths = [max(len(str(r[i])) for r in ([headers] if header else []) + rows) for i in range(len(headers))]
    lines = [headers] if header else []
    text = "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in lines + rows)
    display({"text/markdown": "\n".join(md), "text/plain": text}, raw=True)


def split_options(parser: Any, line: str) -> tuple[list[str], str]:
    """Split ``line`` into the leading options (as argv) and the raw rest (the one-line prompt),
    so a prompt keeps its quotes and apostrophes exactly as typed."""
    lexer = shlex.shlex(line, posix=True)
    lexer.whitespace_split = True
    lexer.commenters = ""
    argv: list[str] = []
    expecting_value = False
    end = 0
    while True:
        try:
            token = lexer.get_token()
        except ValueError:  # an unbalanced quote: it belongs to the prompt
            break
        if token is None:
            return argv, ""
        if expecting_value:
            expecting_value = False
        elif token.startswith("-") and token != "-":
            action = parser._option_string_actions.get(token.split("=", 1)[0])
            expecting_value = action is not None and action.nargs != 0 and "=" not in token
        else:
            break
        argv.append(token)
        end = lexer.instream.tell()
    return argv, line[end:].strip()


def parse_params(items: list[str]) -> dict[str, Any]:
    """``-p key=value`` pairs; a value that parses as JSON is taken as JSON (numbers, lists, ...)."""
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"-p takes KEY=VALUE, e.g. -p top_p=0.9; got {item!r}.")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


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


def load_ipython_extension(ipython: Any) -> None:
    magics = DbLLM(shell=ipython, parent=ipython)
    ipython.register_magics(magics)
    unload_ipython_extension(ipython)  # a second %load_ext/%reload_ext replaces, not duplicates
    ipython.configurables.append(magics)


def unload_ipython_extension(ipython: Any) -> None:
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, DbLLM)]
