"""The static half of the SMS template sandbox: constructs refused before compiling.

A check over the template's AST rejects, naming the body line:
  - any name, attribute or constant item starting with "_" (``''.__class__``,
    ``x['__globals__']``, ``{% set __x %}``), Python methods (``x.upper``, ``x.mro``), and
    subscripts that are not constants,
  - the ``attr`` and ``format`` filters, ``join(attribute=...)``, ``.format``/``.format_map``,
    %-formatting and ``**``,
  - every function or method call (SMS templates use filters instead),
  - the names self, range, lipsum, dict, cycler, joiner, namespace, loop, caller, varargs, kwargs,
  - ``{% for %}``, ``{% macro %}``, ``{% call %}`` (no loops or recursion: output stays bounded),
    include, import, extends and block (templates are self-contained), and list, tuple and
    dict literals (a message prints text, never a container),
  - nesting deeper than MAX_DEPTH (parsing and compiling recurse once per level).
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime, time

from jinja2 import nodes

MAX_DEPTH = 60
DIRECTIVE = re.compile(r"%(-?)(.)")
DATE_CODES, TIME_CODES = frozenset("aAbBdmyY"), frozenset("HIMp")
FORBIDDEN_NAMES = frozenset({"self", "range", "lipsum", "dict", "cycler", "joiner", "namespace"})
FORBIDDEN_NAMES |= {"loop", "caller", "varargs", "kwargs"}
# Methods of the values a template sees (and of type): never values, so never read.
PYTHON_METHODS = frozenset(
    name
    for kind in (str, int, float, date, datetime, time, dict, list, tuple, type)
    for name in dir(kind)
    if not name.startswith("_") and callable(getattr(kind, name))
)
_SELF_CONTAINED = "templates are self-contained: no include, import, extends or block"
_NO_CONTAINERS = "list, tuple and dict literals are not allowed: join text with ~"
_FORBIDDEN_NODES: dict[type[nodes.Node], str] = {
    nodes.For: "{% for %} loops are not allowed: an SMS template renders one bounded message",
    nodes.Macro: "macros are not allowed in SMS templates",
    nodes.CallBlock: "{% call %} is not allowed in SMS templates",
    nodes.Pow: "the ** operator is not allowed in SMS templates",
    **dict.fromkeys(
        (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends, nodes.Block),
        _SELF_CONTAINED,
    ),
    **dict.fromkeys((nodes.List, nodes.Tuple, nodes.Dict), _NO_CONTAINERS),
}


def check_pattern(pattern: str, *, date_ok: bool = True, time_ok: bool = True) -> None:
    """Raise ValueError for a directive outside the safe subset or not applicable to the value."""
    for _, code in DIRECTIVE.findall(pattern):
        if code not in DATE_CODES | TIME_CODES | {"%"}:
            raise ValueError(f"unsupported date directive %{code}")
        if (code in DATE_CODES and not date_ok) or (code in TIME_CODES and not time_ok):
            raise ValueError(f"%{code} does not apply to a {'time' if date_ok else 'date'}")


def too_deep(ast: nodes.Node) -> int | None:
    """The body line where nesting first goes deeper than MAX_DEPTH, or None (iterative, so
    that a deeply nested template cannot exhaust the stack here)."""
    stack = [(ast, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return int(node.lineno)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return None


def static_problems(ast: nodes.Template) -> list[tuple[int, str]]:
    """(body line, message) for every construct the SMS sandbox forbids, in template order."""
    deep = too_deep(ast)
    if deep is not None:
        return [(deep, f"the template nests more than {MAX_DEPTH} levels deep")]
    found = ((node.lineno, _problem(node)) for node in ast.find_all(nodes.Node))
    return [(line, message) for line, message in found if message]


def _problem(node: nodes.Node) -> str | None:
    if type(node) in _FORBIDDEN_NODES:
        return _FORBIDDEN_NODES[type(node)]
    if isinstance(node, nodes.Name) and _forbidden_name(node.name):
        return f"the name {node.name!r} is not allowed in SMS templates"
    if isinstance(node, nodes.Getattr | nodes.Getitem):
        return _access_problem(node)
    if isinstance(node, nodes.Call):
        return f"calling {_describe(node.node)} is not allowed: use a filter (e.g. |title)"
    if isinstance(node, nodes.Mod) and isinstance(getattr(node.left, "value", None), str):
        return "%-formatting is not allowed in SMS templates: join text with ~"
    if isinstance(node, nodes.Filter):
        return _filter_problem(node)
    return None


def _forbidden_name(name: str) -> bool:
    name = unicodedata.normalize("NFKC", name)
    return name[:1] == "_" or name in FORBIDDEN_NAMES


def _access_problem(node: nodes.Getattr | nodes.Getitem) -> str | None:
    if isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Const | nodes.Slice):
        return "x[...] needs a constant index or key in SMS templates"
    name = node.attr if isinstance(node, nodes.Getattr) else const_str(node.arg)
    name = unicodedata.normalize("NFKC", name)  # x.ｍｒｏ reads as x.mro to a human
    if name.startswith("_"):
        return f"access to the private attribute {name!r} is not allowed"
    if name in ("format", "format_map"):
        return f"str.{name} is not allowed (format strings can reach attributes)"
    if name in PYTHON_METHODS:
        return f"{name!r} is a Python method, not a value: use a filter (e.g. |upper)"
    return None


def _filter_problem(node: nodes.Filter) -> str | None:
    if node.name in ("attr", "format"):
        return f"the {node.name!r} filter is not allowed in SMS templates"
    if node.dyn_args or node.dyn_kwargs:
        return f"|{node.name}(*args, **kwargs) is not allowed in SMS templates"
    if any(kw.key == "attribute" for kw in node.kwargs):
        return f"|{node.name}(attribute=...) is not allowed in SMS templates"
    if node.name in ("date", "time") and node.args:
        try:
            check_pattern(const_str(node.args[0]))
        except ValueError as e:
            return f"|{node.name}: {e}"
    return None


def const_str(node: nodes.Node) -> str:
    return node.value if isinstance(node, nodes.Const) and isinstance(node.value, str) else ""


def _describe(node: nodes.Node) -> str:
    if isinstance(node, nodes.Getattr):
        return f".{node.attr}()"
    return f"{node.name}()" if isinstance(node, nodes.Name) else "a function"
