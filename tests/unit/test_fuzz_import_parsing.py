"""Hypothesis over the database-free half of the import: any text in any column of any CSV
kind, and any JSON as a FHIR bundle, gives a record, a RowError naming the column, or a
BundleError, never another exception. (tests/integration/test_fuzz_import.py runs whole
files through the real importer on SQLite and PostgreSQL.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import fhir_import
from engine.crypto import Keyring
from engine.import_rows import Context, RowError
from engine.importer import COLUMNS, parse

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
DATA = Path(__file__).resolve().parents[1] / "data" / "import"
TRICKY = [
    "", " ", "²", "١٢", "0", "-1", "1e9", "NaN", "\x00", "\ufeff", "=cmd|' /C calc'!A0",
    "+1 212 555 0142", "2024-02-30", "2024-03-10T02:30:00", "2024-03-10T02:30:00+25:00",
    "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+00:00", "America/New_York",
    "../../etc/passwd", "true", "ß", "ǅ", "x" * 300, "9" * 300, "+" + "9" * 300,
]  # fmt: skip
VALUE = st.sampled_from(TRICKY) | st.text(max_size=80)
CONTEXT = Context(keyring=None, purposes={"adherence", "appointment", "marketing"})  # type: ignore[arg-type]
_: type[Keyring] | None = None  # parsing never touches the keyring


@pytest.mark.parametrize("kind", sorted(COLUMNS))
def test_any_row_of_any_kind_parses_or_says_which_column_is_wrong(kind: str) -> None:
    columns = COLUMNS[kind]

    @FUZZ
    @given(values=st.fixed_dictionaries({}, optional=dict.fromkeys(columns, VALUE)))
    @example(values=dict.fromkeys(columns, "²"))
    @example(values=dict.fromkeys(columns, "\x00"))
    def check(values: dict[str, str]) -> None:
        try:
            parse(kind, values, CONTEXT)
        except RowError as error:
            reasons = str(error).split("; ")
            assert all(any(c in r for c in columns) for r in reasons), str(error)

    check()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
SAMPLE = json.loads((DATA / "bundle.json").read_text())
KEYS = ["resourceType", "id", "identifier", "name", "telecom", "subject", "patient", "status",
        "participant", "provision", "medicationCodeableConcept", "extension", "start",
        "dateTime", "birthDate", "address", "fullUrl", "value", "reference", "given"]  # fmt: skip


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _paths(value, (*path, i))
    return found


def _mutate(document: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    parent = copy
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


@st.composite
def mutated_bundles(draw: st.DrawFn) -> Any:
    document: Any = SAMPLE
    for _ in range(draw(st.integers(1, 4))):
        paths = _paths(document)
        path = draw(st.sampled_from(paths))
        value = draw(JSON | st.sampled_from(KEYS) | st.sampled_from(list(fhir_import.KIND_OF)))
        document = _mutate(document, path, value, draw(st.booleans()) and bool(path))
    return document


@FUZZ
@given(document=mutated_bundles() | JSON)
@example(document={"resourceType": "Bundle", "entry": [{"resource": {"resourceType": ["x"]}}]})
@example(
    document={
        "resourceType": "Bundle",
        "entry": [{"resource": {"resourceType": "Patient", "identifier": "x"}}],
    }
)
@example(
    document={
        "resourceType": "Bundle",
        "entry": [{"fullUrl": ["u"], "resource": {"resourceType": "Patient"}}],
    }
)
def test_any_json_is_a_bundle_of_rows_or_a_bundle_error(
    tmp_path_factory: Any, document: Any
) -> None:
    path = tmp_path_factory.mktemp("fhir") / "bundle.json"
    path.write_text(json.dumps(document))
    try:
        bundle = fhir_import.read_bundle(path)
    except fhir_import.BundleError as error:
        assert str(error)
        return
    entries = document["entry"] or []
    types = [e["resource"].get("resourceType") for e in entries if _has_resource(e)]
    supported = sum(isinstance(t, str) and t in fhir_import.KIND_OF for t in types)
    assert len(bundle.rows) == supported
    for row in bundle.rows:
        assert row.label.startswith("entry[") and row.kind in COLUMNS
        assert row.error is None or not row.values
        assert all(isinstance(v, str) for v in row.values.values())


def _has_resource(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("resource"), dict)


def test_json_nested_too_deeply_is_a_bundle_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"resourceType": "Bundle", "entry": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(fhir_import.BundleError, match="nests too deeply"):
        fhir_import.read_bundle(path)
