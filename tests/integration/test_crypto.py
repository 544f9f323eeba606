"""Ciphertexts are bound to their patient and column: moving one in the database fails."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from engine.core.domain import Patient
from engine.crypto import DecryptionError, Keyring, generate_key
from engine.store import models as m
from engine.store import queries
from engine.store.queries import PatientRecord


def seed(session_factory: sessionmaker[Session], keyring: Keyring) -> None:
    with session_factory() as session:
        queries.upsert_patients(
            session=session,
            keyring=keyring,
            records=[
                PatientRecord(
                    Patient("P1", given_name="Zebulon", family_name="Quackenbush"), "+12125550142"
                ),
                PatientRecord(
                    Patient("P2", given_name="Marisol", family_name="Yzaguirre"), "+13055550100"
                ),
            ],
        )
        session.commit()


def rows(session: Session) -> dict[str, m.Patient]:
    return {p.external_id: p for p in session.scalars(select(m.Patient))}


def test_a_phone_copied_to_another_patient_does_not_decrypt(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    seed(session_factory, keyring)
    with session_factory() as session:
        patients = rows(session)
        patients["P2"].phone_enc = patients["P1"].phone_enc
        session.commit()
    with session_factory() as session:
        assert queries.load_patient(session=session, keyring=keyring, external_id="P1")
        with pytest.raises(DecryptionError):
            queries.load_patient(session=session, keyring=keyring, external_id="P2")


def test_a_value_moved_to_another_column_does_not_decrypt(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    seed(session_factory, keyring)
    with session_factory() as session:
        p1 = rows(session)["P1"]
        p1.given_name_enc, p1.family_name_enc = p1.family_name_enc, p1.given_name_enc
        session.commit()
    with session_factory() as session, pytest.raises(DecryptionError):
        queries.load_patient(session=session, keyring=keyring, external_id="P1")


def test_a_wrapped_key_moved_to_another_patient_does_not_unwrap(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    seed(session_factory, keyring)
    with session_factory() as session:
        keys = {k.patient_id: k for k in session.scalars(select(m.PatientKey))}
        ids = queries.patient_ids_for(session=session, external_ids=["P1", "P2"])
        keys[ids["P2"]].wrapped_key = keys[ids["P1"]].wrapped_key
        session.commit()
    with session_factory() as session, pytest.raises(DecryptionError, match="P2"):
        queries.load_patient(session=session, keyring=keyring, external_id="P2")


def test_another_master_key_cannot_read_the_store(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    seed(session_factory, keyring)
    stranger = Keyring(master_key=generate_key(), index_key=keyring.index_key)
    with session_factory() as session, pytest.raises(DecryptionError):
        queries.load_patient(session=session, keyring=stranger, external_id="P1")


def test_stored_columns_hold_ciphertext_only(
    session_factory: sessionmaker[Session], keyring: Keyring
) -> None:
    seed(session_factory, keyring)
    with session_factory() as session:
        p1 = rows(session)["P1"]
        sealed = [p1.given_name_enc, p1.family_name_enc, p1.phone_enc]
    assert all(blob is not None and blob[:1] == b"\x01" for blob in sealed)
    assert not any(b"Zebulon" in blob or b"2125550142" in blob for blob in sealed if blob)
    assert p1.phone_index == keyring.phone_index("+12125550142")
