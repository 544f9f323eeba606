"""The runtime half of the SMS template sandbox: what holds even without the static check.

Jinja's ImmutableSandboxedEnvironment refuses private and unsafe attributes. On top of it:
  - the compiler itself refuses loops, macros, {% call %}, include, import, extends,
    blocks, names starting with "_" and list, tuple and dict literals, so no template can
    iterate or build nested values;
  - an unsafe attribute is refused when read, not when used;
  - no call of any kind, no ** and no %-formatting of strings;
  - every operator that can grow a value (``*``, ``+``, ``~``, and the replace and join
    filters) refuses to build more than MAX_INTERMEDIATE characters or items, and an
    integer product more than MAX_INT_BITS bits, so chained ``{% set a = a ~ a %}`` stays
    bounded;
  - reading a method (``x.upper``) is refused: it cannot be called, and printing it would
    leak an object's address;
  - only text, numbers, dates and times are printed, never a container's repr.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, time
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_INTERMEDIATE = 10_000  # longest string or list one expression may build
MAX_INT_BITS = 256  # largest integer product (about 77 decimal digits)
PRINTABLE = str | int | float | date | time
_NO_COMPILE = {
    nodes.For: "loops",
    nodes.Macro: "macros",
    nodes.CallBlock: "{% call %}",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "import",
    nodes.Extends: "extends",
    nodes.Block: "blocks",
    nodes.List: "list literals",
    nodes.Tuple: "tuple literals",
    nodes.Dict: "dict literals",
}


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


def bounded(value: Any, what: str) -> Any:
    """The value, or SecurityError when it is longer than MAX_INTERMEDIATE."""
    if _sized(value) > MAX_INTERMEDIATE:
        raise SecurityError(f"{what} would build a value that is too long")
    return value


def printable(value: Any) -> Any:
    """finalize: an output expression prints text, a number, a date or a time, nothing else."""
    if isinstance(value, PRINTABLE | jinja2.Undefined) or value is None:
        return value
    raise SecurityError(f"a {type(value).__name__} cannot be printed in an SMS template")


def replace(value: Any, old: Any, new: Any, count: int = -1) -> str:
    """str.replace that refuses to build more than MAX_INTERMEDIATE characters."""
    text, old, new = str(value), str(old), str(new)
    hits = text.count(old) if count < 0 else min(count, text.count(old))
    if len(text) + hits * (len(new) - len(old)) > MAX_INTERMEDIATE:
        raise SecurityError("replace would build a string that is too long")
    return text.replace(old, new, count)


def join(value: Iterable[Any], d: str = "") -> str:
    """str.join of printable items (no attribute= lookups), bounded like replace."""
    items = [str(printable(item)) for item in bounded(list(value), "join")]
    return bounded(str(d).join(items), "join")


class SmsCodeGenerator(CodeGenerator):
    """Jinja's compiler, refusing the constructs an SMS template never needs."""

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        what = _NO_COMPILE.get(type(node))
        if what is not None:
            self.fail(f"{what} are not allowed in SMS templates", node.lineno)
        if isinstance(node, nodes.Name) and node.name.startswith("_"):
            self.fail(f"the name {node.name!r} is not allowed in SMS templates", node.lineno)
        return super().visit(node, *args, **kwargs)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_bounded((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class SmsSandbox(ImmutableSandboxedEnvironment):
    """The Jinja sandbox, plus: no calls at all, no ** or %-formatting, bounded growth."""

    code_generator_class = SmsCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        # The message names no object: its repr could show an address or a secret.
        raise SecurityError("calls are not allowed in SMS templates: use a filter")

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        """Refuse at once, not when the value is used (`x|default(x.__class__)`)."""
        kind = type(obj).__name__
        raise SecurityError(f"access to the attribute {attribute!r} of a {kind} is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" or (operator == "%" and isinstance(left, str)):
            raise SecurityError(f"the {operator} operator is not allowed in SMS templates")
        if operator == "*":
            _check_product(left, right)
        if operator == "+" and _sized(left) + _sized(right) > MAX_INTERMEDIATE:
            raise SecurityError("+ would build a value that is too long")
        return super().call_binop(context, operator, left, right)

    def concat_bounded(self, parts: Iterable[Any]) -> str:
        """The ~ operator: str() of each part, joined, at most MAX_INTERMEDIATE characters."""
        return str(bounded("".join(str(printable(part)) for part in parts), "~"))

    def getattr(self, obj: Any, attribute: str) -> Any:
        return _no_method(super().getattr(obj, attribute), attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        return _no_method(super().getitem(obj, argument), argument)


def _check_product(left: Any, right: Any) -> None:
    size = max(_sized(left), _sized(right))
    times = next((x for x in (left, right) if isinstance(x, int)), 1)
    if size * times > MAX_INTERMEDIATE:
        raise SecurityError("repetition would build a value that is too long")
    ints = isinstance(left, int) and isinstance(right, int)
    if ints and abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
        raise SecurityError("the product would be a number that is too large")


def _no_method(value: Any, name: Any) -> Any:
    if callable(value) and not isinstance(value, jinja2.Undefined):
        raise SecurityError(f"{name!r} is a method: methods are not allowed in SMS templates")
    return value
