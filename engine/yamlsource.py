"""YAML with line numbers, so every definition error can say `file:line: what is wrong`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class SourceError:
    """One problem in a definition file; `str()` is `file:line: message`."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.message}"


class SourceErrors(Exception):
    def __init__(self, errors: list[SourceError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class YamlDoc:
    data: Any
    lines: Mapping[Path_, int]
    file: str
    first_line: int = 1

    def line_of(self, path: Path_) -> int:
        """The line of the deepest node along `path` that the file has."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:end]))
            if line is not None:
                return line
        return self.first_line

    def validation_errors(self, exc: ValidationError) -> list[SourceError]:
        errors = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
            field = ".".join(str(p) for p in loc)
            message = err["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            text = f"{field}: {message}" if field else message
            errors.append(SourceError(self.file, self.line_of(loc), text))
        return errors


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int], offset: int) -> Any:
    lines[path] = node.start_mark.line + 1 + offset
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            # Keys are names: YAML 1.1 would read `on:` or `no:` as booleans.
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            if key in result:
                raise yaml.MarkedYAMLError(
                    problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark
                )
            result[key] = _walk(value_node, (*path, key), lines, offset)
            lines[(*path, key)] = key_node.start_mark.line + 1 + offset
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*path, i), lines, offset) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def parse_yaml(text: str, file: str, *, first_line: int = 1) -> YamlDoc:
    """Parse one YAML document, recording the line of every key and item.

    Raises SourceErrors with the line of a syntax error or duplicate key.
    """
    offset = first_line - 1
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        lines: dict[Path_, int] = {}
        data = None if node is None else _walk(node, (), lines, offset)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 + offset if mark else None
        problem = exc.problem or str(exc)
        raise SourceErrors([SourceError(file, line, f"invalid YAML: {problem}")]) from exc
    except yaml.YAMLError as exc:
        raise SourceErrors([SourceError(file, None, f"invalid YAML: {exc}")]) from exc
    return YamlDoc(data=data, lines=lines, file=file, first_line=first_line)
