"""Key rotation end to end: `engage keys rotate`, `rotate-index`, `status`, and refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.crypto import (
    DecryptionError,
    Keyring,
    generate_key,
    key_id,
    load_keys,
    read_key_file,
    write_key_file,
)
from engine.settings import Settings
from engine.store import consent_queries, queries
from engine.store import models as m
from engine.store.db import make_engine, make_session_factory
from tests.integration.conftest import Engage

SAMPLE = Path(__file__).resolve().parents[2] / "tests" / "data" / "sample"
ADA = "+12125550101"  # S001 in the sample
STRANGER = "+12125550199"  # said STOP, belongs to no patient (e.g. erased)


@pytest.fixture
def loaded(engage: Engage) -> Engage:
    engage("import", str(SAMPLE / "patients.csv"), str(SAMPLE / "consents.csv"))
    return engage


def with_env(engage: Engage, **env: str) -> Engage:
    return Engage({**engage.env, **env})


def settings_of(engage: Engage) -> Settings:
    return Settings.from_env(engage.env)


def wrapped_keys(settings: Settings) -> dict[int, tuple[bytes, str]]:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.execute(
                select(m.PatientKey.id, m.PatientKey.wrapped_key, m.PatientKey.master_key_id)
            )
            return {row_id: (bytes(w), kid) for row_id, w, kid in rows}
    finally:
        engine.dispose()


def read_phones(settings: Settings, keyring: Keyring) -> dict[str, str | None]:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            ids = session.scalars(select(m.Patient.external_id).order_by(m.Patient.id)).all()
            return {
                ext: queries.load_patient_record(
                    session=session, keyring=keyring, external_id=ext
                ).phone  # type: ignore[union-attr]
                for ext in ids
            }
    finally:
        engine.dispose()


def test_master_rotation_keeps_data_readable_and_retires_the_old_key(
    loaded: Engage, tmp_path: Path
) -> None:
    settings = settings_of(loaded)
    old_key = read_key_file(settings.master_key_file)
    before = read_phones(settings, load_keys(settings))
    assert before["S001"] == ADA
    new_file = tmp_path / "keys" / "master-2.key"

    out = loaded("keys", "rotate", "--new-master-key-file", str(new_file), "--batch-size", "3")
    assert new_file.stat().st_mode & 0o777 == 0o600
    new_id = key_id(read_key_file(new_file))
    assert f"re-wrapped {len(before)} data key(s) with master key {new_id}" in out.stdout
    assert {kid for _, kid in wrapped_keys(settings).values()} == {new_id}

    # Step 2: the new key is current, the old one only unwraps; running again re-wraps
    # what processes still on the old key created meanwhile (here: nothing).
    switched = with_env(
        loaded,
        ENGAGE_MASTER_KEY_FILE=str(new_file),
        ENGAGE_PREVIOUS_MASTER_KEY_FILES=str(settings.master_key_file),
    )
    again = switched("keys", "rotate", "--new-master-key-file", str(new_file))
    assert "re-wrapped 0 data key(s)" in again.stdout
    status = json.loads(switched("keys", "status").stdout)
    assert status["retirable"] == [key_id(old_key)]
    assert status["data_keys"] == {new_id: {"count": len(before), "key": "current"}}

    # Step 3: the old key is gone from the configuration; everything still reads.
    retired = Settings.from_env({**loaded.env, "ENGAGE_MASTER_KEY_FILE": str(new_file)})
    assert read_phones(retired, load_keys(retired)) == before
    only_old = Keyring(master_key=old_key, index_key=generate_key())
    wrapped, kid = next(iter(wrapped_keys(settings).values()))
    with pytest.raises(DecryptionError):
        only_old.unwrap(wrapped, patient_id="S001", master_key_id=kid)
    with pytest.raises(DecryptionError):
        only_old.unwrap(wrapped, patient_id="S001")

    entries = audit_entries(settings, "keys_rotated")
    assert [e["kind"] for e in entries] == ["master", "master"]
    assert entries[0]["rewrapped"] == len(before) and entries[0]["to"] == new_id
    assert old_key.hex() not in json.dumps(entries)


def test_rotation_with_a_wrong_or_missing_old_key_changes_nothing(
    loaded: Engage, tmp_path: Path
) -> None:
    settings = settings_of(loaded)
    before = wrapped_keys(settings)
    wrong = tmp_path / "wrong.key"
    write_key_file(wrong, generate_key())
    new_file = tmp_path / "new.key"

    result = with_env(loaded, ENGAGE_MASTER_KEY_FILE=str(wrong))(
        "keys", "rotate", "--new-master-key-file", str(new_file), code=2
    )
    assert "not loaded" in result.stderr and "nothing was changed" in result.stderr
    assert key_id(read_key_file(settings.master_key_file)) in result.stderr
    assert not new_file.exists()
    assert wrapped_keys(settings) == before
    assert audit_entries(settings, "keys_rotated") == []


def test_a_loose_key_file_is_refused_at_start(loaded: Engage) -> None:
    settings = settings_of(loaded)
    os.chmod(settings.master_key_file, 0o644)
    for command in (("worker",), ("serve",), ("keys", "rotate")):
        result = loaded(*command, code=2)
        assert "chmod 600" in result.stderr, command
    os.chmod(settings.master_key_file, 0o600)
    extra = settings.var_dir / "previous.key"
    write_key_file(extra, generate_key())
    os.chmod(extra, 0o640)
    result = with_env(loaded, ENGAGE_PREVIOUS_MASTER_KEY_FILES=str(extra))("worker", code=2)
    assert "chmod 600" in result.stderr


def test_index_rotation_keeps_stop_lookups_working(loaded: Engage) -> None:
    settings = settings_of(loaded)
    v1 = load_keys(settings)
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions.begin() as session:
            for number in (ADA, STRANGER):
                consent_queries.add_suppression(
                    session=session, keyring=v1, e164=number, reason="keyword"
                )
            ada = queries.patient_by_external_id(session=session, external_id="S001")
            assert ada is not None
            ada_id, updated = ada.id, ada.updated_at

        out = loaded("keys", "rotate-index", "--batch-size", "2")
        assert "phone indexes now v2" in out.stdout
        assert settings.index_key_file.stat().st_mode & 0o777 == 0o600
        assert len(settings.index_key_file.read_text().split()) == 2
        v2 = load_keys(settings)
        assert v2.index_version == 2 and v2.phone_index(ADA).startswith("v2:")

        with sessions() as session:
            for number in (ADA, STRANGER):
                assert consent_queries.is_suppressed(session=session, keyring=v2, e164=number)
            found = queries.patients_by_phone(session=session, keyring=v2, e164=ADA)
            assert [p.external_id for p in found] == ["S001"]
            assert consent_queries.suppressed_patients(session=session, patient_ids=[ada_id]) == {
                ada_id
            }
            assert session.get(m.Patient, ada_id).updated_at == updated  # type: ignore[union-attr]
            stored = set(session.scalars(select(m.Patient.phone_index))) | set(
                session.scalars(select(m.Suppression.phone_index))
            )
            assert stored and all(i is None or i.startswith("v2:") for i in stored)
            assert v1.phone_index(STRANGER) not in stored

        # A process still on the one-key chain adds a v1 suppression for the same number:
        # --resume upgrades it and merges it with the v2 entry already there.
        with sessions.begin() as session:
            consent_queries.suppress_phone_index(
                session=session, phone_index=v1.phone_index(ADA), reason="keyword"
            )
        resumed = loaded("keys", "rotate-index", "--resume")
        assert "1 duplicate suppression(s) merged" in resumed.stdout
        with sessions() as session:
            assert session.scalar(select(func.count()).select_from(m.Suppression)) == 2
            assert consent_queries.is_suppressed(session=session, keyring=v2, e164=ADA)
    finally:
        engine.dispose()
    kinds = [e["kind"] for e in audit_entries(settings, "keys_rotated")]
    assert kinds == ["index", "index"]


def test_index_rotation_refuses_a_chain_missing_its_newest_key(
    loaded: Engage, tmp_path: Path
) -> None:
    settings = settings_of(loaded)
    first = tmp_path / "index-v1.key"
    write_key_file(first, read_key_file(settings.index_key_file))
    loaded("keys", "rotate-index")
    result = with_env(loaded, ENGAGE_INDEX_KEY_FILE=str(first))("keys", "rotate-index", code=2)
    assert "load the whole chain" in result.stderr
    assert first.read_text().count("\n") == 1  # no key appended to the short chain


def audit_entries(settings: Settings, action: str) -> list[dict]:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            stmt = select(m.AuditEntry.details).where(m.AuditEntry.action == action)
            return list(session.scalars(stmt.order_by(m.AuditEntry.id)))
    finally:
        engine.dispose()
