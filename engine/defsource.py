"""Reading definition files: content hashes, error collection, YAML and front matter."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from engine.yamlsource import SourceError, SourceErrors, YamlDoc, parse_yaml

FOLDERS = {"policies": ".yaml", "templates": ".sms.j2", "campaigns": ".yaml"}


def read_tree(root: Path) -> dict[str, str]:
    """Every definition file under root as {relative path: text}; unreadable files raise."""
    files: dict[str, str] = {}
    errors: list[SourceError] = []
    for folder, suffix in FOLDERS.items():
        for path in sorted((root / folder).glob(f"*{suffix}")):
            rel = f"{folder}/{path.name}"
            try:
                files[rel] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                errors.append(SourceError(rel, None, f"cannot read: {exc}"))
    if errors:
        raise SourceErrors(errors)
    return files


class Collector:
    """Gathers errors across files so one run reports every problem."""

    def __init__(self, sources: dict[str, str]) -> None:
        self.sources = sources
        self.errors: list[SourceError] = []
        self.files: list[SourceFile] = []

    def paths(self, folder: str, suffix: str) -> list[str]:
        return sorted(p for p in self.sources if p.startswith(folder + "/") and p.endswith(suffix))

    def read(self, rel: str) -> tuple[str, str] | None:
        text = self.sources.get(rel)
        if text is None:
            self.errors.append(SourceError(rel, None, "file is missing"))
            return None
        return rel, text

    def model(self, cls: type[BaseModel], doc: YamlDoc) -> Any:
        if not isinstance(doc.data, dict):
            self.errors.append(SourceError(doc.file, doc.first_line, "expected a mapping"))
            return None
        try:
            return cls.model_validate(doc.data)
        except ValidationError as exc:
            self.errors.extend(doc.validation_errors(exc))
            return None

    def yaml_model(self, rel: str, cls: type[BaseModel], kind: str) -> tuple[Any, YamlDoc | None]:
        read = self.read(rel)
        if read is None:
            return None, None
        rel, text = read
        try:
            doc = parse_yaml(text, rel)
        except SourceErrors as exc:
            self.errors.extend(exc.errors)
            return None, None
        parsed = self.model(cls, doc)
        if parsed is not None:
            def_id = getattr(parsed, "id", kind)
            self.files.append(SourceFile(rel, kind, def_id, content_hash(text), text))
        return parsed, doc


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class SourceFile:
    """One definition file as loaded: what it defines and its content-hash version."""

    path: str
    kind: str
    def_id: str
    version: str
    content: str


def split_front_matter(text: str) -> tuple[str, str, int] | None:
    """(front matter, body, line where the body starts) or None without front matter."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return None
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "".join(lines[1:i]), "".join(lines[i + 1 :]), i + 2
    return None
