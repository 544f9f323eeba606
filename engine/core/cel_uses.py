"""What a CEL expression reads, found by scanning its source, and its rewriting so that each
read becomes one flat top-level variable (see engine.core.cel_context).

Two forms of read are flattened:
- `name.a.b`, a path of plain field selections: the flat variable `name__a__b`;
- `name[other.x].a`, an entry of a record map (`consent`) chosen by another variable's
  path, then its fields: the flat variable `name_of_other__x__a`. The fields of the entry
  are what the expression depends on, not the whole map (with its timestamps), so its
  results can be shared by every decision with the same values.
Any other use of a name (whole, indexed otherwise, in has(), rebound by a macro) reads it
whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from engine.core.cel_variables import RECORD_MAPS, Names

Path = tuple[str, ...]


class PolicyError(ValueError):
    """A policy definition that cannot be compiled; `line` is the rule's line in its file."""

    def __init__(self, message: str, line: int | None = None, *, rule: str | None = None):
        super().__init__(message)
        self.message = message
        self.line = line
        self.rule = rule


UNBOUND: Any = type("Unbound", (), {"__repr__": lambda self: "UNBOUND"})()
"""The value of an indexed read that is not a plain entry of a plain map (a missing key,
a null index): the expression is then evaluated as written (CompiledExpression.fallback),
so that CEL itself decides what that means."""


@dataclass(frozen=True)
class Read:
    """One flat variable: `name.path`, or with `index`, `name[index_name.index_path].path`."""

    name: str
    path: Path
    index: tuple[str, Path] | None = None

    @cached_property
    def flat(self) -> str:
        if self.index is None:
            return flat_name(self.name, self.path)
        return f"{self.name}_of_{flat_name(*self.index)}__{'__'.join(self.path)}"

    def value(self, nested: Callable[[str], Any]) -> Any:
        """The value from nested variables (`nested(name)`); a path through a null record
        (an absent anchor) is null."""
        if self.index is None:
            value = nested(self.name)
            for key in self.path:
                value = None if value is None else value[key]
            return value
        key = Read(*self.index).value(nested)
        entry = nested(self.name)
        if type(entry) is not dict or type(key) is not str:
            return UNBOUND
        entry = entry.get(key, UNBOUND)
        for step in self.path:
            if type(entry) is not dict or step not in entry:
                return UNBOUND
            entry = entry[step]
        return entry


@dataclass(frozen=True)
class Uses:
    """What expressions read: names used whole, name -> the paths read as `name.a.b`, and
    the indexed reads `name[other.x].a`.

    A read is compiled as a flat variable: the cel module converts a top-level variable
    several times faster than a map entry, and only read paths are built.
    """

    whole: frozenset[str] = frozenset()
    fields: Mapping[str, frozenset[Path]] = field(default_factory=dict)
    indexed: frozenset[Read] = frozenset()

    @cached_property
    def names(self) -> frozenset[str]:
        """Every top-level variable read (as a whole, by a path or as an index)."""
        found = set(self.whole) | set(self.fields)
        for read in self.indexed:
            found.add(read.name)
            found.update(read.index[:1] if read.index else ())
        return frozenset(found)

    @cached_property
    def flat_names(self) -> dict[str, tuple[tuple[Path, str], ...]]:
        return {n: tuple((p, flat_name(n, p)) for p in paths) for n, paths in self.fields.items()}

    @cached_property
    def reads(self) -> dict[str, Read]:
        """Every variable of the flattened programs by its name: whole names (a read with
        no path), paths and indexed reads."""
        out = {name: Read(name, ()) for name in sorted(self.whole)}
        for name, paths in sorted(self.fields.items()):
            out.update((flat_name(name, p), Read(name, p)) for p in sorted(paths))
        out.update((r.flat, r) for r in sorted(self.indexed, key=lambda r: r.flat))
        return out

    @cached_property
    def indexed_names(self) -> tuple[str, ...]:
        return tuple(sorted(r.flat for r in self.indexed))

    def __or__(self, other: Uses) -> Uses:
        merged = dict(self.fields)
        for name, read in other.fields.items():
            merged[name] = merged.get(name, frozenset()) | read
        return Uses(self.whole | other.whole, merged, self.indexed | other.indexed)


def flat_name(name: str, path: Path) -> str:
    return "__".join((name, *path))


def bind(variables: Mapping[str, Any], uses: Uses) -> dict[str, Any]:
    """The activation of compiled expressions from nested variables (UNBOUND for an indexed
    read that is not a plain map entry)."""
    get = variables.__getitem__
    return {flat: read.value(get) for flat, read in uses.reads.items()}


# --- scanning and flattening --------------------------------------------------------------

_STRING = (
    r"""[rRbB]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''"""
    r"""|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')"""
)
_IDENT_PATH = r"[A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*"
_TOKEN = re.compile(
    rf"(?P<string>{_STRING})"
    r"|(?<![\w.])(?P<name>[A-Za-z_]\w*)"
    rf"(?:\s*\[\s*(?P<index>{_IDENT_PATH})\s*\](?=\s*\.\s*[A-Za-z_]))?"
    r"(?P<path>(?:\s*\.\s*[A-Za-z_]\w*)*)(?P<call>\s*\()?"
)
_IDENT = re.compile(r"[A-Za-z_]\w*")
BOUND = re.compile(r"\.\s*(?:all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
_HAS_OPEN = re.compile(r"has\s*\(\s*$")


def scan_uses(source: str, names: Names, where: str, *, indexed: bool = True) -> Uses:
    """Check `name.field` reads against `names`; a name read other than by a path of plain
    field selections, or (`indexed`) as an entry of a record map, is used whole."""
    bound = set(BOUND.findall(source))
    whole = bound & set(names)
    read: dict[str, set[Path]] = {}
    entries: dict[Read, Path] = {}  # indexed read -> its index path
    for token in _TOKEN.finditer(source):
        name = token.group("name")
        index = _index(token)
        if index is not None and index[0] in names:
            _check_fields(index[0], index[1], names[index[0]], where)
        if name not in names:
            _read_index(index, names, whole, read)
            continue
        path = _path(token)
        if index is None:  # after `name[...]` the path is inside an entry: the sample checks it
            _check_fields(name, path, names[name], where)
        in_has = _HAS_OPEN.search(source, 0, token.start()) is not None
        entry = _entry(name, index, path, names, bound) if indexed and not in_has else None
        if entry is not None:
            entries[entry] = index[1] if index else ()
        elif not path or index is not None or in_has:
            whole.add(name)
            _read_index(index, names, whole, read)
        else:
            read.setdefault(name, set()).add(path)
    kept = frozenset(e for e in entries if e.name not in whole)
    for entry in entries.keys() - kept:  # the map is read whole anyway: its index is a path
        assert entry.index is not None
        read.setdefault(entry.index[0], set()).add(entry.index[1])
    fields = {n: frozenset(p) for n, p in read.items() if n not in whole}
    return Uses(frozenset(whole), fields, kept)


def _index(token: re.Match[str]) -> tuple[str, Path] | None:
    text = token.group("index")
    if text is None:
        return None
    name, *path = _IDENT.findall(text)
    return name, tuple(path)


def _read_index(
    index: tuple[str, Path] | None, names: Names, whole: set[str], read: dict[str, set[Path]]
) -> None:
    """An index that is not flattened with its map: read as any other name."""
    if index is None or index[0] not in names:
        return
    if index[1]:
        read.setdefault(index[0], set()).add(index[1])
    else:
        whole.add(index[0])


def _entry(
    name: str,
    index: tuple[str, Path] | None,
    path: Path,
    names: Names,
    bound: set[str],
) -> Read | None:
    """`name[other.x].a` as an indexed read, when it is one that can be flattened."""
    if index is None or name not in RECORD_MAPS or not path or not index[1]:
        return None
    if index[0] not in names or index[0] in bound:
        return None
    return Read(name, path, index)


def _path(token: re.Match[str]) -> Path:
    """The field selections after the name, less a method called on the last one."""
    path = tuple(_IDENT.findall(token.group("path")))
    return path[:-1] if token.group("call") else path


def _check_fields(name: str, path: Path, fields: frozenset[str] | None, where: str) -> None:
    record = RECORD_MAPS.get(name)
    if path and fields is not None and path[0] not in fields:
        listed = ", ".join(sorted(fields))
        raise PolicyError(f"{where}: unknown field {name}.{path[0]}; {name} has: {listed}")
    if record is not None and len(path) > 1 and path[1] not in record:
        raise PolicyError(
            f"{where}: unknown field {path[1]!r} of a {name} entry; "
            f"each has: {', '.join(sorted(record))}"
        )


def flatten_source(source: str, uses: Uses) -> str:
    """The source with every read of `uses` replaced by its flat variable."""

    def replace(token: re.Match[str]) -> str:
        name = token.group("name")
        index = _index(token) if name is not None else None
        if index is not None:
            entry = Read(name, _path(token), index)
            if entry in uses.indexed:
                return entry.flat + _method(token)
            start, end = token.span("index")
            text, offset = token.group(0), token.start()
            inner = _flat_path(*index, uses)
            return text[: start - offset] + inner + text[end - offset :]
        path = _path(token) if name in uses.fields else ()
        if not path:
            return token.group(0)
        return flat_name(name, path) + _method(token)

    return _TOKEN.sub(replace, source)


def _method(token: re.Match[str]) -> str:
    """The method called on the last field selection, with its opening parenthesis."""
    call = token.group("call")
    return f".{_IDENT.findall(token.group('path'))[-1]}{call}" if call else ""


def _flat_path(name: str, path: Path, uses: Uses) -> str:
    if path and name in uses.fields:
        return flat_name(name, path)
    return ".".join((name, *path))
