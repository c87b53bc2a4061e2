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

In [9]: %%dbllm --over tickets --column label -o labelled      # once per row of a DataFrame
   ...: Classify {{ text }} as one of {{ labels }}.

In [10]: %%dbllm -e my-chat -e my-agent -t 0 -t 0.8             # side by side: 2 endpoints x 2 settings
    ...: Name a colour.

In [11]: %%dbllm --prompt prompts:/summarise/1                  # a template from the MLflow Prompt Registry
    ...: Keep it short.

- The cell body is a Jinja2 template over the notebook's variables (``{{ name }}``, ``{{ expr }}``);
  IPython's own ``{}``/``$`` expansion is off, so JSON and code are safe in prompts.
- Every option has a ``%config DbLLM.<name>`` default (``%config DbLLM`` lists them).
- The answer streams into the cell output when the endpoint streams (``--no-stream`` to wait).
- ``-o NAME`` stores the answer (after ``--transform-output``); the full `Completion` (raw response,
  usage, latency) is always in ``_dbllm``. The output's metadata records endpoint, model, usage.
- Errors fail the cell with a short message and the next step; a transform's own traceback is shown.

Subcommands of the line magic: ``whoami``, ``endpoints``, ``history``, ``reset [ENDPOINT]``, ``last``,
``panel`` (an ipywidgets panel for interactive prompting over the same client), ``trace [on|off]``
(MLflow traces of every call) and ``prompts`` (the MLflow Prompt Registry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import magic_arguments
from traitlets import Bool, TraitError, TraitType, Undefined, Unicode, validate

from .. import settings
from ..errors import DbMagicError, SettingError, TransformError, error_of
from ..observe import tracing
from ..prompts.namespace import Notebook
from ..prompts.templating import Attached, RegistryTemplate, Template
from . import cell as _cell
from .line import SUBCOMMANDS, flag_arguments, split_options, subcommand, whole_dbllm_lines, without_comment
from .render import extract_code

__all__ = ["DbLLM", "load_ipython_extension", "unload_ipython_extension"]

def get_client() -> Any:
    # the client (and requests) load on first use, keeping %load_ext as cheap as a bare start
    from ..client import get_client

    return get_client()


def _conversations() -> Any:
    """The kernel's conversations (kept with the shared client)."""
    from . import history as _history

    return _history.of(get_client())


class SettingTrait(TraitType):
    """A ``%config DbLLM.<name>`` trait that takes what the setting takes, with its words."""

    def __init__(self, setting: settings.Setting):
        self.setting = setting
        self.info_text = {float: "a number", int: "a whole number", bool: "True or False", str: "text",
                          list: "a list of strings", dict: "a dict of request fields"}[setting.type]
        if setting.choices:
            self.info_text = "one of " + ", ".join(setting.choices)
        mutable = isinstance(setting.default, (list, dict))
        spelled = f" ({'/'.join(setting.flags)})" if setting.flags else ""
        super().__init__(default_value=Undefined if mutable else setting.default,
                         allow_none=setting.default is None, help=setting.help + spelled)

    def make_dynamic_default(self) -> Any:
        return settings.coerce(self.setting.name, None)  # a fresh [] or {}

    def _validate(self, obj: Any, value: Any) -> Any:
        if value is None and self.allow_none:  # traitlets takes None without asking validate: a repair too
            obj.__dict__.setdefault("refused_settings", {}).pop(self.setting.name, None)
        return super()._validate(obj, value)

    def validate(self, obj: Any, value: Any) -> Any:
        refused = obj.__dict__.setdefault("refused_settings", {})
        try:
            coerced = settings.coerce(self.setting.name, value)
        except SettingError as exc:
            # IPython only logs a refused %config and the cell passes; %dbllm then refuses to run
            refused[self.setting.name] = str(exc)
            raise TraitError(str(exc)) from None
        refused.pop(self.setting.name, None)
        return coerced


def _trait(s: settings.Setting) -> SettingTrait:
    # named like traitlets' own, so that `%config DbLLM` reads "DbLLM.temperature=<Float>"
    name = "Enum" if s.choices else {float: "Float", int: "Int", bool: "Bool", str: "Unicode", list: "List",
                                     dict: "Dict"}[s.type]
    return type(name, (SettingTrait,), {})(s).tag(config=True)


# the %config traits, one per setting; DbLLM (below) adds the magic to them
_Options = type(Magics)("DbLLMOptions", (Magics,), {
    "__doc__": "Defaults for ``%%dbllm``; set them with ``%config DbLLM.<name> = value``.",
    **{s.name: _trait(s) for s in settings.SETTINGS},
})


@magics_class
class DbLLM(_Options):
    """Defaults for ``%%dbllm``; set them with ``%config DbLLM.<name> = value`` (see `dbmagic.settings`)."""

    trace = Bool(False, help="record an MLflow trace of every dbmagic call: the magic, the panel, batches and "
                             "the Python API (as dbmagic.autolog(); %dbllm trace on|off)").tag(config=True)

    cache = Unicode(None, allow_none=True, help="a folder that answers a call whose exact request it already "
                    "holds and records the new ones, so that running a notebook again pays nothing (off by "
                    "default; --cache always|off per cell; %dbllm cache [clear])").tag(config=True)

    cache_shared = Bool(False, help="the cache folder is shared on purpose: the answers other users wrote there "
                                    "are used too (by default only your own are)").tag(config=True)

    @validate("cache")
    def _switch_cache(self, proposal: Any) -> str | None:
        self._use_cache(proposal["value"], self.cache_shared)
        return proposal["value"]

    @validate("cache_shared")
    def _share_cache(self, proposal: Any) -> bool:
        if self.cache:
            self._use_cache(self.cache, proposal["value"])
        return proposal["value"]

    @staticmethod
    def _use_cache(folder: str | None, shared: bool) -> None:
        from ..call import ledger

        try:
            ledger.use_cache(folder or None, shared=shared)
        except DbMagicError as exc:
            raise TraitError(str(exc)) from None

    @validate("trace")
    def _switch_tracing(self, proposal: Any) -> bool:
        try:
            tracing.autolog(disable=not proposal["value"])
        except DbMagicError as exc:
            raise TraitError(str(exc)) from None
        return proposal["value"]

    def setting_values(self) -> dict[str, Any]:
        """The ``%config`` defaults in force, by setting name (the panel starts from them)."""
        return {s.name: getattr(self, s.name) for s in settings.SETTINGS}

    @no_var_expand
    @magic_arguments()
    @flag_arguments
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
        finally:  # a traced cell's traces are readable in the next cell (MLflow writes them in the background)
            tracing.flush()

    # -- the adapter ---------------------------------------------------------------------------

    def _run(self, line: str, cell: str | None) -> None:
        command = subcommand(without_comment(line), lambda: _conversations().keys()) if cell is None else None
        if command is not None:
            return getattr(self, f"_cmd_{command[0]}")(command[1])
        argv, prompt = split_options(line)
        args = self.dbllm.parser.parse_args([*argv, "--", prompt] if prompt else argv)  # UsageError if bad
        refused = self.__dict__.get("refused_settings") or {}
        if refused and not args.no_config:
            name, why = next(iter(refused.items()))
            raise UsageError(f"%config DbLLM.{name} was refused ({why}), so this cell would not run as you set it. "
                             f"Set it again to a value it takes, or back to its default: %config DbLLM.{name} = "
                             f"{settings.BY_NAME[name].default!r}.")
        if cell is not None and args.text:
            raise UsageError(f"Unexpected words after the options: {' '.join(args.text)!r}. "
                             "With %%dbllm the prompt goes in the cell body.")
        overrides = {s.name: getattr(args, s.name) for s in settings.SETTINGS if s.flags}
        for setting in settings.SETTINGS:  # one dict per -p (per --var)
            if setting.type is dict and overrides.get(setting.name) is not None:
                overrides[setting.name] = {k: v for item in overrides[setting.name] for k, v in item.items()}
        axes = settings.sweeps(overrides)  # a setting given several times: compared side by side
        config = {} if args.no_config else self.setting_values()
        values = settings.merge(config, overrides)
        version = tracing.load_prompt(values["prompt"]) if values["prompt"] else None  # an alias resolved once
        if version is not None:  # its model_config and response_format, unless the cell sets them
            values = settings.merge(settings.merge(config, tracing.prompt_settings(version)), overrides)
        template = self._template(version, " ".join(args.text) if cell is None else cell, cell is None,
                                  raw=values["raw"], given=values["vars"])
        if values["attach"]:  # loaded once, before anything is sent
            from ..prompts.attachments import attached

            template = Attached(template if isinstance(template, Template) else Template(template),
                                attached(values["attach"], self.shell.user_ns))
        from ..call.ledger import CACHE_MODE

        mode = CACHE_MODE.set(values["cache_mode"])  # this cell's --cache, for every call it makes
        try:
            with tracing.prompt_span(version) if version is not None else contextlib.nullcontext():
                if axes or values["repeat"] > 1:
                    return self._compare(values, axes, template)
                return self._send(values, template)
        finally:
            CACHE_MODE.reset(mode)

    def _compare(self, values: dict[str, Any], axes: dict[str, list[Any]], template: str | Template) -> None:
        """Several endpoints or settings side by side (`dbmagic.frontends.compare`)."""
        from . import compare as _compare

        if values["chat"]:
            raise UsageError("A comparison sends each call on its own, so there is no conversation: drop --chat.")
        namespace, client = Notebook(self.shell.user_ns), get_client()
        rich = type(self.shell).__name__ != "TerminalInteractiveShell"
        compared = _compare.cells(values, axes)
        judges = self._judges(values)  # resolved, and able to run, before anything is sent
        if values["over"]:  # one answer column (and one error column) per compared call
            from ..batching.result import is_frame

            results = {}
            for label, cell_values in compared:
                results[label] = self._over(cell_values, settings.spec_from(cell_values), template, client, rich,
                                            store=False)
                if results[label].interrupted:  # Ctrl-C: the columns so far are kept, the cell fails
                    namespace[_cell.LAST] = results
                    raise KeyboardInterrupt
            rows, output = namespace[values["over"]], results
            if is_frame(rows):
                output = rows.copy()
                for label, result in results.items():
                    output[f"{values['column']}:{label}"] = result.values
                    output[f"error:{label}"] = result.errors
            namespace[_cell.LAST] = results
            if values["output"]:
                namespace[values["output"]] = output
            for label, result in results.items():
                _fail_if_nothing(result, values, f"--over {values['over']} ({label})",
                                 every=all(len(r.failed) == len(r) for r in results.values()))
            if judges:
                output = self._judged(values, results, judges)
                if values["output"]:
                    namespace[values["output"]] = output
            return None
        if values["dry_run"]:
            for label, cell_values in compared:
                print(f"--- {label}")
                _cell.dry_run(settings.spec_from(cell_values), template, namespace, client, rich=rich)
            return None
        result = _compare.run(compared, template, namespace, client, repeat=values["repeat"], rich=rich)
        if values["output"]:
            namespace[values["output"]] = result
        failed = {label: error_of(v) if v is not None else DbMagicError("not run") for label, v in result.items()
                  if v is None or error_of(v) is not None}
        if failed and (len(failed) == len(result) or values["fail_on_error"]):
            label, error = next(iter(failed.items()))
            every = len(failed) == len(result)
            head = "Every compared call failed" if every else (
                f"{len(failed)} compared call{'' if len(failed) == 1 else 's'} failed and --fail-on-error is on")
            raise UsageError(f"{head} ({len(failed)} of {len(result)}; the table above shows each): {label}: {error}")
        if judges:
            self._judged(values, result, judges)
        return None

    def _template(self, version: Any, body: str, one_line: bool, raw: bool = False,
                  given: dict[str, Any] | None = None) -> str | Template:
        """The cell's template: the body (as written with ``--raw``), or a registered prompt version
        (rendered as MLflow renders it, as data: `RegistryTemplate`) with the body after it."""
        if version is not None:
            return RegistryTemplate(version.template, tracing.version_uri(version),
                                    Template(body, raw=raw) if body.strip() else None, given=given)
        if given:
            raise UsageError("--var fills a registry prompt's variables: use it with --prompt (in a cell of your "
                             "own, use the notebook's variables).")
        if body.strip():
            return Template(body, raw=True) if raw else body
        if one_line:
            raise UsageError(
                "No prompt: write it after the options (%dbllm -e NAME What is 2+2?) or use %%dbllm with "
                "the prompt in the cell. Subcommands: " + ", ".join(SUBCOMMANDS) + "."
            )
        raise UsageError("The cell is empty: write the prompt below the %%dbllm line (or use --prompt).")

    def _send(self, values: dict[str, Any], template: str | Template) -> None:
        if (values["checkpoint"] or values["max_tokens_total"] or values["max_cost"] or values["background"]) \
                and not values["over"]:
            raise UsageError("--checkpoint, --max-tokens-total, --max-cost and --background are for a batch: use "
                             "them with --over.")
        if (values["judge"] or values["expect"]) and not values["over"]:
            raise UsageError("--judge judges many answers: use it with --over (a batch) or a comparison "
                             "(-e A -e B); for one answer, call your scorer on it.")
        spec = settings.spec_from(values)
        namespace = Notebook(self.shell.user_ns)  # a frame's local: Verbose shows no notebook value
        client = get_client()
        rich = type(self.shell).__name__ != "TerminalInteractiveShell"
        if values["over"]:
            return self._over(values, spec, template, client, rich, judges=self._judges(values))
        if values["dry_run"]:
            _cell.dry_run(spec, template, namespace, client, rich=rich)
            return None
        completion = _cell.run_prompt(spec, template, namespace, client, rich=rich)
        if values["output"]:
            namespace[values["output"]] = completion.value
        if values["insert"]:
            self.shell.set_next_input(extract_code(completion.text)[0], replace=False)
        return None

    def _over(self, values: dict[str, Any], spec: Any, template: str | Template, client: Any, rich: bool,
              store: bool = True, judges: list[Any] | None = None) -> Any:
        """``--over VAR``: the template once per row of a DataFrame or list, as `dbmagic.batch`
        (``store=False``: return the `BatchResult` rather than keep it in the notebook); a Spark
        DataFrame's rows on its executors, as `dbmagic.spark.complete`."""
        namespace, name = Notebook(self.shell.user_ns), values["over"]
        if name not in namespace:
            raise UsageError(f"--over {name}: the notebook has no variable {name!r}. Name a DataFrame or a list.")
        if spec.chat:
            raise UsageError("--over sends each row on its own, so there is no conversation: drop --chat.")
        rows = namespace[name]
        checkpoint = path_value(values["checkpoint"], namespace, "--checkpoint")
        if _is_spark(rows):
            return self._over_spark(values, spec, template, rows, client, store, checkpoint)
        if values["dry_run"]:  # how many rows, about how many tokens, and the first row's request
            from ..batching.run import estimate, row_contexts

            contexts = row_contexts(rows)[0]
            if not contexts:
                raise UsageError(f"--over {name}: it has no rows.")
            sent, held, tokens = estimate(template, rows, namespace, values["send_missing"])
            print(f"--over {name}: {sent:,} rows would be sent" + (f" ({held:,} kept back by a missing value)"
                                                                    if held else "")
                  + f", about {tokens:,} input tokens (4 characters a token, an image width x height / 750); nothing "
                  "was sent. The first row's "
                  "request:")
            _cell.dry_run(spec, template, namespace.with_row(contexts[0]), client, rich=rich)
            return None
        background = values["background"] and store
        if background and values["judge"]:
            raise UsageError("--judge needs the answers: run the batch in the foreground, or judge the background "
                             "batch's result() with dbmagic.evaluate when it is done.")
        result, frame = _cell.run_batch(spec, template, rows, namespace, client, concurrency=values["concurrency"],
                                        column=values["column"], send_missing=values["send_missing"],
                                        checkpoint=checkpoint, shared_checkpoint=values["shared_checkpoint"],
                                        max_tokens_total=values["max_tokens_total"],
                                        max_cost=values["max_cost"], background=background,
                                        rows_per_request=values["rows_per_request"])
        if background:  # the handle: its progress shows in this cell while other cells run
            namespace[_cell.LAST] = result
            if values["output"]:
                namespace[values["output"]] = result
            print(f"Running in the background ({values['output'] or _cell.LAST}.result() waits for it; .done says "
                  f"whether it has ended; .cancel() stops it).")
            return None
        print(result.summary())
        if not store:
            return result
        namespace[_cell.LAST] = result
        if values["output"]:
            namespace[values["output"]] = frame if frame is not None else result
        if result.interrupted:  # Ctrl-C: what arrived is kept (above), and the cell fails, so Run All stops
            raise KeyboardInterrupt
        _fail_if_nothing(result, values, f"--over {name}")
        if judges:
            frame = self._judged(values, result, judges)
            if values["output"]:
                namespace[values["output"]] = frame
        return None

    def _over_spark(self, values: dict[str, Any], spec: Any, template: str | Template, sdf: Any, client: Any,
                    store: bool, checkpoint: str | None) -> Any:
        """``--over`` a Spark DataFrame: `dbmagic.spark.complete` on its executors, cached and
        counted here, so the answers are computed now, once (a Spark DataFrame is lazy); with
        ``--checkpoint``, kept there as each task's calls finish, so a cached result Spark drops and
        computes again, or the cell run again, sends nothing answered."""
        from ..batching import spark as spark_batch

        if isinstance(template, RegistryTemplate):
            raise UsageError("--over a Spark DataFrame takes the cell's own template: copy the registry prompt's text "
                             "into the cell.")
        if values["judge"] or values["background"] or values["max_tokens_total"] or values["max_cost"] or not store:
            raise UsageError("--over a Spark DataFrame runs dbmagic.spark.complete, which takes no --judge, "
                             "--background, budget or comparison: collect a sample to pandas for those "
                             "(--over sample with sample = df.limit(100).toPandas()).")
        options, t_out = _cell.call_options(spec, Notebook(self.shell.user_ns))
        endpoint = options.pop("endpoint")
        source = template.source if isinstance(template, Template) else template
        column, error = values["column"], "error"
        out = spark_batch.complete(sdf, source, endpoint, output_col=column, error_col=error, client=client,
                                     transform_output=t_out, timeout=spec.timeout, send_missing=values["send_missing"],
                                     checkpoint=checkpoint, shared_checkpoint=values["shared_checkpoint"],
                                     rows_per_request=values["rows_per_request"], **options).cache()
        total = out.count()  # the job runs here, once; the cache keeps its answers for what follows
        failed = out.filter(out[error].isNotNull()).count()
        namespace = Notebook(self.shell.user_ns)
        namespace[_cell.LAST] = out
        if values["output"]:
            namespace[values["output"]] = out
        print(f"{total} rows on Spark: {total - failed} answered, {failed} failed (the result is cached: "
              f"{values['output'] or _cell.LAST}.select(...), .write.saveAsTable(...)).")
        if total and (failed == total or (failed and values["fail_on_error"])):
            first = out.filter(out[error].isNotNull()).select(error).first()[0]
            raise UsageError(f"{'Every row' if failed == total else f'{failed} of {total} rows'} of --over "
                             f"{values['over']} failed{'' if failed == total else ' and --fail-on-error is on'}; "
                             f"the first: {first}")
        return None

    def _judges(self, values: dict[str, Any]) -> list[Any] | None:
        """The scorers ``--judge`` names, resolved and checked before anything is sent."""
        if not values["judge"]:
            return None
        from ..observe import judging

        return judging.scorers_named(values["judge"], Notebook(self.shell.user_ns))

    def _judged(self, values: dict[str, Any], result: Any, judges: list[Any]) -> Any:
        """``--judge``: ``result`` (a batch's, or a comparison's) judged by ``judges``, shown."""
        from IPython.display import display

        from ..observe import judging

        judged = judging.evaluate(result, judges, expectations=values["expect"])
        display(judged)
        return judged

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
        """Every target -e takes: serving endpoints, model services (catalog.schema.name) and apps (apps/NAME)."""
        found, notes = get_client().targets()
        rows = [[e.name, e.task and e.described or f"({e.described})", e.state, e.endpoint_type or "",
                 ", ".join(e.served)] for e in found]
        if not rows:
            raise UsageError("The workspace has no serving endpoints, model services or apps you can see.")
        _show_table(["name", "task", "state", "type", "serves"], rows)
        for note in notes:
            print(note)

    def _cmd_history(self, args: list[str]) -> None:
        conversations = _conversations()
        keys = args or conversations.keys()
        if not keys:
            print("No conversation yet: add --chat to %%dbllm to keep one.")
            return
        for key in keys:
            print(f"--- {key}")
            for turn in conversations.get(key):
                print(f"{turn['role']}: {turn['content']}")

    def _cmd_reset(self, args: list[str]) -> None:
        conversations = _conversations()
        if args:
            for key in args:
                conversations.reset(key)
            print("Forgot the conversation with " + ", ".join(args) + ".")
        else:
            conversations.reset()
            print("Forgot every conversation.")

    def _cmd_panel(self, args: list[str]) -> None:
        from .panel import panel

        panel(self.shell)

    def _cmd_trace(self, args: list[str]) -> None:
        if args and args[0] not in ("on", "off"):
            raise UsageError("%dbllm trace takes on or off (or nothing, to show whether tracing is on).")
        if args:
            try:
                self.trace = args[0] == "on"
            except TraitError as exc:
                raise UsageError(str(exc)) from None
        print(tracing.describe())

    def _cmd_cache(self, args: list[str]) -> None:
        """The cache's folder, mode and size (``%config DbLLM.cache``); ``clear`` empties it."""
        from ..call import ledger

        store = ledger.cache()
        if store is None:
            print('The cache is off. %config DbLLM.cache = "FOLDER" answers a call whose exact request it holds '
                  "from it, so that running the notebook again pays nothing.")
            return
        if args == ["clear"]:
            print(f"Cleared the cache: {store.clear()} answers dropped from {store.ledger.path}.")
            return
        _show_table(["", ""], [[k, v] for k, v in store.describe().items()], header=False)

    def _cmd_prompts(self, args: list[str]) -> None:
        rows = [[name, version, uri] for name, version, uri in tracing.list_prompts()]
        if not rows:
            print("No prompts in the MLflow Prompt Registry yet: dbmagic.register_prompt(name, template) adds one.")
            return
        _show_table(["name", "latest version", "use with"], [[n, v, f"--prompt {u}"] for n, v, u in rows])

    def _cmd_last(self, args: list[str]) -> None:
        """The last answer (`_dbllm`): one call's details, a batch's summary, or one row per
        compared call (an answer, an error, or a batch over rows)."""
        from ..batching.result import BatchResult

        last = self.shell.user_ns.get(_cell.LAST)
        if last is None:
            raise UsageError("No answer yet in this kernel.")
        if isinstance(last, BatchResult):
            print(last.summary())
        elif isinstance(last, Mapping):  # a comparison: label -> Completion, error, or BatchResult (--over)
            rows = [[label] + (["", "", "", "", "", f"{v.summary()}"] if isinstance(v, BatchResult) else _last_row(v))
                    for label, v in last.items()]
            _show_table(["compared", "endpoint", "served model", "finish", "latency", "tokens", "error"], rows)
        else:
            endpoint, model, finish, latency, tokens, _ = _last_row(last)
            rows = [["endpoint", endpoint], ["where", getattr(last, "where", "")], ["served model", model],
                    ["finish", finish], ["latency", latency],
                    ["tokens", tokens], ["request id", last.request_id or ""]]
            _show_table(["", ""], rows, header=False)


def _fail_if_nothing(result: Any, values: dict[str, Any], what: str, every: bool | None = None) -> None:
    """A batch whose every row failed fails the cell (Run All and Jobs stop), naming the commonest
    failure and its count; so does one with any failed row under ``--fail-on-error``."""
    failed = result.failed
    every = len(failed) == len(result) if every is None else every
    if not failed or not (every or values["fail_on_error"]):
        return
    kinds = result.failures
    kind, count = next(iter(kinds.items()))
    first = next(str(error_of(result[i])) for i in failed
                 if _batch_kind(error_of(result[i])) == kind)
    how = "failed" if every else "failed and --fail-on-error is on"
    raise UsageError(f"{'Every row' if every else f'{len(failed)} of {len(result)} rows'} of {what} {how} "
                     f"({', '.join(f'{n} {k}' for k, n in kinds.items())}). The commonest, {count} times: {first}")


def _batch_kind(error: Any) -> str:
    from ..batching.result import failure_kind

    return failure_kind(error)


def _is_spark(rows: Any) -> bool:
    """A Spark DataFrame (classic or Connect), without importing pyspark."""
    return type(rows).__module__.startswith("pyspark.sql") and hasattr(rows, "mapInPandas")


def path_value(value: str | None, namespace: Any, option: str) -> str | None:
    """A path given to an option, with ``{{ name }}`` filled from the notebook as in the cell body
    (``--checkpoint /Volumes/main/default/work/{{ run }}``)."""
    if not value or "{" not in value:
        return value
    filled = Template(value).render(namespace, where="in the notebook")
    if "{" in filled or "}" in filled:
        raise UsageError(f"{option} {value!r}: a path holds no {{ or }}. To fill in a notebook variable, write "
                         f"{{{{ name }}}} as in the cell (quoted when it has spaces: {option} \"{{{{ ck }}}}/run\").")
    return filled


def _last_row(item: Any) -> list[str]:
    """endpoint, served model, finish, latency, tokens and error of one call's outcome."""
    if isinstance(item, Exception):
        return [getattr(item, "target", "") or "", "", "", "", "", str(item)]
    if item is None:
        return ["", "", "", "", "", "not run"]
    error = getattr(item, "error", None)  # a cut answer's
    return [item.endpoint, item.served_model or "", item.finish_reason or "", f"{item.latency * 1000:.0f} ms",
            " / ".join(f"{k} {v}" for k, v in item.usage.as_dict().items()), str(error) if error is not None else ""]


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


def load_ipython_extension(ipython: Any) -> None:
    magics = DbLLM(shell=ipython, parent=ipython)
    ipython.register_magics(magics)
    unload_ipython_extension(ipython)  # a second %load_ext/%reload_ext replaces, not duplicates
    ipython.configurables.append(magics)
    ipython.input_transformers_cleanup.append(whole_dbllm_lines)


def unload_ipython_extension(ipython: Any) -> None:
    ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, DbLLM)]
    transformers = getattr(ipython, "input_transformers_cleanup", [])
    transformers[:] = [t for t in transformers if getattr(t, "__name__", "") != whole_dbllm_lines.__name__]
