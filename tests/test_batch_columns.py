"""What a batch keeps of each row (`dbmagic.batching.columns`): the answer's fields users read, as
columns, read back as the same `Completion`; the request each row sent, built again on demand; no
raw response. Memory itself is measured by hand (benchmarks/bench_memory.py)."""

from __future__ import annotations

import dataclasses
import uuid

import pandas as pd
import pytest

import dbmagic
from dbmagic import Client
from dbmagic.batching.columns import Answers, Digests
from dbmagic.batching.run import run

from .conftest import CHAT, EMBEDDINGS


def invocations(ws, name):
    return [r for r in ws.requests if r.path == f"/serving-endpoints/{name}/invocations"]


@pytest.fixture
def client(workspace):
    c = Client(host=workspace.host, token=workspace.token)
    yield c
    c.close()


# what a batch row may differ in from the same call made alone: when it came, and what is not kept
NOT_KEPT = {"raw", "request", "natural", "latency", "time_to_first_token", "request_id"}


def kept_fields(completion):
    return {f.name: getattr(completion, f.name) for f in dataclasses.fields(completion) if f.name not in NOT_KEPT}


def test_each_row_reads_back_what_the_server_answered(workspace, client):
    result = dbmagic.batch("Say {{ row }}", ["one", "two", "three"], CHAT, client=client, progress=False,
                           concurrency=1)
    received = {r.json["messages"][-1]["content"]: r for r in invocations(workspace, CHAT)}
    for row, answer in zip(["one", "two", "three"], result, strict=True):
        alone = client.complete(f"Say {row}", endpoint=CHAT)
        assert kept_fields(answer) == kept_fields(alone) and answer.text == f"Echo: Say {row}"
        assert answer.request_id == received[f"Say {row}"].request_id != alone.request_id
        assert answer.raw is None and alone.raw is not None  # the server's whole response is not kept


def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_tool_calls_and_steps_are_kept_per_row(workspace, client):
    asked = dbmagic.batch("{{ row }}", ["Paris", "Oslo"], CHAT, client=client, progress=False, tools=[weather])
    assert [[(c.name, c.arguments, c.ran) for c in a.tool_calls] for a in asked] == [
        [("weather", {"city": "Paris"}, False)], [("weather", {"city": "Oslo"}, False)]]
    assert all(a.finish_reason == "tool_calls" for a in asked)
    ran = dbmagic.batch("{{ row }}", ["Paris"], CHAT, client=client, progress=False, tools=[weather], run_tools=True)
    assert ran[0].text == "Echo: Paris | weather -> sunny in Paris"
    assert [s.why for s in ran[0].steps] == ["tools"] and ran[0].steps[0].tool_calls[0].output == "sunny in Paris"


def test_request_gives_the_body_each_row_sent(workspace, client):
    rows = pd.DataFrame({"text": ["tea", "coffee"], "n": [1, 2]}, index=[10, 20])
    result = run("{{ n }}: {{ text }}", rows, CHAT, client=client, progress=False, concurrency=1, temperature=0.5)
    received = [r.json for r in invocations(workspace, CHAT)]
    assert [result.request(0), result.request(1)] == received
    assert result.rows[1] == {"text": "coffee", "n": 2}
    frame = result.to_pandas()  # the input frame, its index kept, with the answers
    assert list(frame.index) == [10, 20] and list(frame["answer"]) == ["Echo: 1: tea", "Echo: 2: coffee"]


def test_request_is_none_once_the_notebook_values_it_used_changed(workspace, client):
    values = {"tone": "kind"}
    result = run("Be {{ tone }} about {{ row }}", ["tea"], CHAT, client=client, progress=False, namespace=values)
    assert result.request(0)["messages"][-1]["content"] == "Be kind about tea"
    values["tone"] = "terse"  # the request built again is not the one sent: it is not given
    assert result.request(0) is None


def test_a_judge_reads_the_prompt_each_row_sent(workspace, client):
    pytest.importorskip("mlflow")
    from dbmagic.observe.judging import _entries

    result = run("Describe {{ row }}", ["tea", "coffee"], CHAT, client=client, progress=False, concurrency=1)
    assert [inputs["prompt"] for _, inputs in _entries(result)] == ["Describe tea", "Describe coffee"]


def test_values_tool_calls_and_errors_are_kept_per_row(workspace, client):
    workspace.fail(CHAT, 400, times=1)
    result = dbmagic.batch("{{ row }}", ["bad", "good"], CHAT, client=client, progress=False, concurrency=1,
                           transform_output=lambda text: {"shout": text.upper()})
    assert isinstance(result[0], dbmagic.BadRequest) and result.failed == [0]
    assert result[1].value == {"shout": "ECHO: GOOD"} and result.values == [None, {"shout": "ECHO: GOOD"}]
    vectors = dbmagic.batch("{{ row }}", ["a", "b"], EMBEDDINGS, client=client, progress=False)
    assert vectors.values == [client.complete(row, endpoint=EMBEDDINGS).value for row in ["a", "b"]]
    assert vectors[0].value == vectors.values[0] != vectors.values[1] and vectors[0].text == "1 embedding of dimension 8"


def test_a_partial_answer_keeps_its_error_and_counts_as_failed(workspace):
    from dbmagic.call.model import Completion

    cut = Completion(text="half", value="half", endpoint=CHAT, kind="chat", finish_reason="cut",
                     error=dbmagic.DbMagicError("the stream broke"))
    answers = Answers.of([cut, None])
    result = dbmagic.BatchResult(answers, rows=["a", "b"])
    assert result[0].text == "half" and str(result[0].error) == "the stream broke" and result[0].is_partial
    assert result.texts == [None, None] and result.errors == ["the stream broke", None]
    assert result.missing == [1] and result.failed == [0]  # a cut answer failed (resume= sends it again)


def test_a_value_of_none_beside_a_text_reads_back_as_none():
    from dbmagic.call.model import Completion

    answers = Answers.of([Completion(text="asked for a tool", value=None, endpoint=CHAT, kind="chat"),
                          Completion(text="plain", value="plain", endpoint=CHAT, kind="chat")])
    assert answers[0].value is None and answers[0].text == "asked for a tool" and answers[1].value == "plain"


def test_request_ids_and_identities_round_trip():
    answers = Answers(3)
    from dbmagic.call.model import Completion

    ids = [str(uuid.uuid4()), "local-000042", str(uuid.uuid4()).upper()]  # a UUID is kept in 16 bytes; others as given
    for i, request_id in enumerate(ids):
        answers[i] = Completion(text="x", value="x", endpoint=CHAT, kind="chat", request_id=request_id)
    assert [answers[i].request_id for i in range(3)] == ids
    answers[1] = Completion(text="x", value="x", endpoint=CHAT, kind="chat", request_id=ids[0])  # written again
    assert [answers[i].request_id for i in range(3)] == [ids[0], ids[0], ids[2]]
    digests = Digests(2)
    digests[0] = "ab" * 32
    assert list(digests) == ["ab" * 32, None]
