"""dbmagic.batching.spark in local mode (local[4]) against the local workspace: answers, errors in place,
columns checked before the job, and the token absent from the plan and from a failed job's text."""

from __future__ import annotations

import io
import os
import sys
from contextlib import redirect_stdout

import pytest

pytest.importorskip("pyspark")


def _java() -> str | None:
    import shutil

    home = os.environ.get("JAVA_HOME")
    return shutil.which("java") or (home if home and os.path.exists(os.path.join(home, "bin", "java")) else None)


if _java() is None:  # on main the session fixture errored here, naming no cause
    pytest.skip("PySpark needs Java 17 (no java on PATH, no JAVA_HOME): apt-get install openjdk-17-jre-headless",
                allow_module_level=True)

from IPython.core.error import UsageError  # noqa: E402

from dbmagic import Client, ConfigurationError, TemplateError  # noqa: E402
from dbmagic.testing import Endpoint  # noqa: E402

from .conftest import CHAT  # noqa: E402


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # the executors' Python: this environment, with dbmagic
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # loopback only
    session = (SparkSession.builder.master("local[4]").appName("dbmagic-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.host", "127.0.0.1")
               .config("spark.driver.bindAddress", "127.0.0.1").config("spark.sql.shuffle.partitions", "2")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def test_a_few_hundred_rows_on_the_executors(spark, workspace):
    import dbmagic.batching.spark

    client = Client(host=workspace.host, token=workspace.token)
    sdf = spark.createDataFrame([(i, f"ticket {i}") for i in range(300)], "id INT, text STRING").repartition(3)
    out = dbmagic.batching.spark.complete(sdf, "Classify {{ text }}", endpoint=CHAT, concurrency_per_task=4, client=client,
                                 transform_output=str.upper, temperature=0.1)
    rows = sorted(out.collect(), key=lambda r: r.id)
    assert out.columns == ["id", "text", "answer", "error"]
    assert [r.answer for r in rows] == [f"ECHO: CLASSIFY TICKET {i}" for i in range(300)]
    assert all(r.error is None for r in rows)
    sent = [r for r in workspace.requests if r.path.endswith("/invocations")]
    assert len(sent) == 300 and all(r.authorized and r.json["temperature"] == 0.1 for r in sent)
    # the endpoint's kind was looked up once, on the driver
    assert len([r for r in workspace.requests if r.path == f"/api/2.0/serving-endpoints/{CHAT}"]) == 1
    plan = io.StringIO()
    with redirect_stdout(plan):
        out.explain(True)
    assert workspace.token not in plan.getvalue() and "MapInPandas" in plan.getvalue()
    assert workspace.token not in repr(out) + str(out.schema)


def test_row_errors_stay_in_place_scrubbed(spark, workspace):
    import dbmagic.batching.spark

    workspace.add_endpoint(Endpoint("picky", None, "CUSTOM_MODEL", predict=lambda records: [
        1 / 0 if "bad" in r["prompt"] else r["prompt"] for r in records]))
    client = Client(host=workspace.host, token=workspace.token)
    sdf = spark.createDataFrame([("good",), ("bad",), ("fine",)], "text STRING").coalesce(1)
    rows = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint="picky", client=client).collect()
    assert [r.answer for r in rows] == ["good", None, "fine"]
    assert "Model prediction failed: ZeroDivisionError" in rows[1].error
    # a server that echoes the Authorization header gets the token scrubbed from the row's error
    workspace.fail(CHAT, 400, body={"error_code": "BAD_REQUEST", "message": f"Bearer {workspace.token} refused"})
    one = dbmagic.batching.spark.complete(spark.createDataFrame([("x",)], "text STRING"), "{{ text }}", endpoint=CHAT,
                                 client=client).collect()[0]
    assert workspace.token not in one.error and "Bearer *** refused" in one.error


def test_columns_are_checked_before_the_job(spark, workspace):
    import dbmagic.batching.spark

    client = Client(host=workspace.host, token=workspace.token)
    sdf = spark.createDataFrame([("a",)], "text STRING")
    with pytest.raises(TemplateError, match=r"uses body, which is not a column of the DataFrame \(its columns: text\)"):
        dbmagic.batching.spark.complete(sdf, "{{ body }}", endpoint=CHAT, client=client)
    with pytest.raises(ConfigurationError, match="already has a column 'text'"):
        dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, client=client, output_col="text")
    assert [r for r in workspace.requests if r.path.endswith("/invocations")] == []


def test_a_failed_job_does_not_show_the_token(spark, workspace):
    import dbmagic.batching.spark

    def stop_everything(value):
        raise SystemExit(f"stopped on {value}")

    client = Client(host=workspace.host, token=workspace.token)
    sdf = spark.createDataFrame([("a",)], "text STRING")
    with pytest.raises(Exception) as info:
        dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, client=client,
                               transform_output=stop_everything).collect()
    text = str(info.value)
    assert "stopped on Echo: a" in text and workspace.token not in text


def test_a_schema_gives_real_typed_columns(spark, workspace):
    from pyspark.sql import types as T

    import dbmagic.batching.spark

    client = Client(host=workspace.host, token=workspace.token)
    sdf = spark.createDataFrame([(i, f"ticket number {i}") for i in range(40)], "id INT, text STRING").coalesce(1)
    workspace.fail(CHAT, off_schema=True, times=2)  # one row's two answers do not fit: it keeps its place
    out = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, client=client, concurrency_per_task=1,
                                 schema="label: 'pos'|'neg', n: int, score: float, ok: bool?, tags: list[str]")
    assert out.schema == T.StructType([
        T.StructField("id", T.IntegerType()), T.StructField("text", T.StringType()),
        T.StructField("label", T.StringType()), T.StructField("n", T.LongType()), T.StructField("score", T.DoubleType()),
        T.StructField("ok", T.BooleanType()), T.StructField("tags", T.ArrayType(T.StringType())),
        T.StructField("error", T.StringType()), T.StructField("answer_raw", T.StringType())])
    rows = sorted(out.collect(), key=lambda r: r.id)
    answered = [r for r in rows if r.error is None]
    failed = [r for r in rows if r.error is not None]
    assert len(answered) == 39 and len(failed) == 1
    assert {(r.label, r.n, r.score, r.ok) for r in answered} == {("neg", 3, 0.3, False)}
    assert answered[0].tags == answered[0].text.split()
    assert failed[0].label is None and "label: 12345 is not of type 'string'" in failed[0].error
    assert '"label": 12345' in failed[0].answer_raw


def test_a_model_with_a_nested_object_is_a_struct(spark, workspace):
    from pydantic import BaseModel

    import dbmagic.batching.spark

    class Place(BaseModel):
        city: str
        zip: int

    class Order(BaseModel):
        item: str
        place: Place

    client = Client(host=workspace.host, token=workspace.token)
    sdf = spark.createDataFrame([("a b",)], "text STRING")
    assert dbmagic.batching.spark.struct_type(Order).simpleString() == "struct<item:string,place:struct<city:string,zip:bigint>>"
    [row] = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, client=client, schema=Order).collect()
    assert (row.item, row.place.city, row.place.zip, row.error) == ("a b", "a b", 2, None)


def test_a_model_service_and_an_app_on_the_executors(spark, workspace, monkeypatch):
    import dbmagic.batching.spark

    from .test_credentials import RotatingContext, install_dbruntime

    sdf = spark.createDataFrame([(i, f"t{i}") for i in range(6)], "id INT, text STRING").repartition(2)
    client = Client(host=workspace.host, token=workspace.token)
    rows = sorted(dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint="system.ai.claude-sonnet-4-5",
                                         client=client).collect(), key=lambda r: r.id)
    assert [r.answer for r in rows] == [f"Echo: t{i}" for i in range(6)]
    app = workspace.add_app("support-agent")
    install_dbruntime(monkeypatch, RotatingContext(workspace.host, [workspace.token]))
    rows = sorted(dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint="apps/support-agent", client=Client()).collect(),
                  key=lambda r: r.id)
    assert [r.answer for r in rows] == [f"Echo: t{i}" for i in range(6)] and all(r.error is None for r in rows)
    assert len(app.requests) == 6 and {r.credential for r in app.requests} == {"oauth"}
    assert workspace.token_exchanges == 1  # on the driver; the executors use the token it got


def test_a_job_that_outlives_its_token_loses_no_row_and_a_resume_sends_only_the_rest(spark, workspace):
    import dbmagic.batching.spark

    sdf = spark.createDataFrame([(i, f"t{i}") for i in range(8)], "id INT, text STRING").repartition(2)
    Client(host=workspace.host, token=workspace.token).endpoint(CHAT)
    workspace.expire_tokens_after(3)
    first = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, concurrency_per_task=1,
                                   client=Client(host=workspace.host, token=workspace.token))
    done = first.collect()  # one action: a Spark DataFrame runs its job again at every action
    answered = [r for r in done if r.error is None]
    assert len(answered) == 3 and all(r.answer == f"Echo: t{r.id}" for r in answered)
    assert all("expired or was revoked during the batch" in r.error and "resume=True" in r.error and r.answer is None
               for r in done if r.error is not None)
    log = [r for r in workspace.requests if r.path.endswith("/invocations")]
    assert [r.status for r in log].count(401) <= 2  # one per task at most: nothing is sent after it
    saved = spark.createDataFrame(done, first.schema)  # as a table saved between the two runs
    workspace.clear()
    again = dbmagic.batching.spark.complete(saved, "{{ text }}", endpoint=CHAT, resume=True,
                                   client=Client(host=workspace.host, token=workspace.token))  # a fresh token
    rows = sorted(again.collect(), key=lambda r: r.id)
    assert [(r.answer, r.error) for r in rows] == [(f"Echo: t{i}", None) for i in range(8)]
    resent = sorted(r.json["messages"][-1]["content"] for r in workspace.requests if r.path.endswith("/invocations"))
    assert resent == sorted(f"t{r.id}" for r in done if r.error is not None)  # only the rows without an answer
    with pytest.raises(ConfigurationError, match="resume=True takes an earlier result"):
        dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, resume=True, client=Client(host=workspace.host,
                                                                                            token=workspace.token))


def test_over_a_spark_dataframe_runs_on_the_executors_now(spark, shell, workspace, capsys):
    """First hour, round two, item 5: on main `--over` a Spark DataFrame said "got DataFrame" with no
    pointer to dbmagic.batching.spark; it now runs dbmagic.batching.spark.complete, cached and counted in the cell."""
    shell.user_ns["tickets"] = spark.createDataFrame([(i, f"t{i}") for i in range(4)], "id INT, text STRING")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --over tickets -o out", "Classify {{ text }}")
    out = shell.user_ns["out"]
    assert sorted((r.id, r.answer, r.error) for r in out.collect()) == [(i, f"Echo: Classify t{i}", None)
                                                                       for i in range(4)]
    assert "4 rows on Spark: 4 answered, 0 failed" in capsys.readouterr().out
    sent = len([r for r in workspace.requests if r.path.endswith("/invocations")])
    out.count()
    assert sent == 4 == len([r for r in workspace.requests if r.path.endswith("/invocations")])  # cached: once
    workspace.fail(CHAT, 400, times=4)
    with pytest.raises(UsageError, match="Every row of --over tickets failed"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --over tickets", "Again {{ text }}")


# -- never paying twice (#34) -------------------------------------------------------------------------

def _sent(workspace) -> list[str]:
    return [r.json["messages"][-1]["content"] for r in workspace.requests if r.path.endswith("/invocations")]


def test_a_result_evaluated_twice_with_a_checkpoint_pays_once(spark, workspace, tmp_path):
    """A Spark DataFrame is lazy: on main `out.count()` then `out.collect()` sent every row twice.
    With a checkpoint each task keeps its answers as they finish and reads the folder before sending;
    the driver's own batch reads them too (the driver's login signs every task's records)."""
    import dbmagic
    import dbmagic.batching.spark

    texts = [f"t{i}" for i in range(40)] + ["same"] * 4  # one prompt in four rows, in different tasks
    sdf = spark.createDataFrame(list(enumerate(texts)), "id INT, text STRING").repartition(4)
    client = Client(host=workspace.host, token=workspace.token)
    out = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, concurrency_per_task=4, client=client,
                                          checkpoint=tmp_path / "ck")
    assert out.count() == len(texts)
    rows = sorted(out.collect(), key=lambda r: r.id)
    assert [(r.answer, r.error) for r in rows] == [(f"Echo: {t}", None) for t in texts]
    assert sorted(_sent(workspace)) == sorted(set(texts))  # each prompt once, over two evaluations
    again = dbmagic.batch("{{ text }}", [{"text": t} for t in texts], CHAT, client=client, progress=False,
                          checkpoint=tmp_path / "ck")
    assert again.from_checkpoint == len(texts) and len(_sent(workspace)) == len(set(texts))


def test_a_job_run_again_after_a_failed_task_sends_only_what_was_not_answered(spark, workspace, tmp_path):
    """A job that failed after some tasks paid (here a later step fails on one row), run again:
    every row is sent once in all."""
    from pyspark.sql.functions import udf

    import dbmagic.batching.spark

    marker = tmp_path / "fixed"

    @udf("int")
    def later_step(i):
        if i == 7 and not os.path.exists(marker):
            raise ValueError("a later step failed")
        return i

    sdf = spark.createDataFrame([(i, f"t{i}") for i in range(24)], "id INT, text STRING").repartition(3)
    out = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, concurrency_per_task=2,
                                          client=Client(host=workspace.host, token=workspace.token),
                                          checkpoint=str(tmp_path / "ck"))
    job = out.withColumn("checked", later_step("id"))
    with pytest.raises(Exception, match="a later step failed"):
        job.collect()
    paid = _sent(workspace)
    assert "t7" in paid  # the failed task had its answers
    marker.touch()
    job = out.withColumn("checked", later_step("id"))  # the job built again (Spark keeps a failed plan's error)
    rows = sorted(job.collect(), key=lambda r: r.id)
    assert [(r.answer, r.error) for r in rows] == [(f"Echo: t{i}", None) for i in range(24)]
    assert sorted(_sent(workspace)) == sorted(f"t{i}" for i in range(24))  # once each, over both runs


def test_a_checkpoint_on_a_databricks_cluster_is_a_folder_every_executor_sees(spark, workspace, tmp_path, monkeypatch):
    import dbmagic.batching.spark

    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    sdf = spark.createDataFrame([(1, "t1")], "id INT, text STRING")
    with pytest.raises(ConfigurationError, match="Name a volume path"):
        dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint=CHAT, checkpoint=tmp_path / "ck",
                                        client=Client(host=workspace.host, token=workspace.token))
    assert _sent(workspace) == [] and not (tmp_path / "ck").exists()


def test_over_a_spark_dataframe_with_a_checkpoint_pays_once_across_cells(spark, shell, workspace, tmp_path, capsys):
    """On main --checkpoint with --over a Spark DataFrame was refused."""
    shell.user_ns["tickets"] = spark.createDataFrame([(i, f"t{i}") for i in range(6)], "id INT, text STRING")
    cell = f"-e {CHAT} --over tickets -o out --checkpoint {tmp_path / 'ck'}"
    shell.run_cell_magic("dbllm", cell, "{{ text }}")
    shell.user_ns["out"].unpersist()
    assert shell.user_ns["out"].count() == 6  # computed again: from the checkpoint
    shell.run_cell_magic("dbllm", cell, "{{ text }}")  # the cell run again
    assert sorted((r.id, r.answer) for r in shell.user_ns["out"].collect()) == [(i, f"Echo: t{i}") for i in range(6)]
    assert sorted(_sent(workspace)) == [f"t{i}" for i in range(6)]
    assert "6 rows on Spark: 6 answered, 0 failed" in capsys.readouterr().out


def test_embeddings_on_the_executors_go_many_rows_a_request(spark, workspace, tmp_path):
    """Each task packs its partition's rows (issue 34): 120 rows in 2 partitions, 50 a request."""
    import dbmagic.batching.spark
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("vectors", "llm/v1/embeddings"))
    sdf = spark.createDataFrame([(i, f"doc {i}") for i in range(120)], "id INT, text STRING").repartition(2)
    out = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint="vectors", rows_per_request=50,
                                          client=Client(host=workspace.host, token=workspace.token),
                                          checkpoint=tmp_path / "ck")
    rows = out.collect()
    assert len(rows) == 120 and all(r.error is None and r.answer.startswith("[[") for r in rows)
    sent = [r.json["input"] for r in workspace.requests if r.path == "/serving-endpoints/vectors/invocations"]
    assert sum(len(s) for s in sent) == 120 and len(sent) <= 4 and max(len(s) for s in sent) == 50
    out.count()  # evaluated again: every row from the checkpoint
    assert len([r for r in workspace.requests if r.path == "/serving-endpoints/vectors/invocations"]) == len(sent)


@pytest.mark.parametrize(("partitions", "retry_after"), [(16, False), (64, False), (16, True)])
def test_the_tasks_of_a_job_share_a_rate_limit_without_losing_a_row(spark, workspace, partitions, retry_after):
    """Issue 34: every task paced on its own and learned only its own share; on main, two tasks at once
    (local[2]) over 64 partitions against a 20/s limit without Retry-After met 0.64 429s a row, and a
    row could fail. Each task now knows how many run at once: it slows by a step of its own rate,
    grows by its share, and a Python worker's next task starts at the pace the last one learned.
    Here four run at once (local[4]); benchmarks/bench_cluster.py measures the share of the limit.
    With Retry-After, each task obeyed its own and all started again at their whole concurrency
    (3 429s a row at 4 partitions): a task now learns its rate from such a 429 too."""
    import dbmagic.batching.spark
    from dbmagic.testing import Endpoint

    workspace.add_endpoint(Endpoint("shared-limit", "llm/v1/chat", latency=0.05, rate_limit=20,
                                    retry_after=retry_after))
    rows = 200
    sdf = spark.createDataFrame([(i, f"t{i}") for i in range(rows)], "id INT, text STRING").repartition(partitions)
    out = dbmagic.batching.spark.complete(sdf, "{{ text }}", endpoint="shared-limit", concurrency_per_task=4,
                                          client=Client(host=workspace.host, token=workspace.token))
    answers = out.collect()
    assert sorted(r.answer for r in answers) == sorted(f"Echo: t{i}" for i in range(rows))
    log = [r for r in workspace.requests if r.path == "/serving-endpoints/shared-limit/invocations"]
    limited = sum(1 for r in log if r.status == 429)
    assert sum(1 for r in log if r.status == 200) == rows  # every row answered once
    # four tasks at once, each a few rows (64 partitions): 0.5 to 0.8 429s a row measured on local[4] (before
    # and after issue 34's columns); the pace keeps them under one a row, and no row fails
    assert limited < rows, f"{limited} 429s for {rows} rows"


def test_images_in_a_binary_column_travel_to_the_executors(spark, workspace, tmp_path):
    """Issue 35: a binary column (as spark.read.format("binaryFile") gives) fills {{ image(...) }} on the executors."""
    pytest.importorskip("PIL")
    import io

    from PIL import Image

    import dbmagic.batching.spark

    def png(width: int) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (width, 10), (9, 9, 9)).save(out, "PNG")
        return out.getvalue()

    for i in range(3):
        (tmp_path / f"p{i}.png").write_bytes(png(10 + i))
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    files = spark.read.format("binaryFile").load(str(tmp_path))
    out = dbmagic.batching.spark.complete(files, "What is in {{ image(content) }}?", endpoint=CHAT,
                                          client=Client(host=workspace.host, token=workspace.token))
    got = {r.path.rsplit("/", 1)[-1]: (r.answer, r.error) for r in out.collect()}
    assert {name: answer for name, (answer, _) in got.items()} == {
        "p0.png": "Echo: What is in [image/png 10x10]?", "p1.png": "Echo: What is in [image/png 11x10]?",
        "p2.png": "Echo: What is in [image/png 12x10]?", "broken.png": None}
    assert "is not an image Pillow can read" in got["broken.png"][1]
    assert len([r for r in workspace.requests if r.path.endswith("/invocations")]) == 3
