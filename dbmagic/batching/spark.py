"""Prompts over a Spark DataFrame, computed on the executors (``pip install 'dbmagic[spark]'``).

>>> import dbmagic.spark
>>> out = dbmagic.spark.complete(tickets, "Classify the ticket: {{ text }}",
...                              endpoint="databricks-meta-llama-3-3-70b-instruct", concurrency_per_task=4)
>>> out.select("text", "answer", "error").show()

Each task runs `dbmagic.batch` over its partition: bounded concurrency per task, the same pacing
under rate limits, the same retry policy and timeouts as the driver's client, and a failed row keeps
its place with its error. The template's ``{{ names }}`` are columns; they are checked before the
job starts.

The executors cannot read the notebook context, so the driver's credentials travel with the task:
the workspace host and the token in force when `complete` is called (the notebook's token inside
Databricks; for OAuth, the current access token, valid for about an hour). They are kept out of
the query plan (``explain()``), the Spark UI, logs and error messages.

**When SQL's ``ai_query`` is the better tool.** On a Databricks SQL warehouse, or a cluster on
Databricks Runtime 15.4 and later, ``ai_query`` runs the same prompt over a table with Databricks
scheduling the calls, and needs no Python on the executors. The equivalent of the call above::

    SELECT *, ai_query('databricks-meta-llama-3-3-70b-instruct',
                       CONCAT('Classify the ticket: ', text),
                       failOnError => false) AS result
    FROM tickets
    -- result.response is the answer, result.errorMessage the error

**Answers as data.** With ``schema=`` (a pydantic model, a JSON Schema dict or the short form
``"label: str, score: float"``), the answer comes back as real typed columns, one per field of the
schema (string, long, double, boolean, array, struct), then ``error_col`` and ``{output_col}_raw``
(the raw text of an answer that did not fit), as ``ai_query(..., responseFormat => ...)`` gives.
On the executors a pydantic model's answer is checked against the model's JSON Schema (the class
itself stays on the driver). The equivalent in SQL::

    SELECT *, from_json(result.response, 'label STRING, score DOUBLE') AS answer,
           result.errorMessage AS error
    FROM (SELECT *, ai_query('databricks-meta-llama-3-3-70b-instruct',
                             CONCAT('Classify the ticket: ', text),
                             responseFormat => '{"type": "json_schema", "json_schema": {"name": "answer",
                               "schema": {"type": "object", "properties": {"label": {"type": "string"},
                               "score": {"type": "number"}}, "required": ["label", "score"]}, "strict": true}}',
                             failOnError => false) AS result
          FROM tickets)

`struct_type` gives the Spark schema of a dbmagic schema (``struct_type(S).simpleString()`` is
the DDL ``from_json`` takes).

**A job that outlives its token.** The token travels once, so a job longer than the token's life
(OAuth and notebook tokens last about an hour) meets a 401 midway: on each task, the row that met
it keeps the error, and its remaining rows are not sent, each error saying that the token expired
and how to resume. Save the result, then run `complete` again on it with ``resume=True`` and a
fresh token (a new cell): rows already answered keep their answers, and only the others are sent::

    first = dbmagic.spark.complete(tickets, "Classify: {{ text }}", endpoint=E)
    first.write.saveAsTable("main.default.tickets_classified")    # every row, answered or not
    again = dbmagic.spark.complete(spark.table("main.default.tickets_classified"),
                                   "Classify: {{ text }}", endpoint=E, resume=True)

**Never paying twice.** A Spark DataFrame is lazy: ``out.count()`` then ``out.write...`` runs the
job twice, and a retried or speculative task runs its rows again. With a checkpoint, each task
keeps every answer in a folder as its call finishes, and reads that folder before it sends, so a
second evaluation, a retried task, or the job run again after a failure sends only rows with no
answer yet (two tasks holding the same prompt at once send it once)::

    out = dbmagic.spark.complete(tickets, "Classify: {{ text }}", endpoint=E,
                                 checkpoint="/Volumes/main/default/work/classify-tickets")
    out.write.mode("overwrite").saveAsTable("main.default.tickets_classified")  # a Delta table

The folder is a volume path, which every executor sees (on a Databricks cluster any other path is
refused: a local folder is each machine's own). Its records are `dbmagic.ledger`'s, signed with
the driver's login (its SCIM ``Me``, asked once, and its ledger key travel with the task as the
token does), so a record verifies whichever executor wrote or reads it, and `dbmagic.batch` with
the same folder reads them too.

Use `complete` when you need what ``ai_query`` does not give: transforms, driver-proxy apps and
agents on Databricks Apps (``endpoint="apps/NAME"``: the app's URL and the driver's current OAuth
token for it travel with the task), custom request fields, an endpoint in another workspace, or a
Spark outside Databricks. A model service is named ``catalog.schema.name``.

PySpark is imported here only: ``import dbmagic`` never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..call.wire import APP
from ..errors import ConfigurationError, TemplateError
from ..prompts.templating import JINJA_GLOBALS, Template

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..client import CallOptions, Client

__all__ = ["complete", "struct_type", "for_spark"]


def complete(
    sdf: Any,
    template: str,
    endpoint: str | None = None,
    *,
    output_col: str = "answer",
    error_col: str = "error",
    concurrency_per_task: int = 4,
    client: Client | None = None,
    transform_output: Callable[[Any], Any] | None = None,
    timeout: float | None = None,
    send_missing: bool = False,
    resume: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    shared_checkpoint: bool = False,
    rows_per_request: int | None = None,
    **options: Unpack[CallOptions],
) -> Any:
    """``sdf`` with ``output_col`` (the answer, as text; JSON for other values) and ``error_col``
    (the row's error, else null) added, computed on the executors; see the module docstring. A row
    with a null in a column the template uses is not sent (its error names the column), unless
    ``send_missing=True``. ``resume=True``: ``sdf`` is an earlier result of `complete` (its answer
    and error columns included); its answered rows are kept as they are, and only the others
    (failed, not sent) are sent. ``checkpoint``: a folder every executor reads and writes (a Unity
    Catalog volume, ``/Volumes/...``) where each task keeps its answers as its calls finish, so
    nothing answered is sent again (see "Never paying twice" in the module docstring);
    ``shared_checkpoint`` and ``rows_per_request`` as `dbmagic.batch`'s."""
    from pyspark.sql.types import StringType, StructField, StructType

    from ..call.schema import schema_of
    from ..client import get_client
    from .run import refuse_collisions, refuse_field_collisions

    if not isinstance(concurrency_per_task, int) or isinstance(concurrency_per_task, bool) or concurrency_per_task < 1:
        raise ConfigurationError(f"concurrency_per_task must be a whole number of at least 1; got {concurrency_per_task!r}.")
    if rows_per_request is not None:  # checked here, before the job
        from .. import settings

        rows_per_request = settings.coerce("rows_per_request", rows_per_request)
    answer_schema = schema_of(options.get("schema"))
    if answer_schema is not None:  # the executors check the answer against its JSON Schema (`Schema.portable`)
        answer_schema = options["schema"] = answer_schema.portable()
    typed = answer_schema is not None and bool(answer_schema.fields())
    if typed:
        added = [*struct_type(answer_schema).fields, StructField(error_col, StringType()),
                 StructField(f"{output_col}_raw", StringType())]
    else:
        added = [StructField(output_col, StringType()), StructField(error_col, StringType())]
    names = [f.name for f in added]
    if resume:  # the earlier result's own columns are the ones written again
        lacking = [n for n in names if n not in sdf.columns]
        if lacking:
            raise ConfigurationError(
                f"resume=True takes an earlier result of dbmagic.spark.complete, with its columns {', '.join(names)}; "
                f"this DataFrame lacks {', '.join(lacking)}. Pass the same output_col=, error_col= and schema= as "
                "the first run.")
        sdf = sdf.select(*[c for c in sdf.columns if c not in names], *[sdf[f.name].cast(f.dataType) for f in added])
    columns = [c for c in sdf.columns if c not in names] if resume else list(sdf.columns)
    unknown = sorted(Template(template).names - set(columns) - JINJA_GLOBALS)
    if unknown:
        raise TemplateError(f"The template uses {', '.join(unknown)}, which is not a column of the DataFrame "
                            f"(its columns: {', '.join(columns)}). Rename the {{{{ }}}} names, or add the columns.")
    refuse_collisions(columns, output_col, error_col, ("output_col=", "error_col="))
    refuse_field_collisions(columns, answer_schema, output_col, error_col)
    client = client or get_client()
    signer = None
    if checkpoint is not None:  # the folder checked and made here, and who signs its records: the driver's login
        checkpoint = _checkpoint_folder(checkpoint, shared_checkpoint)
        signer = client.signer()
    # on the driver: options checked, the endpoint's kind found once (executors then skip the lookup)
    probe = client.prepare("", endpoint, **{k: v for k, v in options.items() if k != "transform_input"})
    options = {**options, "task": options.get("task") or probe.kind}
    credentials = client.credentials
    secret = credentials.token  # a Secret: masked wherever it could show
    host, extra_headers = credentials.host, credentials.extra_headers
    # an app (apps/NAME): its URL and the current OAuth token for it travel too (the executors cannot exchange one)
    app = (probe.host, client.credentials_for(probe).token) if probe.where == APP else None
    retry, timeouts = client.retry, client.timeouts
    tasks = _tasks_at_once(sdf)  # they share the endpoint's limit: each paces as its share
    schema = StructType([*[sdf.schema[c] for c in columns], *added])
    answered_by = f"{output_col}_raw" if typed else output_col  # with no error: a row answered before

    def dbmagic_complete(batches: Iterator[Any]) -> Iterator[Any]:
        # runs on an executor: imports here, one client per task
        from dbmagic.batching.result import answer_columns
        from dbmagic.batching.run import run
        from dbmagic.batching.spark import for_spark
        from dbmagic.call.answers import as_text
        from dbmagic.client import Client
        from dbmagic.transport.credentials import Credentials

        # the app's URL and OAuth credentials, handed to the task's client (it cannot ask the Apps API for them)
        apps = {endpoint.removeprefix("apps/"): (app[0], Credentials.of_token(
            app[0], app[1], "the Spark driver (OAuth, for Databricks Apps)", auth_type="oauth (Databricks Apps)"))
            } if app is not None else None
        worker = Client(credentials=Credentials.of_token(host, secret, "the Spark driver", extra_headers=extra_headers),
                        retry=retry, timeouts=timeouts, apps=apps, signer=signer)
        try:
            for frame in batches:
                if resume:  # only the rows without an answer are sent; the others keep theirs
                    kept = (frame[error_col].isna() & frame[answered_by].notna()).tolist()
                    todo = [i for i, k in enumerate(kept) if not k]
                    out = frame.copy()
                    new = {name: list(frame[name]) for name in names}
                    frame = frame.iloc[todo][columns].reset_index(drop=True)
                else:
                    todo, out, new = list(range(len(frame))), frame.copy(), {name: [None] * len(frame) for name in names}
                if todo:
                    result = run(template, frame, endpoint, concurrency=concurrency_per_task, progress=False,
                                 client=worker, transform_output=transform_output, timeout=timeout, column=output_col,
                                 error_column=error_col, send_missing=send_missing, signed_in=True,
                                 checkpoint=checkpoint, shared_checkpoint=shared_checkpoint,
                                 rows_per_request=rows_per_request, tasks=tasks, **options)
                    if typed:
                        fields = answer_schema.fields()
                        got = {name: [for_spark(answer_schema, fields[name], v) for v in values] if name in fields
                               else values for name, values in answer_columns(result, output_col, error_col).items()}
                    else:
                        got = {output_col: [None if v is None else as_text(v) for v in result.values],
                               error_col: result.errors}
                    for name, values in got.items():
                        for position, value in zip(todo, values, strict=True):
                            new[name][position] = value
                for name in names:
                    out[name] = new[name]
                yield out
        finally:
            worker.close()

    return sdf.mapInPandas(dbmagic_complete, schema)


def _tasks_at_once(sdf: Any) -> int:
    """How many of the job's tasks run at once: its partitions, at most the cluster's cores (Spark's
    default parallelism); the partitions alone where the session does not say (Spark Connect)."""
    try:
        partitions = sdf.rdd.getNumPartitions()
    except Exception:  # Spark Connect has no RDDs
        return 1
    try:
        cores = sdf.sparkSession.sparkContext.defaultParallelism
    except Exception:
        return max(partitions, 1)
    return max(min(partitions, cores), 1)


_DATABRICKS_ROOTS = ("/Volumes/", "/dbfs/", "/Workspace/")


def _checkpoint_folder(path: str | os.PathLike[str], shared: bool) -> str:
    """``checkpoint=`` as the executors take it: an absolute path, the folder made (and checked)
    here. On a Databricks cluster it must be a folder every machine sees (``/Volumes/...``,
    ``/dbfs/...``, ``/Workspace/...``): a local path is each machine's own, and a task retried on
    another machine would not find what the first one paid for."""
    from ..call.ledger import Ledger

    folder = Path(path).expanduser().absolute()
    if os.environ.get("DATABRICKS_RUNTIME_VERSION") and not str(folder).startswith(_DATABRICKS_ROOTS):
        raise ConfigurationError(f"checkpoint {str(folder)!r} is a folder of the driver alone: every executor of the "
                                 "cluster reads and writes the checkpoint. Name a volume path, e.g. "
                                 "/Volumes/<catalog>/<schema>/<volume>/checkpoints/<run>.")
    Ledger(folder, shared=shared).close()  # a file there, or a folder that cannot be made: said now
    return str(folder)


def struct_type(schema: Any) -> Any:
    """The Spark ``StructType`` of a dbmagic schema's answer (`dbmagic.schema`): string, long,
    double, boolean, array and struct fields, every one nullable; a field of no single type is a
    string holding its JSON."""
    from ..call.schema import schema_of

    found = schema_of(schema)
    if found is None or not found.fields():
        raise ConfigurationError("struct_type takes a schema whose answer is a JSON object (fields).")
    return _spark_type(found, {"type": "object", "properties": found.fields()})


def _spark_type(schema: Any, node: Any, depth: int = 0) -> Any:
    from pyspark.sql import types as T

    from ..call.schema import kind_of

    kind, typed = kind_of(schema.resolve(node))
    if depth > 16:
        return T.StringType()
    if kind == "object" and typed.get("properties"):
        return T.StructType([T.StructField(name, _spark_type(schema, sub, depth + 1), True)
                             for name, sub in typed["properties"].items()])
    if kind == "array":
        return T.ArrayType(_spark_type(schema, typed.get("items") or {}, depth + 1), True)
    return {"string": T.StringType(), "integer": T.LongType(), "number": T.DoubleType(),
            "boolean": T.BooleanType()}.get(kind or "", T.StringType())


def for_spark(schema: Any, node: Any, value: Any, depth: int = 0) -> Any:
    """``value`` as the Spark type of ``node`` takes it (`_spark_type`): a field of no single type
    (or an object without properties) as its JSON text."""
    from ..call.answers import as_text
    from ..call.schema import kind_of
    from .result import is_missing

    if value is None or (not isinstance(value, (list, dict)) and is_missing(value)):
        return None
    kind, typed = kind_of(schema.resolve(node))
    if kind == "object" and typed.get("properties") and isinstance(value, dict) and depth <= 16:
        return {name: for_spark(schema, sub, value.get(name), depth + 1) for name, sub in typed["properties"].items()}
    if kind == "array" and isinstance(value, list) and depth <= 16:
        return [for_spark(schema, typed.get("items") or {}, v, depth + 1) for v in value]
    if kind in ("string", "integer", "number", "boolean"):
        return float(value) if kind == "number" and isinstance(value, int) else value
    return as_text(value)
