"""Per-decision state of engine.core.policy.decide: the variables the rules' expressions
read, each computed when first needed, and their evaluation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

import cel

from engine.core.cel_context import CompiledExpression, policy_variables
from engine.core.domain import DecisionContext
from engine.core.zones import get_zone

if TYPE_CHECKING:
    from engine.core.policy import CompiledPolicySet


class Flat(dict):  # type: ignore[type-arg]
    """A decision's flat variables, each computed when first read."""

    __slots__ = ("_compute",)

    def __init__(self, compute: Callable[[str], object]) -> None:
        super().__init__()
        self._compute = compute

    def __missing__(self, name: str) -> object:
        value = self[name] = self._compute(name)
        return value


class Evaluation:
    """Per-decision state: the variables, each flat one computed when first read (most
    results come from the expressions' memos, which need only their keys' values), the
    CEL activation (built once, only when an expression has to run) and `where` results
    shared by rules with the same condition."""

    __slots__ = ("_activation", "_clocks", "_nested", "_where", "ctx", "flat", "policy_set")

    def __init__(self, policy_set: CompiledPolicySet, ctx: DecisionContext):
        self.policy_set = policy_set
        self.ctx = ctx
        self.flat = Flat(self._flat_value)
        self._nested: dict[str, object] | None = None
        self._activation: cel.Context | None = None
        self._clocks: tuple[list[datetime], str] | None = None
        self._where: dict[str, bool] = {}

    def clocks(self) -> tuple[list[datetime], str]:
        """The local time in each of the patient's zones, and that as text."""
        if self._clocks is None:
            local = [self.ctx.now.astimezone(get_zone(z)) for z in self.ctx.patient.zones]
            text = ", ".join(f"{t.hour:02d}:{t.minute:02d} {t.tzinfo}" for t in local)
            self._clocks = (local, text)
        return self._clocks

    def nested(self) -> dict[str, object]:
        """The nested variables every expression of the set reads (built once, all at
        once: a variable that cannot be built fails every expression, as it always has)."""
        if self._nested is None:
            uses = self.policy_set.uses
            purposes = self.policy_set.purposes
            self._nested = policy_variables(self.ctx, purposes=purposes, only=uses.names)
        return self._nested

    def _flat_value(self, name: str) -> object:
        return self.policy_set.uses.reads[name].value(self.nested().__getitem__)

    def activation(self) -> cel.Context:
        if self._activation is None:
            # Values reach CEL only when an expression reads them: converting a string into
            # CEL costs about a microsecond, and most rules read few of the variables.
            # A resolver's None means "not here", so nulls are set up front.
            flat = self.flat
            for name in self.policy_set.uses.reads:
                flat[name]  # computes it
            activation = cel.Context({k: None for k, v in flat.items() if v is None})
            activation.set_variable_resolver(flat.get)
            self._activation = activation
        return self._activation

    def run(self, expression: CompiledExpression) -> object:
        return expression.run_memoized(self.flat, self.activation, self.nested)

    def holds(self, expression: CompiledExpression) -> bool:
        known = self._where.get(expression.source)
        if known is None:
            known = boolean(expression, self.run(expression))
            self._where[expression.source] = known
        return known


def boolean(expression: CompiledExpression, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{expression.where} returned {type(value).__name__}, not a boolean")
    return value
