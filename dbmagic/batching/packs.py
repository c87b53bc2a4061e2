"""Rows packed per request, where the endpoint takes many: an embeddings endpoint's ``input`` list,
a custom model's ``dataframe_records`` (``shared/WIRE.md``; LangChain's DatabricksEmbeddings and the
openai client send hundreds of inputs a request, dbmagic sent one).

A batch (`dbmagic.batching.run`) builds each row's request as it would send it alone; rows whose
requests differ only in that one input (same URL, same other fields) are packed, in row order, up to
``rows_per_request`` rows (`AUTO` by default) and `MAX_BYTES` of body. One packed request is one
request to the pace (a QPS limit counts requests) and one call to trace; its answer is cut back into
one answer per row, each read as the row's own request would be (`dbmagic.call.answers`), then the
batch's ``transform_output``. So each row keeps its own request identity: a checkpoint or the
cache holds and serves each row, packed or not.

A packed request that fails (a 400 for one bad input, an answer with the wrong number of outputs,
a 5xx past its retries) is split in two, and each half sent again, until the failing row fails alone
and the others are answered. A 429 or a 401 is the whole request's, as for any row.

Not packed: chat, responses and agent requests (one prompt each; completions are left out too: a
prompt list is not documented for Databricks' completions endpoints), a request with a schema or tools, a
driver-proxy app, and a transform that gives another shape (its request is sent as it is).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from ..call.answers import Usage, WireError, parse_response
from ..call.kinds import CUSTOM, EMBEDDINGS, MODEL_SERVICE, SERVING
from ..call.model import Completion, PreparedRequest
from ..errors import BadRequest, BadResponse, DbMagicError, StatusError, error_of

__all__ = ["AUTO", "MAX_BYTES", "PACKED", "size_for", "plan", "packed_request", "Pack", "PackOutcome", "splits"]

# rows a request by default: well under the input-list limits of Databricks' embedding models and
# OpenAI's (2,048), and a body of 100 records that a custom model serves in one go
AUTO = 100
MAX_BYTES = 4 << 20  # the Foundation Model APIs' request limit (custom models take 16 MB; the lower bound for all)
PACKED = {EMBEDDINGS: "input", CUSTOM: "dataframe_records"}


def size_for(rows_per_request: int | None, request: Any) -> int:
    """Rows a request for ``request``'s kind: ``rows_per_request`` when given, else `AUTO` where the
    kind takes many, else 1."""
    if not isinstance(request, PreparedRequest) or request.kind not in PACKED:
        return 1
    return AUTO if rows_per_request is None else rows_per_request


def _key_and_item(request: PreparedRequest) -> tuple[str, Any] | None:
    """What a row's request shares with the rows it may be packed with (its URL and every other field),
    and its one input; None when it is not one input of a packable kind."""
    field = PACKED.get(request.kind)
    body = request.body
    if field is None or request.schema is not None or request.tools is not None or request.stream \
            or request.where not in (SERVING, MODEL_SERVICE) or not isinstance(body, dict):
        return None
    value = body.get(field)
    if request.kind == EMBEDDINGS:
        if not isinstance(value, str):
            return None
        item = value
    else:
        if not isinstance(value, list) or len(value) != 1:
            return None
        item = value[0]
    rest = {k: v for k, v in body.items() if k != field}
    return json.dumps([request.url, rest], sort_keys=True, separators=(",", ":"), default=str), item


def plan(rows: Sequence[int], request_of: Callable[[int], Any], size: int) -> list[list[int]]:
    """``rows`` in packs (each a list of rows, in row order): rows whose requests share a key go
    together, up to ``size`` rows and `MAX_BYTES` of inputs; any other row is a pack of its own."""
    units: list[list[int]] = []
    open_packs: dict[str, tuple[list[int], int]] = {}
    for i in rows:
        request = request_of(i)
        found = _key_and_item(request) if size > 1 and isinstance(request, PreparedRequest) else None
        if found is None:
            units.append([i])
            continue
        key, item = found
        weight = len(json.dumps(item, ensure_ascii=False, default=str).encode())
        current = open_packs.get(key)
        if current is None or len(current[0]) >= size or current[1] + weight > MAX_BYTES:
            current = ([], 0)
            units.append(current[0])
        current[0].append(i)
        open_packs[key] = (current[0], current[1] + weight)
    return units


def packed_request(requests: Sequence[PreparedRequest]) -> PreparedRequest:
    """One request carrying every one of ``requests``' inputs, in order (they share every other field)."""
    first = requests[0]
    field = PACKED[first.kind]
    items = [_key_and_item(r)[1] for r in requests]  # type: ignore[index]
    return dataclasses.replace(first, body={**first.body, field: items})


class PackOutcome:
    """What a pack's request gave each of its rows: ``outcomes[row]`` (an answer, or its error)."""

    cached = False
    text = ""
    error = None
    is_partial = False

    def __init__(self, outcomes: dict[int, Any], usage: Usage | None):
        self.outcomes = outcomes
        self.usage = usage  # the whole request's (what the budget settles on)

    @property
    def failed_rows(self) -> int:
        return sum(1 for o in self.outcomes.values() if error_of(o) is not None)


def _shares(total: int | None, weights: Sequence[int]) -> list[int | None]:
    """``total`` split in proportion to ``weights`` (whole numbers that add up to it)."""
    if total is None:
        return [None] * len(weights)
    if not any(weights):
        weights = [1] * len(weights)
    raw = [total * w / sum(weights) for w in weights]
    shares = [int(r) for r in raw]
    for j in sorted(range(len(raw)), key=lambda k: raw[k] - shares[k], reverse=True)[:total - sum(shares)]:
        shares[j] += 1
    return shares


def split_answer(completion: Completion, rows: Sequence[int], requests: Sequence[PreparedRequest],
                 transform_output: Callable[[Any], Any] | None, apply_output: Callable[..., Any]) -> dict[int, Any]:
    """The answer to a packed request cut into one answer per row, each read as the row's own request's
    answer would be (then ``transform_output``); a `BadResponse` when it holds another number of outputs."""
    kind, data = completion.kind, completion.raw
    if kind == EMBEDDINGS:
        outputs = sorted(data.get("data") or [], key=lambda d: d.get("index", 0)) if isinstance(data, dict) else []
        slices = [{**{k: v for k, v in data.items() if k not in ("data", "usage")}, "data": [{**d, "index": 0}]}
                  for d in outputs]
    else:
        key = ("predictions" if "predictions" in data else "outputs") if isinstance(data, dict) else None
        predictions = data.get(key) if key else data
        outputs = predictions if isinstance(predictions, list) else []
        slices = [{key or "predictions": [p]} for p in outputs]
    if len(slices) != len(rows):
        raise BadResponse(f"{requests[0].target} answered {len(slices)} outputs to a request of {len(rows)} rows",
                          target=requests[0].target)
    usage = completion.usage
    weights = [len(json.dumps(_key_and_item(r)[1], default=str)) for r in requests]  # type: ignore[index]
    split = {name: _shares(getattr(usage, name, None), weights) for name in Usage.__dataclass_fields__} \
        if usage else None
    answers: dict[int, Any] = {}
    for j, (row, request, piece) in enumerate(zip(rows, requests, slices, strict=True)):
        try:
            parsed = parse_response(kind, piece)
        except WireError as exc:  # one output of the wrong shape: the pack is split, as any it cannot read
            raise BadResponse(f"{request.target} sent {exc}", target=request.target) from None
        value = parsed.value
        row_usage = Usage(**{name: shares[j] for name, shares in split.items()}) if split else Usage()
        answer = dataclasses.replace(completion, text=parsed.text, value=value, natural=parsed.value, raw=piece,
                                     request=request.body, usage=row_usage)
        if transform_output is not None:
            try:
                value = apply_output(transform_output, value)
            except DbMagicError as exc:
                answers[row] = exc
                continue
            answer = dataclasses.replace(answer, value=value, text=value if isinstance(value, str) else parsed.text)
        answers[row] = answer
    return answers


class Pack:
    """A pack's call as the batch's workers see one (`dbmagic.batching.rows.Rows`): ``outcome()``
    gives a `PackOutcome` of the rows it sent (``read`` cuts the answer into them), or the
    request's error. ``call`` is None when the checkpoint or the cache answered every row (the
    batch keeps those answers in the rows' places itself)."""

    reused = False

    def __init__(self, call: Any, read: Callable[[Completion], dict[int, Any]]):
        self._call, self._read = call, read

    completion = None  # a batch stopped with this pack on its way keeps it as interrupted (`partial`), never
    # the packed answer itself, which is every row's at once

    def partial(self, why: str) -> Any:
        return self._call.partial(why)

    def cancel(self, why: str = "stopped") -> None:
        if self._call is not None:
            self._call.cancel(why)

    def outcome(self) -> Any:
        if self._call is None:
            return PackOutcome({}, None)
        outcome = self._call.outcome()
        if isinstance(outcome, BaseException) or getattr(outcome, "is_partial", False):
            return outcome
        try:
            answers = self._read(outcome)
        except DbMagicError as exc:  # the wrong number of outputs: split, as any failed pack
            return exc
        return PackOutcome(answers, outcome.usage)


def splits(outcome: Any, rows: Sequence[int]) -> tuple[list[int], list[int]] | None:
    """The two halves to send again when a pack's request failed for what one of its rows may hold
    (the endpoint refused the request, 400 or 413 or 422, or answered it in another shape), else
    None: a 429, a 401 or 403, a missing endpoint, a 5xx or a broken connection is the whole
    request's, and halves would meet it again."""
    if len(rows) < 2:
        return None
    refused = isinstance(outcome, BadRequest) or (isinstance(outcome, StatusError) and outcome.status in (413, 422))
    if not (refused or isinstance(outcome, BadResponse)):
        return None
    half = len(rows) // 2
    return list(rows[:half]), list(rows[half:])
