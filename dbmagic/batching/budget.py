"""What a batch may spend, as a bound: each request reserves its worst case before it is sent and
settles on what it cost (`Budget`); `budget_of` makes one from ``max_tokens_total`` or
``max_cost`` (priced as MLflow prices a trace)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..call.answers import Usage
from ..errors import ConfigurationError

__all__ = ["RESERVED_OUTPUT", "tokens_in", "Budget", "budget_of"]


# output tokens a request is taken to cost at worst when it sets no max_tokens (a budget reserves them)
RESERVED_OUTPUT = 512


def tokens_in(text: str) -> int:
    """An estimate of the tokens in ``text``: a token per 4 characters (the usual rule of thumb for
    English; the endpoint's own count decides), the one estimate a dry run and a budget use."""
    return -(-len(text) // 4)


@dataclass
class Budget:
    """What a batch may spend: ``limit`` in ``unit`` (tokens, or USD), each answer costing
    ``cost(usage)``; ``option`` is how to raise it.

    A bound, not a hope: each request reserves its worst case before it is sent (`worst`: its
    input's estimate plus its ``max_tokens``, or `RESERVED_OUTPUT` when unset), and a request
    starts only while what was spent, what is reserved and its own worst case fit in the limit,
    so no concurrency overshoots it. When it ends it settles on what it cost: the usage it
    reported, or the estimate (its input's, and its answer's text) where that is more (no usage
    reported, or less than the estimate); ``by_estimate`` counts those answers."""

    limit: float
    unit: str
    cost: Callable[[Usage], float]
    option: str
    spent: float = 0.0
    reserved: float = 0.0
    by_estimate: int = 0

    def worst(self, body: Any) -> tuple[float, int]:
        """``(worst cost, input tokens estimated)`` of a request body."""
        inputs = tokens_in(json.dumps(body, ensure_ascii=False, default=str))
        most = body.get("max_tokens") if isinstance(body, dict) else None
        output = most if isinstance(most, int) and not isinstance(most, bool) else RESERVED_OUTPUT
        return self.cost(Usage(inputs, output, inputs + output)), inputs

    def take(self, amount: float) -> bool:
        """Reserve ``amount`` when it fits beside what is spent and reserved."""
        if self.spent + self.reserved + amount > self.limit:
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, usage: Usage | None, inputs: int, text: str | None) -> None:
        """A request ended: its reservation goes, what it cost (usage, or the estimate) is spent."""
        self.reserved -= reserved
        if usage is None and text is None:  # it got no answer: nothing was generated
            return
        usage = usage or Usage()
        estimate = Usage(inputs, tokens_in(text or ""))
        counted = Usage(max(usage.input or 0, estimate.input or 0), max(usage.output or 0, estimate.output or 0))
        if usage.input is None or usage.output is None or counted != Usage(usage.input, usage.output):
            self.by_estimate += 1
        self.spent += self.cost(Usage(counted.input, counted.output, (counted.input or 0) + (counted.output or 0)))

    def refusal(self) -> str:
        """Why a row is not sent once the budget is reached, and what to do."""
        amount = (lambda v: f"{v:,.0f} tokens") if self.unit == "tokens" else (lambda v: f"${v:,.4f}")
        return (f"the batch reached its budget of {amount(self.limit)} ({amount(self.spent)} by the answers so "
                f"far). Raise {self.option}, or send the rest later with resume= (or the same checkpoint).")


def budget_of(max_tokens_total: int | None, max_cost: float | None, llm: tuple[str, str] | None) -> Budget | None:
    """The `Budget` of a batch's limits, checked before anything is sent. A cost is priced as MLflow
    prices a trace (its model catalog, by ``llm``: the model and provider, `Completion`'s
    ``mlflow.llm.model``), so it needs MLflow, and a price for the model."""
    if max_tokens_total is not None and max_cost is not None:
        raise ConfigurationError("Give the batch one budget: max_tokens_total or max_cost.")
    if max_tokens_total is not None:
        return Budget(max_tokens_total, "tokens", lambda usage: usage.total or 0,
                      "max_tokens_total (--max-tokens-total)")
    if max_cost is None:
        return None
    try:
        from mlflow.tracing.utils import calculate_cost_by_model_and_token_usage
    except ImportError:
        raise ConfigurationError("max_cost prices answers with MLflow's model prices: pip install 'dbmagic[mlflow]', "
                                 "or give max_tokens_total.") from None
    if llm is None:
        raise ConfigurationError("max_cost needs a model to price, and a driver-proxy app names none: give "
                                 "max_tokens_total.")
    model, provider = llm

    def cost(usage: Usage) -> float:
        tokens = {"input_tokens": usage.input or 0, "output_tokens": usage.output or 0}
        if usage.cache_read:
            tokens["cache_read_input_tokens"] = usage.cache_read
        found = calculate_cost_by_model_and_token_usage(model, tokens, provider)
        return float(found["total_cost"]) if found else 0.0

    if not cost(Usage(1000, 1000, 2000)):
        raise ConfigurationError(f"MLflow has no price for {model} ({provider}), so max_cost cannot be kept: give "
                                 "max_tokens_total.")
    return Budget(max_cost, "USD", cost, "max_cost (--max-cost)")
