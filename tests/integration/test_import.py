"""Importing the fixture files: exact rejections, good rows kept, idempotent, nothing in clear."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from engine import importer
from engine.crypto import Keyring
from engine.store import consent_queries, queries
from engine.store import models as m

DATA = Path(__file__).resolve().parents[1] / "data" / "import"
CSV_FILES = ["patients.csv", "prescriptions.csv", "appointments.csv", "consents.csv", "slots.csv"]
PURPOSES = {"adherence", "appointment", "marketing"}

EXPECTED_REJECTIONS = [
    "patients.csv:4: phone '555-12' is not a valid number for US",
    "patients.csv:6: timezone 'Mars/Base' is not an IANA time zone name",
    "patients.csv:7: birth_date '1999-02-30' is not an ISO date (YYYY-MM-DD); "
    "allow_phi_sms 'maybe' is not one of true, false, yes, no, 1, 0",
    "patients.csv:10: duplicate of line 2 (same external_id)",
    "patients.csv:11: country 'USA' is not an ISO 3166-1 alpha-2 country code",
    "slots.csv:4: duration_min '0' is not a positive whole number of minutes",
    "prescriptions.csv:5: unknown patient P123",
    "prescriptions.csv:6: refill_due '03/01/2025' is not an ISO date (YYYY-MM-DD)",
    "prescriptions.csv:7: status 'paused' is not one of active, on-hold, cancelled, completed, "
    "entered-in-error, stopped, draft, unknown",
    "appointments.csv:4: starts_at '2025-03-12T10:00:00' has no UTC offset "
    "(write e.g. 2025-03-12T10:00:00Z or 2025-03-12T10:00:00-05:00)",
    "appointments.csv:5: unknown patient P999",
    "consents.csv:7: legal_basis 'verbal' is not one of express, written, hipaa_authorization, "
    "explicit",
    "consents.csv:8: occurred_at '2024-01-05T10:00:00' has no UTC offset "
    "(write e.g. 2024-01-05T10:00:00Z or 2024-01-05T10:00:00-05:00)",
    "consents.csv:9: purpose 'research' is not a known purpose (adherence, appointment, marketing)",
    "consents.csv:10: unknown patient P404",
]
EXPECTED_COUNTS = {  # file: (imported, rejected)
    "patients.csv": (5, 5),
    "slots.csv": (2, 1),
    "prescriptions.csv": (3, 3),
    "appointments.csv": (2, 2),
    "consents.csv": (5, 4),
}
GOOD_PATIENTS = ["P001", "P002", "P004", "P007", "P009"]
# What was written in the files for the imported patients: none may reach the database.
SECRETS = [
    "(212) 555-0142", "212.555.0142", "+12125550142", "12125550142", "2125550142",
    "+34 612 345 678", "+34612345678", "34612345678", "612345678",
    "907-201-4567", "+19072014567", "9072014567",
    "415-201-4567", "+14152014567", "4152014567",
    "+1 512 201 4567", "+15122014567", "5122014567",
    "+44 7400 123456", "+447400123456", "7400123456",
    "Zebulon", "Quackenbush", "Marisol", "Yzaguirre", "Ottoline", "Fairweather",
    "Cornelius", "Augustin", "Abernathy", "Ignatius", "Leocadia", "Haverbrook",
    "Rosalind", "Marchetti", "1980-04-02", "1975-11-30",
    "Atorvastatin", "Metformin", "Lisinopril", "Rosuvastatin",
]  # fmt: skip


def run_import(files: list[Path], session_factory: sessionmaker[Session], keyring: Keyring):
    return importer.import_files(
        files,
        session_factory=session_factory,
        keyring=keyring,
        progress=False,
        purposes=PURPOSES,
        declared_attributes={"plan"},
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A copy of tests/data/import, so rejections name short relative-looking paths."""
    target = tmp_path / "data"
    shutil.copytree(DATA, target)
    return target


def strip_dir(report: importer.ImportReport, directory: Path) -> list[str]:
    return [str(r).removeprefix(f"{directory}/") for r in report.rejections]


def row_counts(session_factory: sessionmaker[Session]) -> dict[str, int]:
    with session_factory() as session:
        return {
            table.name: session.scalar(select(func.count()).select_from(table)) or 0
            for table in m.Base.metadata.sorted_tables
        }


def test_csv_import_reports_exact_rejections_and_keeps_good_rows(
    data_dir: Path, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    report = run_import([data_dir / f for f in reversed(CSV_FILES)], session_factory, keyring)

    assert strip_dir(report, data_dir) == EXPECTED_REJECTIONS
    by_file = {Path(f.file).name: f for f in report.files}
    assert [Path(f.file).name for f in report.files] == [
        "patients.csv", "slots.csv", "prescriptions.csv", "appointments.csv", "consents.csv",
    ]  # fmt: skip
    for name, (imported, rejected) in EXPECTED_COUNTS.items():
        assert (by_file[name].imported, by_file[name].rejected) == (imported, rejected), name
    assert by_file["patients.csv"].warnings == [
        "column(s) nickname not declared in policies/data.yaml; ignored"
    ]
    counts = row_counts(session_factory)
    assert counts["patients"] == counts["patient_keys"] == 5
    assert (counts["prescriptions"], counts["appointments"], counts["slots"]) == (3, 2, 2)
    assert counts["consent_events"] == 5
    with session_factory() as session:
        ids = set(session.scalars(select(m.Patient.external_id)))
    assert ids == set(GOOD_PATIENTS)


def test_imported_values_round_trip(
    data_dir: Path, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    run_import([data_dir / f for f in CSV_FILES], session_factory, keyring)
    with session_factory() as session:
        p1 = queries.load_patient_record(session=session, keyring=keyring, external_id="P001")
        p2 = queries.load_patient(session=session, keyring=keyring, external_id="P002")
        p4 = queries.load_patient(session=session, keyring=keyring, external_id="P004")
        p7 = queries.load_patient(session=session, keyring=keyring, external_id="P007")
        data = {
            d.patient.external_id: d
            for d in queries.iter_patients(session=session, keyring=keyring)
        }
    assert p1 is not None and p2 and p4 and p7
    assert p1.phone == "+12125550142"
    assert (p1.patient.given_name, p1.patient.family_name) == ("Zebulon", "Quackenbush")
    assert p1.patient.timezone == "America/New_York"  # inferred: one zone for 212
    assert p1.patient.birth_date == date(1980, 4, 2) and p1.patient.allow_phi_sms
    assert p1.patient.attributes == {"plan": "gold"}
    assert p2.timezone is None and p2.candidate_timezones == ("Atlantic/Canary", "Europe/Madrid")
    assert p4.candidate_timezones == ("America/Adak", "America/Anchorage")
    assert p4.locale == "en-US" and p4.region == "AK"
    assert p7.given_name == "Cornelius\nAugustin" and p7.timezone == "America/Los_Angeles"
    assert [rx.medication for rx in data["P001"].prescriptions] == [
        "Atorvastatin 20mg", "Metformin 500mg",
    ]  # fmt: skip
    (appointment,) = data["P002"].appointments
    assert appointment.starts_at == datetime(2025, 3, 11, 8, 0, tzinfo=UTC)
    assert appointment.starts_at.tzinfo is UTC


def test_reimport_is_idempotent(
    data_dir: Path, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    files = [data_dir / f for f in CSV_FILES] + [data_dir / "bundle.json"]
    first = run_import(files, session_factory, keyring)
    before = row_counts(session_factory)

    again = run_import(files, session_factory, keyring)

    assert row_counts(session_factory) == before
    assert all(f.imported == 0 and f.updated == 0 for f in again.files)
    assert [str(r) for r in again.rejections] == [str(r) for r in first.rejections]
    assert sum(f.unchanged for f in again.files) == sum(f.imported for f in first.files)


def test_reimport_of_a_changed_row_updates_it(
    data_dir: Path, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    run_import([data_dir / "patients.csv"], session_factory, keyring)
    changed = data_dir / "changed.csv"
    source = (data_dir / "patients.csv").read_text()
    changed.write_text(
        source.replace("(212) 555-0142,,en,US,NY,1980", "(212) 555-0199,,en,US,NY,1980")
    )

    report = run_import([changed], session_factory, keyring)

    assert (report.files[0].updated, report.files[0].imported) == (1, 0)
    with session_factory() as session:
        phones = [
            queries.load_patient_record(session=session, keyring=keyring, external_id=e).phone
            for e in ("P001", "P009")
        ]
        moved = queries.patients_by_phone(session=session, keyring=keyring, e164="+12125550199")
    assert phones == ["+12125550199", "+12125550142"]
    assert [p.external_id for p in moved] == ["P001"]


def test_fhir_bundle_import(
    data_dir: Path, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    report = run_import([data_dir / "bundle.json"], session_factory, keyring)

    assert strip_dir(report, data_dir) == [
        "bundle.json:entry[1] (Patient/pat-2): invalid Patient: birthDate: "
        "Date value string does not match spec regex.",
        "bundle.json:entry[6] (Consent/c-2): Consent status 'draft' does not record a decision",
    ]
    (file_report,) = report.files
    assert (file_report.kind, file_report.imported, file_report.rejected) == ("fhir", 5, 2)
    assert file_report.warnings == ["1 Observation entries ignored"]
    with session_factory() as session:
        data = {
            d.patient.external_id: d
            for d in queries.iter_patients(session=session, keyring=keyring)
        }
        consents = consent_queries.current_consents_for(
            session=session, keyring=keyring, patient_external_id="F001", purposes=PURPOSES
        )
        record = queries.load_patient_record(session=session, keyring=keyring, external_id="F001")
    f001, pat3 = data["F001"].patient, data["pat-3"].patient
    assert record is not None and record.phone == "+15122014567"  # the mobile, not home
    assert (f001.given_name, f001.family_name, f001.locale) == ("Leocadia Jane", "Haverbrook", "es")
    assert (f001.timezone, f001.country, f001.region, f001.allow_phi_sms) == (
        "America/Chicago", "US", "TX", True,
    )  # fmt: skip
    assert (pat3.country, pat3.timezone) == ("GB", None)  # from the +44 number, and
    assert pat3.candidate_timezones == (  # UK mobiles span the Crown Dependencies' zones
        "Europe/Guernsey", "Europe/Isle_of_Man", "Europe/Jersey", "Europe/London",
    )  # fmt: skip
    (rx,) = data["F001"].prescriptions
    assert (rx.rx_id, rx.medication, rx.medication_class, rx.refill_due) == (
        "FRX1", "Rosuvastatin 10mg", "C10AA07", date(2025, 1, 31),
    )  # fmt: skip
    (appt,) = data["F001"].appointments
    assert (appt.kind, appt.provider, appt.location) == (
        "follow_up",
        "Dr. Nakamura",
        "Austin North",
    )
    assert appt.starts_at == datetime(2025, 3, 15, 16, 0, tzinfo=UTC)
    assert consents["adherence"].active and consents["adherence"].legal_basis == "written"
    assert not consents["marketing"].active


def test_unknown_header_and_missing_columns_are_file_errors(
    data_dir: Path, session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    report = run_import(
        [data_dir / "unknown_header.csv", data_dir / "missing_columns.csv"],
        session_factory,
        keyring,
    )
    errors = {Path(f.file).name: f.error for f in report.files}
    assert errors["missing_columns.csv"] == (
        "prescriptions file is missing column(s): medication_class, refill_due"
    )
    assert errors["unknown_header.csv"].startswith(
        "unrecognised header (external_id,first,last,mobile); expected one of: patients.csv: "
    )
    assert not report.ok and row_counts(session_factory)["patients"] == 0


def test_a_row_the_database_refuses_is_rejected_alone(
    data_dir: Path,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = queries.upsert_slots

    def refuse_s2(*, session: Session, slots: list[queries.SlotRecord]) -> list[queries.Change]:
        if any(s.slot_id == "S2" for s in slots):  # a real constraint violation in the batch
            session.add(m.Slot(slot_id="S2", kind="x", starts_at=datetime.now(UTC)))
            session.add(m.Slot(slot_id="S2", kind="x", starts_at=datetime.now(UTC)))
            session.flush()
        return real(session=session, slots=slots)

    monkeypatch.setattr(queries, "upsert_slots", refuse_s2)
    report = run_import([data_dir / "slots.csv"], session_factory, keyring)

    reasons = strip_dir(report, data_dir)
    assert reasons[0].startswith("slots.csv:3: the database refused the row: ")
    assert reasons[1:] == [
        "slots.csv:4: duration_min '0' is not a positive whole number of minutes"
    ]
    with session_factory() as session:
        assert list(session.scalars(select(m.Slot.slot_id))) == ["S1"]


CONTROLS = ["P001", "F001", "Dr. Osei", "America/New_York"]  # stored in clear, so must be seen


def _as_bytes(value: object) -> bytes:
    """A column value as the bytes to search: raw for bytea, text for everything else."""
    if isinstance(value, bytes | memoryview):
        return bytes(value)
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False).encode()
    return str(value).encode()


def _secrets_in(blob: bytes, found: set[str]) -> None:
    for secret in SECRETS + CONTROLS:
        if secret.encode() in blob:
            found.add(secret)


def test_nothing_identifying_is_stored_in_clear(
    data_dir: Path,
    session_factory: sessionmaker[Session],
    keyring: Keyring,
    engine: Engine,
    db_url: str,
) -> None:
    report = run_import(
        [data_dir / f for f in CSV_FILES] + [data_dir / "bundle.json"], session_factory, keyring
    )
    assert sum(f.imported for f in report.files) == 22
    found: set[str] = set()
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        engine.dispose()
        database = Path(db_url.removeprefix("sqlite:///"))
        for path in (database, Path(f"{database}-wal"), Path(f"{database}-journal")):
            if path.exists():
                _secrets_in(path.read_bytes(), found)
    else:
        with engine.connect() as connection:
            for table in m.Base.metadata.sorted_tables:
                for row in connection.execute(text(f'SELECT * FROM "{table.name}"')):
                    for value in row:
                        _secrets_in(_as_bytes(value), found)
    assert found == set(CONTROLS)
    assert re.fullmatch(r"v1:[0-9a-f]{64}", keyring.phone_index("+12125550142"))
