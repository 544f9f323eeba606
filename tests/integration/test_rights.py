"""Data subjects' rights on SQLite and PostgreSQL: erasure (crypto-shredding, what is kept,
what can never be read back), the access export, the requests register, and the same
through the CLI, the API and the admin pages."""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import func, select

from engine import audit
from engine.cli import main
from engine.crypto import NONCE_BYTES, Keyring, load_keys
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import admin_queries, codec, queries
from engine.store import models as m
from engine.store.outbox_queries import body_field
from engine.web import create_app
from tests.integration.admin_fixtures import create_staff, sign_in
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

NOW = datetime.fromisoformat(AT)


@dataclass
class World:
    engage: Engage
    settings: Settings
    runtime: Runtime

    @property
    def keyring(self) -> Keyring:
        return load_keys(self.settings)

    def scalar(self, statement: Any) -> Any:
        with self.runtime.session_factory() as session:
            return session.scalar(statement)

    def patient(self, external_id: str) -> m.Patient:
        with self.runtime.session_factory() as session:
            row = queries.patient_by_external_id(session=session, external_id=external_id)
            assert row is not None
            session.expunge(row)
            return row

    def audit(self, action: str) -> list[m.AuditEntry]:
        with self.runtime.session_factory() as session:
            assert audit.verify(session=session).ok
            stmt = select(m.AuditEntry).where(m.AuditEntry.action == action)
            return list(session.scalars(stmt.order_by(m.AuditEntry.id)))

    def requests(self) -> list[tuple[str, str, str]]:
        with self.runtime.session_factory() as session:
            rows = session.scalars(select(m.RightsRequest).order_by(m.RightsRequest.id))
            return [(r.kind, r.patient_external_id, r.status) for r in rows]


@pytest.fixture
def world(engage: Engage, settings: Settings) -> World:
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")))
    engage("approve", "statin-refill", "--by", "carol")
    engage("approve", "appointment-reminder", "--by", "carol")
    engage(
        "consent", "grant", "--patient", "S001", "--purpose", "marketing",
        "--legal-basis", "written", "--method", "web_form", "--evidence",
        "signed form #4411 by Ada Lovelace", "--by", "carol",
    )  # fmt: skip
    engage("plan", "--at", AT)
    w = World(engage, settings, Runtime(settings))
    _add_inbound(w, "S001", "SMin0001", "Ada here, is my statin ready?")
    return w


def _add_inbound(w: World, external_id: str, sid: str, text: str) -> None:
    with w.runtime.session_factory.begin() as session:
        row = queries.patient_by_external_id(session=session, external_id=external_id)
        assert row is not None and row.phone_index
        cipher = queries.cipher_for(session=session, keyring=w.keyring, patient=row)
        session.add(
            m.InboundMessage(
                provider_sid=sid,
                from_index=row.phone_index,
                patient_id=row.id,
                body_enc=cipher.encrypt_field(f"inbound/{sid}/body", text),
                classification="other",
                received_at=NOW,
                handled_at=NOW,
            )
        )


def _ciphertexts(w: World, external_id: str) -> list[tuple[str, bytes, bytes]]:
    """Every sealed value of the patient: (what, ciphertext, associated data)."""
    found: list[tuple[str, bytes, bytes]] = []
    with w.runtime.session_factory() as session:
        p = queries.patient_by_external_id(session=session, external_id=external_id)
        assert p is not None
        cipher = queries.cipher_for(session=session, keyring=w.keyring, patient=p)
        for name in ("given_name", "family_name", "phone", "birth_date", "attributes"):
            blob = getattr(p, f"{name}_enc")
            if blob is not None:
                found.append((name, bytes(blob), cipher.aad(name)))
        for rx in session.scalars(select(m.Prescription).where(m.Prescription.patient_id == p.id)):
            aad = cipher.aad(codec.medication_field(rx.rx_id))
            found.append(("medication", bytes(rx.medication_enc), aad))
        for ev in session.scalars(select(m.ConsentEvent).where(m.ConsentEvent.patient_id == p.id)):
            if ev.evidence_enc is not None:
                found.append(("evidence", bytes(ev.evidence_enc), cipher.aad(codec.EVIDENCE_FIELD)))
        for o in session.scalars(select(m.Outbox).where(m.Outbox.patient_id == p.id)):
            if o.body_enc is not None:
                aad = cipher.aad(body_field(o.idempotency_key))
                found.append(("body", bytes(o.body_enc), aad))
        inbound = select(m.InboundMessage).where(m.InboundMessage.patient_id == p.id)
        for i in session.scalars(inbound):
            aad = cipher.aad(f"inbound/{i.provider_sid}/body")
            found.append(("inbound", bytes(i.body_enc), aad))
        for what, blob, aad in found:  # they do open with the patient's key, before erasure
            assert cipher.decrypt_field(aad.decode().split("|", 1)[1], blob) is not None, what
    return found


def _remaining_keys(w: World) -> list[bytes]:
    """The master key, the index key and every data key still in the database."""
    keyring = w.keyring
    keys = [keyring.master_key, keyring.index_key]
    with w.runtime.session_factory() as session:
        rows = session.execute(
            select(m.Patient.external_id, m.PatientKey.wrapped_key, m.PatientKey.master_key_id)
            .join(m.PatientKey, m.PatientKey.patient_id == m.Patient.id)
            .where(m.PatientKey.wrapped_key.is_not(None))
        )
        keys += [keyring.unwrap(wk, patient_id=pid, master_key_id=kid) for pid, wk, kid in rows]
    return keys


def _opens(key: bytes, blob: bytes, aad: bytes) -> bool:
    for associated in (aad, None, b""):
        try:
            AESGCM(key).decrypt(blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :], associated)
        except InvalidTag:
            continue
        return True
    return False


# --- erasure -------------------------------------------------------------------------------


def test_erasure_shreds_the_key_so_no_remaining_key_opens_any_old_ciphertext(world: World) -> None:
    before = _ciphertexts(world, "S001")
    assert {what for what, _, _ in before} >= {
        "given_name", "family_name", "phone", "birth_date", "medication", "evidence", "body",
        "inbound",
    }  # fmt: skip
    old_wrapped = world.scalar(
        select(m.PatientKey.wrapped_key).where(m.PatientKey.patient_id == world.patient("S001").id)
    )
    out = world.engage("erase", "S001", "--by", "ian", "--yes").output
    assert "erased patient S001" in out

    keys = _remaining_keys(world)
    assert len(keys) >= 8  # master, index and the other patients' data keys
    opened = [
        (what, i) for what, blob, aad in before for i, k in enumerate(keys) if _opens(k, blob, aad)
    ]
    assert opened == []
    row = world.patient("S001")
    assert row.erased_at is not None
    key = world.scalar(select(m.PatientKey).where(m.PatientKey.patient_id == row.id))
    assert key.wrapped_key is None and key.destroyed_at is not None
    wrapped = world.scalar(
        select(func.count()).where(m.PatientKey.wrapped_key == bytes(old_wrapped))
    )
    assert wrapped == 0  # no copy of the wrapped key is left to unwrap with the master key


def test_erasure_deletes_what_identifies_keeps_what_the_law_requires_and_the_opt_out(
    world: World,
) -> None:
    pid = world.patient("S001").id
    outbox = select(m.Outbox).where(m.Outbox.patient_id == pid)
    with world.runtime.session_factory() as session:
        waiting = [o.id for o in session.scalars(outbox) if o.status in ("queued", "deferred")]
        events = session.scalar(select(func.count()).where(m.ConsentEvent.patient_id == pid))
    assert waiting and events
    world.engage("erase", "S001", "--by", "ian", "--yes")

    row = world.patient("S001")
    assert (row.given_name_enc, row.family_name_enc, row.phone_enc) == (None, None, None)
    assert (row.birth_date_enc, row.attributes_enc, row.phone_index) == (None, None, None)
    assert row.timezone is None and row.region is None
    with world.runtime.session_factory() as session:
        for model in (m.Prescription, m.Appointment, m.SchedulingLink, m.InboundMessage):
            assert session.scalar(select(func.count()).where(model.patient_id == pid)) == 0
        rows = list(session.scalars(outbox))
        assert rows and all(o.body_enc is None for o in rows)  # decisions stay, texts go
        cancelled = [o for o in rows if o.id in waiting]
        assert all(o.status == "cancelled" and o.reasons[-1]["rule"] == "erased" for o in cancelled)
        # The append-only ledger stays; its evidence is ciphertext nobody can open any more.
        ledger = admin_queries.consent_ledger(
            session=session, keyring=world.keyring, patient_id=pid
        )
        assert len(ledger) == events and all(e.event.evidence is None for e in ledger)
        stored = session.scalars(
            select(m.ConsentEvent.evidence_enc).where(m.ConsentEvent.patient_id == pid)
        )
        assert any(blob is not None for blob in stored)
        with pytest.raises(codec.PatientErased):
            queries.cipher_for(session=session, keyring=world.keyring, patient=row)
    [entry] = world.audit("patient_erased")
    assert (entry.actor, entry.subject) == ("cli:ian", "patient:S001")
    text = json.dumps(entry.details)
    assert "Ada" not in text and "Lovelace" not in text and "555" not in text
    assert "patient names" in entry.details["erased"]
    assert world.requests() == [("erasure", "S001", "done")]
    # A number that opted out stays suppressed, by its blind index only.
    keyring = world.keyring
    s005 = world.patient("S005")  # revoked by keyword (sms_keyword), never re-granted
    s006 = world.patient("S006")  # revoked by keyword, then granted again on a web form
    index5, index6 = s005.phone_index, s006.phone_index
    count = select(func.count()).select_from(m.Suppression)
    assert world.scalar(count) == 0
    world.engage("erase", "S005", "--by", "ian", "--yes")
    world.engage("erase", "S006", "--by", "ian", "--yes")
    suppressed = {
        r for (r,) in world.runtime.session_factory().execute(select(m.Suppression.phone_index))
    }
    assert suppressed == {index5} and index6 not in suppressed
    assert index5 == keyring.phone_index("+12125550105")  # by blind index, never in clear
    assert world.patient("S005").phone_index is None


def test_erasure_asks_first_and_refuses_unknown_or_erased_patients_changing_nothing(
    world: World,
) -> None:
    result = world.engage.runner.invoke(
        main, ["erase", "S001", "--by", "ian"], env=world.engage.env, input="n\n"
    )
    assert result.exit_code == 1 and "Aborted" in result.output
    assert world.patient("S001").erased_at is None and world.audit("patient_erased") == []
    entries = select(func.count()).select_from(m.AuditEntry)
    before = world.scalar(entries)
    assert (
        "unknown patient NOPE"
        in world.engage("erase", "NOPE", "--by", "ian", "--yes", code=2).output
    )
    assert world.scalar(entries) == before and world.requests() == []
    world.engage("erase", "S002", "--by", "ian", "--yes")
    after = world.scalar(entries)
    out = world.engage("erase", "S002", "--by", "ian", "--yes", code=2).output
    assert "has been erased" in out and "nothing was changed" in out
    assert world.scalar(entries) == after and world.requests() == [("erasure", "S002", "done")]
    assert "has been erased" in world.engage("export-patient", "S002", code=2).output


# --- access export -------------------------------------------------------------------------


def test_export_gives_everything_held_in_one_private_json_file(
    world: World, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "s001.json"
    target.parent.mkdir()
    world.engage("export-patient", "S001", "--output", str(target), "--by", "dpo")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    doc = json.loads(target.read_text())
    profile = doc["profile"]
    assert (profile["given_name"], profile["family_name"]) == ("Ada", "Lovelace")
    assert profile["phone"] == "+12125550101" and profile["birth_date"] == "1961-05-04"
    assert any(rx["medication"] for rx in doc["prescriptions"])
    evidence = [e["evidence"] for e in doc["consent_events"]]
    assert "signed form #4411 by Ada Lovelace" in evidence
    assert doc["messages"] and all(
        {"outcome", "status", "reasons", "due_at", "body"} <= set(msg) for msg in doc["messages"]
    )
    assert any(msg["body"] and "Ada" in msg["body"] for msg in doc["messages"])
    assert [i["body"] for i in doc["inbound_messages"]] == ["Ada here, is my statin ready?"]
    assert isinstance(doc["scheduling_links"], list) and isinstance(doc["bookings"], list)
    [entry] = world.audit("patient_exported")
    assert (entry.actor, entry.subject) == ("cli:dpo", "patient:S001")
    assert "Ada" not in json.dumps(entry.details)
    assert world.requests() == [("access", "S001", "done")]
    again = world.engage("export-patient", "S001", "--output", str(target), code=2).output
    assert "exists" in again  # never overwritten
    assert "unknown patient" in world.engage("export-patient", "NOPE", code=2).output
    assert len(world.audit("patient_exported")) == 1


# --- the register --------------------------------------------------------------------------


def test_requests_are_due_a_month_after_receipt_and_closed_by_the_answer(world: World) -> None:
    out = world.engage(
        "requests", "add", "access", "S002", "--by", "dpo", "--received", "2026-01-31T10:00:00Z"
    ).output
    assert "due 2026-02-28" in out  # the 31st becomes the month's end (GDPR Art. 12(3))
    world.engage("requests", "add", "erasure", "S003", "--by", "dpo")
    listed = world.engage("requests", "list").output
    assert "OVERDUE" in listed.splitlines()[0] and "S002" in listed.splitlines()[0]
    world.engage("export-patient", "S002", "--by", "dpo")
    items = json.loads(world.engage("requests", "list", "--json").output)
    assert [(i["patient"], i["kind"], i["status"]) for i in items] == [
        ("S003", "erasure", "open"),
        ("S002", "access", "done"),
    ]  # the export closed the registered request instead of adding one
    assert items[1]["handled_by"] == "cli:dpo"
    assert (
        "unknown patient"
        in world.engage("requests", "add", "access", "NOPE", "--by", "dpo", code=2).output
    )
    assert len(world.audit("rights_request_added")) == 2
    erasure = items[0]["id"]
    assert (
        "say why"
        in world.engage(
            "requests", "refuse", str(erasure), "--by", "dpo", "--reason", " ", code=2
        ).output
    )
    world.engage(
        "requests", "refuse", str(erasure), "--by", "dpo", "--reason", "identity not verified"
    )
    refused = json.loads(world.engage("requests", "list", "--json").output)
    assert [i["status"] for i in refused if i["id"] == erasure] == ["refused"]
    assert (
        "already refused"
        in world.engage(
            "requests", "refuse", str(erasure), "--by", "dpo", "--reason", "again", code=2
        ).output
    )
    assert len(world.audit("rights_request_refused")) == 1


# --- API and admin -------------------------------------------------------------------------


@pytest.fixture
def tokens(world: World) -> dict[str, str]:
    return {
        role: world.engage("tokens", "create", role, "--role", role).output.strip()
        for role in ("it_admin", "compliance", "marketer")
    }


def _call(world: World, method: str, path: str, token: str, **kwargs: Any) -> Any:
    app = create_app(world.settings, clock=lambda: NOW)
    headers = {"Authorization": f"Bearer {token}"}
    return app.test_client().open(path, method=method, headers=headers, **kwargs)


def test_api_export_and_erase_follow_the_role_matrix(world: World, tokens: dict[str, str]) -> None:
    url = "/api/v1/patients/S001"
    assert _call(world, "GET", f"{url}/export", tokens["marketer"]).status_code == 403
    exported = _call(world, "GET", f"{url}/export", tokens["compliance"])
    assert exported.status_code == 200 and exported.headers["Cache-Control"] == "no-store"
    assert exported.get_json()["profile"]["given_name"] == "Ada"
    erase = {"json": {"confirm": "S001"}}
    assert _call(world, "POST", f"{url}/erase", tokens["compliance"], **erase).status_code == 403
    wrong = _call(world, "POST", f"{url}/erase", tokens["it_admin"], json={"confirm": "S002"})
    assert wrong.status_code == 400 and wrong.get_json()["error"]["field"] == "confirm"
    missing = _call(world, "POST", "/api/v1/patients/NOPE/erase", tokens["it_admin"], **erase)
    assert missing.status_code == 404
    assert world.patient("S001").erased_at is None
    done = _call(world, "POST", f"{url}/erase", tokens["it_admin"], **erase)
    assert done.status_code == 200, done.get_json()
    assert done.get_json()["patient"] == "S001" and done.get_json()["counts"]["cancelled"] >= 1
    again = _call(world, "POST", f"{url}/erase", tokens["it_admin"], **erase)
    assert again.status_code == 409
    assert _call(world, "GET", f"{url}/export", tokens["it_admin"]).status_code == 409
    [entry] = world.audit("patient_erased")
    assert entry.actor == "token:it_admin"
    assert world.requests() == [("access", "S001", "done"), ("erasure", "S001", "done")]


def test_admin_erase_needs_it_and_the_typed_id_and_the_register_shows_due_dates(
    world: World,
) -> None:
    create_staff(world.settings, NOW)
    app = create_app(world.settings.with_(login_rate_per_minute=1000), clock=lambda: NOW)
    it, compliance = sign_in(app, "it-admin-1"), sign_in(app, "compliance-1")
    page = it.get("/admin/patients/S001").get_data(as_text=True)
    assert "Erase this patient" in page and "Export (JSON)" in page
    page = compliance.get("/admin/patients/S001").get_data(as_text=True)
    assert "Erase this patient" not in page and "Export (JSON)" in page
    assert compliance.get("/admin/patients/S001/erase").status_code == 403
    download = compliance.post("/admin/patients/S001/export")
    assert download.status_code == 200 and "attachment" in download.headers["Content-Disposition"]
    assert json.loads(download.get_data())["profile"]["family_name"] == "Lovelace"

    assert it.get("/admin/patients/S001/erase").status_code == 200
    assert it.post("/admin/patients/S001/erase", {"confirm": "S00"}).status_code == 400
    assert world.patient("S001").erased_at is None
    done = it.post("/admin/patients/S001/erase", {"confirm": "S001"})
    assert done.status_code == 302
    page = it.get("/admin/patients/S001").get_data(as_text=True)
    assert "Erased on" in page and "Erase this patient" not in page
    assert world.audit("patient_erased")[0].actor == "user:it-admin-1"

    world.engage(
        "requests", "add", "access", "S003", "--by", "dpo", "--received", "2026-10-01T09:00:00Z"
    )
    register = it.get("/admin/requests").get_data(as_text=True)
    assert 'class="overdue"' in register and "2026-11-01" in register  # due, and past NOW
    assert register.count("<tr") == 4  # header, the export, the erasure, the registered one
    assert sign_in(app, "marketer-1").get("/admin/requests").status_code == 403
