"""Hypothesis over whole import files through the real importer, on SQLite and PostgreSQL.

patients.csv files of good rows and rows broken on purpose (bad phones, dates, zones,
control characters, bytes that are not UTF-8, a field over the csv module's size limit, too
many or too few fields), with BOMs, CRLF, shuffled and missing optional columns, quoted
commas and newlines and formula-injection names. Every good row is imported whatever its
neighbours; every broken row is rejected alone, with the file, its line and the column;
nothing raises. FHIR bundles built from the fixture with random mutations: every supported
entry is imported or rejected with its entry index, and the unmutated patients are imported.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine import importer
from engine.crypto import Keyring
from engine.store import models as m
from tests.unit.test_fuzz_import_parsing import JSON, _mutate, _paths

FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
COLUMNS = list(importer.COLUMNS["patients"])
OPTIONAL = ["timezone", "locale", "region", "birth_date", "allow_phi_sms", "given_name"]
GOOD_VALUES = {
    "given_name": ["Ana", "=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "@SUM(1+1)",
                   "-2+3", "Zoë, \"Zo\"", "Line\nbreak", "🙂", "مريم", "  padded  ", "x" * 128],
    "family_name": ["Lopez", "O'Brien", "=1+1", "\t=tab", "Ünsal;DROP TABLE patients;--"],
    "phone": ["(212) 555-01{n:02d}", "+1 212 555 01{n:02d}", "212.555.01{n:02d}"],
    "timezone": ["", "America/New_York"],
    "locale": ["", "en", "es-US"],
    "region": ["", "NY"],
    "birth_date": ["", "1980-04-02"],
    "allow_phi_sms": ["", "yes", "false"],
}  # fmt: skip
# column -> (value, what the rejection must say); a value may be bytes (written raw)
BAD_VALUES: dict[str, list[tuple[str | bytes, str]]] = {
    "phone": [("555-12", "phone"), ("", "phone is empty"), ("+" + "9" * 300, "phone"),
              ("=2125550142", "phone"), ("phone", "phone")],
    "birth_date": [("1999-02-30", "birth_date"), ("02/03/1980", "birth_date"),
                   ("²⁰²⁴-01-01", "birth_date")],
    "timezone": [("Mars/Base", "timezone"), ("../../etc/passwd", "timezone")],
    "allow_phi_sms": [("maybe", "allow_phi_sms")],
    "country": [("USA", "country"), ("", "country")],
    "locale": [("english!", "locale")],
    "external_id": [("", "external_id"), ("E" * 65, "external_id")],
    "given_name": [("a\x00b", "given_name contains a control character"),
                   (b"Jos\xe9", "given_name is not valid UTF-8"),
                   ("y" * 200_000, "field larger than field limit"),
                   ("x" * 129, "given_name is longer")],
    "family_name": [(b"\xff\xfe", "family_name is not valid UTF-8"),
                    ("\x1b[31mred", "family_name contains a control character")],
}  # fmt: skip
RAW = "\x00RAW\x00"  # stands for raw bytes until the text is encoded


@dataclass(frozen=True)
class Row:
    external_id: str
    fields: dict[str, str | bytes]
    expect: str | None  # None: imported; else a phrase of the rejection
    shape: str = ""  # "extra" or "short": a wrong number of fields
    column: str = ""  # the column broken on purpose


@st.composite
def rows(draw: st.DrawFn, n: int, prefix: str) -> Row:
    external_id = f"{prefix}-{n}"
    fields: dict[str, str | bytes] = {"external_id": external_id, "country": "US"}
    for column, choices in GOOD_VALUES.items():
        fields[column] = draw(st.sampled_from(choices)).replace("{n:02d}", f"{n % 100:02d}")
    kind = draw(st.sampled_from(["good", "good", "bad", "shape"]))
    if kind == "good":
        return Row(external_id, fields, None)
    if kind == "shape":
        shape = draw(st.sampled_from(["extra", "short"]))
        return Row(external_id, fields, "fields, found", shape)
    column = draw(st.sampled_from(sorted(BAD_VALUES)))
    value, expect = draw(st.sampled_from(BAD_VALUES[column]))
    return Row(external_id, {**fields, column: value}, expect, column=column)


@dataclass(frozen=True)
class CsvFile:
    data: bytes
    rows: list[tuple[int, Row]]  # (line where the row starts, row)


@st.composite
def csv_files(draw: st.DrawFn, prefix: str) -> CsvFile:
    dropped = draw(st.sets(st.sampled_from(OPTIONAL), max_size=3))
    header = [c for c in COLUMNS if c not in dropped]
    header = draw(st.permutations(header))
    extra = draw(st.booleans())
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    count = draw(st.integers(1, 8))
    made = [draw(rows(i, prefix)) for i in range(count)]
    text, raw, line = io.StringIO(), [], 2
    writer = csv.writer(text, lineterminator=newline)
    writer.writerow([*header, "nickname"] if extra else header)
    placed = []
    for row in made:
        if row.column in dropped:
            row = Row(row.external_id, row.fields, None)  # the column it breaks is absent
        values = [_text(row.fields.get(c, ""), raw) for c in header] + (["nick"] if extra else [])
        values = [*values, "surplus"] if row.shape == "extra" else values
        values = values[:-1] if row.shape == "short" else values
        start = text.tell()
        writer.writerow(values)
        placed.append((line, row))
        line += len(re.findall(r"\r\n|\r|\n", text.getvalue()[start:]))
    parts = text.getvalue().encode().split(RAW.encode())
    data = b"".join(itertools.chain.from_iterable(zip(parts, [*raw, b""], strict=True)))
    bom = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    tail = draw(st.sampled_from([b"", newline.encode(), (newline * 3).encode()]))
    return CsvFile(bom + data + tail, placed)


def _text(value: str | bytes, raw: list[bytes]) -> str:
    if isinstance(value, bytes):
        raw.append(value)
        return RAW
    return value


def _import(path: Path, factory: sessionmaker[Session], keyring: Keyring) -> Any:
    return importer.import_files(
        [path], session_factory=factory, keyring=keyring, progress=False, batch_size=3
    )


def _imported(factory: sessionmaker[Session], ids: list[str]) -> set[str]:
    with factory() as session:
        query = select(m.Patient.external_id).where(m.Patient.external_id.in_(ids))
        return set(session.scalars(query))


def test_csv_rows_are_judged_alone(
    session_factory: sessionmaker[Session], keyring: Keyring, tmp_path: Path
) -> None:
    counter = itertools.count()

    @FUZZ
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        n = next(counter)
        made = data.draw(csv_files(prefix=f"F{n}"))
        path = tmp_path / f"patients-{n}.csv"
        path.write_bytes(made.data)
        report = _import(path, session_factory, keyring)
        assert report.files[0].error is None, report.files[0].error
        by_line = {r.row: r for r in report.rejections}
        assert all(r.file == str(path) for r in report.rejections)
        assert len(by_line) == len(report.rejections)
        imported = _imported(session_factory, [row.external_id for _, row in made.rows])
        for line, row in made.rows:
            if row.expect is None:
                assert row.external_id in imported and line not in by_line, (line, row)
            else:
                assert line in by_line, (line, row, report.lines())
                assert row.expect in by_line[line].reason, (by_line[line], row)
                assert row.external_id not in imported
        assert set(by_line) == {line for line, row in made.rows if row.expect}

    check()
    assert next(counter) >= FUZZ.max_examples // 2


SAMPLE = json.loads((Path(__file__).parents[1] / "data" / "import" / "bundle.json").read_text())
GOOD_PATIENT = SAMPLE["entry"][0]


def _patient_entry(n: int, prefix: str) -> dict[str, Any]:
    entry = json.loads(json.dumps(GOOD_PATIENT))
    entry["fullUrl"] = f"urn:uuid:{prefix}-{n}"
    entry["resource"]["id"] = f"{prefix}-{n}"
    entry["resource"]["identifier"][0]["value"] = f"{prefix}-{n}"
    entry["resource"]["telecom"][1]["value"] = f"+1 512 201 45{n % 100:02d}"
    return entry


@st.composite
def bundles(draw: st.DrawFn, prefix: str) -> tuple[dict[str, Any], list[str]]:
    """A bundle of good patients, then the fixture's entries with random mutations."""
    good = [_patient_entry(n, prefix) for n in range(draw(st.integers(0, 4)))]
    others: Any = [json.loads(json.dumps(e)) for e in SAMPLE["entry"][1:]]
    for _ in range(draw(st.integers(1, 6))):
        path = draw(st.sampled_from(_paths(others)[1:]))
        value = draw(JSON | st.sampled_from(["Patient", "Consent", "Appointment", "x" * 5000]))
        others = _mutate(others, path, value, draw(st.booleans()))
    entries = good + others if isinstance(others, list) else [*good, others]
    order = draw(st.permutations(range(len(entries))))
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [entries[i] for i in order]}
    return bundle, [e["resource"]["identifier"][0]["value"] for e in good]


def test_fhir_entries_are_judged_alone(
    session_factory: sessionmaker[Session], keyring: Keyring, tmp_path: Path
) -> None:
    counter = itertools.count()

    @FUZZ
    @given(data=st.data())
    @example(data=None)  # the fixture bundle itself, unmutated
    def check(data: st.DataObject | None) -> None:
        n = next(counter)
        bundle, good = data.draw(bundles(prefix=f"B{n}")) if data else (SAMPLE, [])
        path = tmp_path / f"bundle-{n}.json"
        path.write_text(json.dumps(bundle))
        report = _import(path, session_factory, keyring)
        file = report.files[0]
        assert file.error is None, file.error
        supported = [
            e for e in bundle["entry"]
            if isinstance(e, dict) and isinstance(e.get("resource"), dict)
            and e["resource"].get("resourceType") in ("Patient", "MedicationRequest",
                                                      "Appointment", "Consent")
        ]  # fmt: skip
        done = file.imported + file.updated + file.unchanged + file.rejected
        assert done == len(supported)
        assert all(re.match(r"entry\[\d+\] \(", str(r.row)) for r in report.rejections)
        assert _imported(session_factory, good) == set(good) if good else True

    check()
    assert next(counter) >= FUZZ.max_examples // 2
