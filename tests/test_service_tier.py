"""Priority pay-per-token (issue 34): ``service_tier`` is a setting with a flag, sent as the body's
``service_tier`` (shared/WIRE.md: ``"service_tier": "priority"``), refused before sending where no
pay-per-token tier exists."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

import dbmagic
from dbmagic import ConfigurationError

from .conftest import CHAT, COMPLETIONS, CUSTOM, EMBEDDINGS


def _bodies(workspace) -> list[dict]:
    return [r.json for r in workspace.requests if r.path.startswith("/serving-endpoints/") and r.json]


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_the_tier_goes_in_the_body(client, workspace, endpoint):
    client.complete("hello", endpoint=endpoint, service_tier="priority")
    client.complete("hello", endpoint=endpoint)
    tiers = [b.get("service_tier") for b in _bodies(workspace)]
    assert tiers == ["priority", None]


def test_the_flag_and_the_config_default(shell, workspace):
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream --service-tier PRIORITY", "hello")
    shell.run_line_magic("config", 'DbLLM.service_tier = "priority"')
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream", "again")
    shell.run_cell_magic("dbllm", f"-e {CHAT} --no-stream --service-tier default", "standard")
    assert [b.get("service_tier") for b in _bodies(workspace)] == ["priority", "priority", "default"]


def test_a_tier_that_does_not_exist_is_refused_before_sending(shell, workspace):
    with pytest.raises(UsageError, match="service_tier must be one of default, priority; got 'gold'"):
        shell.run_cell_magic("dbllm", f"-e {CHAT} --service-tier gold", "hello")
    assert _bodies(workspace) == []


def test_a_target_with_no_pay_per_token_tier_is_refused_before_sending(client, workspace):
    with pytest.raises(ConfigurationError, match="--service-tier picks a pay-per-token tier.*takes custom requests"):
        client.complete("hello", endpoint=CUSTOM, service_tier="priority")
    with pytest.raises(ConfigurationError, match="is a driver-proxy app. Drop --service-tier"):
        client.complete("hello", cluster_id="0123-456789-abc", port=7777, service_tier="priority")
    assert _bodies(workspace) == []


def test_a_batch_sends_every_row_at_the_tier(client, workspace):
    result = dbmagic.batch("{{ row }}", ["a", "b", "c"], CHAT, client=client, progress=False, service_tier="priority")
    assert result.failed == [] and [b["service_tier"] for b in _bodies(workspace)] == ["priority"] * 3
