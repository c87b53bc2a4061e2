"""What the user's templates and the registry's share of Jinja2: parsing with `self` a name like any
other, and the variables a parsed template reads. Jinja2 itself is imported only when a template has
markers (``{{``, ``{%``, ``{#``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Jinja2 reserves `self` (a template's own blocks); a variable or column of that name is renamed in
# the parsed template, so `{{ self }}` is its value like any other name
SELF = "_dbmagic_self"


def parse(env: Any, source: str) -> Any:
    """``source`` parsed by ``env``, with `self` a name like any other (see `SELF`)."""
    from jinja2 import nodes

    tree = env.parse(source)
    for node in tree.find_all(nodes.Name):
        if node.name == "self":
            node.name = SELF
    return tree


def declared(env: Any, tree: Any) -> frozenset[str]:
    """The variables a parsed template reads (`self` under its own name)."""
    import jinja2.meta

    return frozenset("self" if n == SELF else n for n in jinja2.meta.find_undeclared_variables(tree))


def with_self(values: Mapping[str, Any]) -> Mapping[str, Any]:
    return {**values, SELF: values["self"]} if "self" in values else values
