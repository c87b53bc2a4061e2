"""Rows packed per request (issue 34): embeddings' ``input`` lists and custom models'
``dataframe_records``, up to ``rows_per_request`` rows; a refused pack split until the failing row
fails alone; each row keyed on its own in the checkpoint and the cache; asserted on what the local
workspace received."""

from __future__ import annotations

import pandas as pd
import pytest
from IPython.core.error import UsageError

import dbmagic
from dbmagic import Client, ConfigurationError, RetryPolicy
from dbmagic.testing import Endpoint

from .conftest import CHAT, EMBEDDINGS


def _sent(workspace, name: str) -> list[dict]:
    return [r.json for r in workspace.requests if r.path == f"/serving-endpoints/{name}/invocations"]


def _sent_log(workspace, name: str) -> list:
    return [r for r in workspace.requests if r.path == f"/serving-endpoints/{name}/invocations"]


def _inputs(body: dict) -> int:
    value = body.get("input", body.get("dataframe_records"))
    return len(value) if isinstance(value, list) else 1


def test_embeddings_go_a_hundred_rows_a_request_each_row_its_own_answer(client, workspace):
    rows = [f"text number {i}" for i in range(250)]
    packed = dbmagic.batch("{{ row }}", rows, EMBEDDINGS, client=client, progress=False)
    assert sorted(_inputs(b) for b in _sent(workspace, EMBEDDINGS)) == [50, 100, 100]
    workspace.clear()
    alone = dbmagic.batch("{{ row }}", rows, EMBEDDINGS, client=client, progress=False, rows_per_request=1)
    assert len(_sent(workspace, EMBEDDINGS)) == 250
    assert packed.failed == [] and packed.values == alone.values  # the same vectors, in row order
    assert packed.usage.input == alone.usage.input == 750  # the requests' usage, shared among their rows
    assert "250 answered, 0 failed" in packed.summary()


def test_a_custom_model_takes_its_rows_as_records(client, workspace):
    workspace.add_endpoint(Endpoint("scorer", None, endpoint_type="CUSTOM_MODEL",
                                    predict=lambda records: [len(r["text"]) for r in records]))
    frame = pd.DataFrame({"text": [f"{'x' * i}" for i in range(1, 31)]})
    out = dbmagic.batch("{{ text }}", frame, "scorer", client=client, progress=False, rows_per_request=8,
                        transform_input=lambda **request: {"dataframe_records": [{"text": request["prompt"]}]})
    assert out["answer"].tolist() == list(range(1, 31)) and out["error"].isna().all()
    assert sorted(_inputs(b) for b in _sent(workspace, "scorer")) == [6, 8, 8, 8]


def test_a_refused_pack_is_split_until_the_bad_row_fails_alone(client, workspace):
    def predict(records):
        if any(r == {"prompt": "poison"} for r in records):
            raise ValueError("cannot score poison")
        return [r["prompt"].upper() for r in records]

    workspace.add_endpoint(Endpoint("picky", None, endpoint_type="CUSTOM_MODEL", predict=predict))
    rows = [f"r{i}" for i in range(40)]
    rows[13] = "poison"
    result = dbmagic.batch("{{ row }}", rows, "picky", client=client, progress=False, rows_per_request=16)
    assert result.failed == [13]
    assert "cannot score poison" in str(result.errors[13])
    assert [result.values[i] for i in range(40) if i != 13] == [r.upper() for i, r in enumerate(rows) if i != 13]
    # halves of halves: the pack of 16 holding it, 8, 4, 2, then the bad row and its neighbour alone
    sizes = sorted(_inputs(b) for b in _sent(workspace, "picky"))
    assert sizes == sorted([16, 8, 8, 4, 4, 2, 2, 1, 1, 16, 8])
    alone = sorted(b["dataframe_records"][0]["prompt"] for b in _sent(workspace, "picky") if _inputs(b) == 1)
    assert alone == ["poison", "r12"]


def test_an_endpoint_that_takes_fewer_inputs_is_met_by_halves(client, workspace):
    workspace.add_endpoint(Endpoint("small-batches", "llm/v1/embeddings", max_inputs=30))
    rows = [f"t{i}" for i in range(100)]
    result = dbmagic.batch("{{ row }}", rows, "small-batches", client=client, progress=False)
    assert result.failed == [] and len(result.values) == 100
    sizes = [_inputs(b) for b in _sent(workspace, "small-batches")]
    assert sorted(sizes) == [25, 25, 25, 25, 50, 50, 100]  # refused, each half refused again, then answered


def test_an_answer_with_the_wrong_number_of_outputs_is_split_too(client, workspace):
    workspace.add_endpoint(Endpoint("lossy", None, endpoint_type="CUSTOM_MODEL",
                                    predict=lambda records: [r["prompt"] for r in records][:max(len(records) - 1, 1)]))
    result = dbmagic.batch("{{ row }}", ["a", "b", "c", "d"], "lossy", client=client, progress=False)
    assert result.failed == [] and result.values == ["a", "b", "c", "d"]
    assert sorted(_inputs(b) for b in _sent(workspace, "lossy")) == [1, 1, 1, 1, 2, 2, 4]


def test_each_row_is_keyed_on_its_own_in_a_checkpoint(client, workspace, tmp_path):
    rows = [f"doc {i}" for i in range(30)]
    first = dbmagic.batch("{{ row }}", rows[:20], EMBEDDINGS, client=client, progress=False,
                          checkpoint=tmp_path / "ck", rows_per_request=8)
    assert sorted(_inputs(b) for b in _sent(workspace, EMBEDDINGS)) == [4, 8, 8]
    workspace.clear()
    again = dbmagic.batch("{{ row }}", rows, EMBEDDINGS, client=client, progress=False, checkpoint=tmp_path / "ck",
                          rows_per_request=1)  # another packing: the same rows, the same requests
    assert again.from_checkpoint == 20 and len(_sent(workspace, EMBEDDINGS)) == 10
    assert again.values[:20] == first.values


def test_the_cache_keeps_and_serves_each_row(client, workspace, tmp_path):
    dbmagic.use_cache(tmp_path / "cache")
    try:
        dbmagic.batch("{{ row }}", ["one", "two", "three"], EMBEDDINGS, client=client, progress=False)
        workspace.clear()
        alone = client.complete("two", endpoint=EMBEDDINGS)
        assert alone.cached and _sent(workspace, EMBEDDINGS) == []
        again = dbmagic.batch("{{ row }}", ["one", "two", "three", "four"], EMBEDDINGS, client=client,
                              progress=False)
        assert [b["input"] for b in _sent(workspace, EMBEDDINGS)] == ["four"]  # the one row left, on its own
        assert again.failed == [] and [c.cached for c in again] == [True, True, True, False]
    finally:
        dbmagic.use_cache(None)


def test_a_rate_limited_pack_waits_and_no_row_fails(workspace):
    """A 429 is the whole request's: the pack waits and goes again whole, never split."""
    workspace.add_endpoint(Endpoint("busy-embeddings", "llm/v1/embeddings", rate_limit=2))
    client = Client(host=workspace.host, token=workspace.token, retry=RetryPolicy(backoff=0.05, max_backoff=0.2))
    result = dbmagic.batch("{{ row }}", [f"t{i}" for i in range(600)], "busy-embeddings", client=client,
                           progress=False, concurrency=8)
    client.close()
    assert result.failed == [] and all(len(v) == 1 and len(v[0]) > 0 for v in result.values)
    log = _sent_log(workspace, "busy-embeddings")
    assert any(r.status == 429 for r in log), "the endpoint never said 429: the test proves nothing"
    assert {len(r.json["input"]) for r in log} == {100}  # every try, 429 or not, the whole pack


def test_transform_output_runs_once_a_row(client, workspace):
    seen = []

    def first_three(value):
        seen.append(1)
        return value[0][:3]

    result = dbmagic.batch("{{ row }}", ["a", "b", "c"], EMBEDDINGS, client=client, progress=False,
                           transform_output=first_three)
    assert len(seen) == 3 and all(len(v) == 3 for v in result.values)


def test_chat_is_never_packed(client, workspace):
    dbmagic.batch("{{ row }}", ["a", "b", "c"], CHAT, client=client, progress=False, rows_per_request=50)
    assert len(_sent(workspace, CHAT)) == 3


def test_rows_per_request_is_checked_before_sending(client, workspace, shell):
    with pytest.raises(ConfigurationError, match="rows_per_request"):
        dbmagic.batch("{{ row }}", ["a"], EMBEDDINGS, client=client, progress=False, rows_per_request=0)
    shell.user_ns["docs"] = ["a", "b"]
    with pytest.raises(UsageError, match="rows_per_request"):
        shell.run_cell_magic("dbllm", f"-e {EMBEDDINGS} --over docs --rows-per-request 0", "{{ row }}")
    assert _sent(workspace, EMBEDDINGS) == []
    shell.run_cell_magic("dbllm", f"-e {EMBEDDINGS} --over docs --rows-per-request 2", "{{ row }}")
    assert [b["input"] for b in _sent(workspace, EMBEDDINGS)] == [["a", "b"]]


def test_a_first_row_that_cannot_render_does_not_stop_the_packing(client, workspace):
    rows = [{"oops": 1}] + [{"text": f"t{i}"} for i in range(5)]
    result = dbmagic.batch("{{ text }}", rows, EMBEDDINGS, client=client, progress=False)
    assert result.failed == [0] and [b["input"] for b in _sent(workspace, EMBEDDINGS)] == [[f"t{i}" for i in range(5)]]


def test_rows_the_cache_answered_keep_their_answers_when_the_rest_of_their_pack_fails(client, workspace, tmp_path):
    dbmagic.use_cache(tmp_path / "cache")
    try:
        dbmagic.batch("{{ row }}", ["one", "two"], EMBEDDINGS, client=client, progress=False)
        workspace.fail(EMBEDDINGS, 403)
        result = dbmagic.batch("{{ row }}", ["one", "two", "three", "four"], EMBEDDINGS, client=client,
                               progress=False)
    finally:
        dbmagic.use_cache(None)
    assert result.failed == [2, 3] and all(result[i].cached for i in (0, 1))
    assert "PERMISSION_DENIED" in str(result.errors[2]) or "403" in str(result.errors[2])


def test_a_resume_sends_the_failed_rows_of_a_pack_again(client, workspace):
    accept = {"poison": False}

    def predict(records):
        if not accept["poison"] and any(r == {"prompt": "poison"} for r in records):
            raise ValueError("cannot score poison")
        return [r["prompt"].upper() for r in records]

    workspace.add_endpoint(Endpoint("picky-then-fixed", None, endpoint_type="CUSTOM_MODEL", predict=predict))
    rows = ["a", "poison", "c", "d"]
    first = dbmagic.batch("{{ row }}", rows, "picky-then-fixed", client=client, progress=False)
    assert first.failed == [1]
    accept["poison"] = True
    workspace.clear()
    again = dbmagic.batch("{{ row }}", rows, "picky-then-fixed", client=client, progress=False, resume=first)
    assert again.failed == [] and again.values == ["A", "POISON", "C", "D"]
    assert [b["dataframe_records"] for b in _sent(workspace, "picky-then-fixed")] == [[{"prompt": "poison"}]]


def test_a_requests_usage_is_shared_among_its_rows_by_the_size_of_their_inputs():
    from dbmagic.batching.packs import _shares

    assert _shares(10, [1, 1, 2]) == [3, 2, 5]  # 2.5, 2.5, 5: the remainder to the first largest fraction
    assert sum(_shares(7, [3, 1, 1, 2])) == 7
    assert _shares(3, [0, 0, 0]) == [1, 1, 1] and _shares(None, [1, 2]) == [None, None]
