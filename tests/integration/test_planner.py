"""The planner tick on SQLite and PostgreSQL: one outbox row per occurrence, ever."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from engine import outbox_status as st
from engine import planner as planner_module
from engine import planner_parallel
from engine.core.domain import Appointment, ConsentEvent, Patient, Prescription
from engine.crypto import Keyring, token_hash
from engine.definitions import DefinitionSet, load_definitions
from engine.dryrun import Candidate, DryRunSummary, dry_run
from engine.importer import import_files
from engine.planner import plan
from engine.planner_report import PlanReport
from engine.store import consent_queries, outbox_queries, queries
from engine.store import models as m
from engine.store.db import make_engine, make_session_factory
from engine.store.defqueries import approved_versions, record_review, sync_definitions
from engine.variables import PREVIEW_LINK_TOKEN

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "sample"
AT = datetime(2026, 12, 7, 16, 0, tzinfo=UTC)
PUBLIC_URL = "https://rh.example"
LINK = re.compile(re.escape(PUBLIC_URL) + r"/s/([A-Za-z0-9_-]+)")


# --- set-up --------------------------------------------------------------------------------


@pytest.fixture
def defs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "defs"
    for folder in ("campaigns", "templates", "policies"):
        shutil.copytree(ROOT / folder, root / folder)
    return root


def load(
    session_factory: sessionmaker[Session], root: Path, approve: Iterable[str] = ("statin-refill",)
) -> DefinitionSet:
    """Sync the folder as the active set and approve the named templates' variants."""
    defs = load_definitions(root)
    wanted = set(approve)
    with session_factory.begin() as session:
        sync_definitions(session=session, defs=defs, now=AT)
        for (tid, locale), t in sorted(defs.templates.items()):
            if tid in wanted:
                record_review(
                    session=session,
                    template_id=tid,
                    locale=locale,
                    version=t.version,
                    decision="approve",
                    by="carol",
                    now=AT,
                )
    return defs


def import_sample(session_factory: sessionmaker[Session], keyring: Keyring) -> None:
    report = import_files(
        sorted(SAMPLE.glob("*.csv")),
        session_factory=session_factory,
        keyring=keyring,
        progress=False,
    )
    assert report.ok


@dataclass
class Planner:
    session_factory: sessionmaker[Session]
    keyring: Keyring

    def __call__(self, defs: DefinitionSet, now: datetime = AT, **kwargs: object) -> PlanReport:
        return plan(
            defs,
            session_factory=self.session_factory,
            keyring=self.keyring,
            now=now,
            public_url=PUBLIC_URL,
            **kwargs,  # type: ignore[arg-type]
        )

    def rows(self, campaign_id: str | None = None) -> dict[str, list[m.Outbox]]:
        """Outbox rows by patient external id, in anchor order."""
        stmt = select(m.Outbox, m.Patient.external_id).join(
            m.Patient, m.Patient.id == m.Outbox.patient_id
        )
        if campaign_id:
            stmt = stmt.where(m.Outbox.campaign_id == campaign_id)
        found: dict[str, list[m.Outbox]] = {}
        with self.session_factory() as session:
            for row, external_id in session.execute(stmt.order_by(m.Outbox.anchor)):
                found.setdefault(external_id, []).append(row)
        return found

    def count(self, model: type[m.Base] = m.Outbox) -> int:
        with self.session_factory() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0

    def body(self, row: m.Outbox) -> str | None:
        with self.session_factory() as session:
            cipher = queries.ciphers_for(
                session=session, keyring=self.keyring, patient_ids=[row.patient_id]
            )[row.patient_id]
        return cipher.decrypt_field(outbox_queries.body_field(row.idempotency_key), row.body_enc)


@pytest.fixture
def planner(session_factory: sessionmaker[Session], keyring: Keyring) -> Planner:
    return Planner(session_factory, keyring)


@pytest.fixture
def sample(planner: Planner, defs_dir: Path) -> DefinitionSet:
    defs = load(planner.session_factory, defs_dir)
    import_sample(planner.session_factory, planner.keyring)
    return defs


def summary(rows: dict[str, list[m.Outbox]]) -> dict[str, list[str]]:
    """patient -> ["status:outcome:first rule", ...]."""
    return {
        patient: [
            f"{r.status}:{r.outcome}" + (f":{r.reasons[0]['rule']}" if r.reasons else "")
            for r in found
        ]
        for patient, found in sorted(rows.items())
    }


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# --- outcomes ------------------------------------------------------------------------------

SAMPLE_STATIN = {
    "S001": ["queued:allow"],
    "S002": ["blocked:deny:consent-required"],
    "S003": ["blocked:deny:gdpr-explicit-consent"],
    "S004": ["queued:allow"],
    "S005": ["blocked:deny:consent-required"],
    "S006": ["queued:allow"],
    # deferred by the daily cap to the next day, past its 10 h expiry: expired at once
    "S007": ["queued:allow", "expired:defer:hc-daily-cap"],
    "S009": ["queued:allow"],
}


def test_sample_outcomes_are_stored_with_reasons(planner: Planner, sample: DefinitionSet) -> None:
    report = planner(sample)
    assert summary(planner.rows("statin-refill")) == SAMPLE_STATIN
    statin = report.campaigns["statin-refill"]
    assert dict(statin.summary.outcomes) == {"allow": 5, "defer": 1, "deny": 3}
    assert statin.inserted == 9 and statin.already_present == 0
    # The report's counts are the stored rows' (rows sharing a decision are counted together).
    stored = [row for rows in planner.rows("statin-refill").values() for row in rows]
    assert statin.statuses == Counter(row.status for row in stored)
    assert statin.summary.deciding_rules == Counter(
        row.reasons[0]["rule"] for row in stored if row.outcome != "allow"
    )
    assert statin.links == 0
    deferred = planner.rows("statin-refill")["S007"][1]
    assert deferred.send_at == datetime(2026, 12, 8, 16, 0, tzinfo=UTC)
    assert [r["rule"] for r in deferred.reasons] == ["hc-daily-cap", "expired"]
    assert deferred.reasons[0]["cite"].startswith("FCC 15-72")
    allowed = planner.rows("statin-refill")["S009"][0]
    assert allowed.reasons == [] and allowed.send_at == AT and allowed.decided_at == AT
    assert (allowed.locale, allowed.encoding, allowed.segments) == ("es", "GSM-7", 1)
    assert allowed.policy_set == sample.policy_version
    assert allowed.campaign_version == sample.campaigns["statin-refill"].version
    assert allowed.template_version == sample.templates[("statin-refill", "es")].version
    assert allowed.occurrence == "-3d@2026-12-10" and allowed.anchor == "prescription:S009-RX1"
    assert allowed.due_at == datetime(2026, 12, 7, 15, 0, tzinfo=UTC)
    assert allowed.expires_at == allowed.due_at + timedelta(hours=10)
    assert "Hola José" in (planner.body(allowed) or "")


def test_planner_agrees_with_the_dry_run_on_a_fresh_outbox(
    planner: Planner, sample: DefinitionSet
) -> None:
    campaign = sample.campaigns["statin-refill"]
    with planner.session_factory() as session:
        evaluations = list(
            dry_run(
                sample,
                campaign=campaign,
                candidates=(
                    Candidate(d.id, d.patient, d.prescriptions, d.appointments)
                    for d in queries.iter_patients(session=session, keyring=planner.keyring)
                ),
                consents_for=lambda ids: consent_queries.consent_states_for_many(
                    session=session, patient_ids=ids, purposes=list(sample.purposes)
                ),
                at=AT,
                approved_versions=approved_versions(session=session),
                public_url=PUBLIC_URL,
                summary=DryRunSummary(),
            )
        )
    planner(sample)
    stored = {r.idempotency_key: r for rows in planner.rows(campaign.id).values() for r in rows}
    assert set(stored) == {e.occurrence.idempotency_key for e in evaluations}
    for e in evaluations:
        row = stored[e.occurrence.idempotency_key]
        assert row.outcome == e.decision.outcome
        assert [r["rule"] for r in row.reasons if r["rule"] != "expired"] == [
            r.rule for r in e.decision.reasons
        ]
        if e.decision.outcome == "defer":
            assert row.send_at == e.decision.send_at
        assert planner.body(row) == (e.rendered.text if e.rendered else None)


def test_a_deferral_within_the_expiry_waits_as_deferred(planner: Planner, defs_dir: Path) -> None:
    path = defs_dir / "campaigns" / "statin-refill.yaml"
    write(path, path.read_text().replace("expires_after: 10h", "expires_after: 3d"))
    defs = load(planner.session_factory, defs_dir)
    import_sample(planner.session_factory, planner.keyring)
    planner(defs)
    second = planner.rows("statin-refill")["S007"][1]
    assert (second.status, second.outcome) == (st.DEFERRED, "defer")
    assert second.send_at == datetime(2026, 12, 8, 16, 0, tzinfo=UTC)
    assert [r["rule"] for r in second.reasons] == ["hc-daily-cap"]


def test_unapproved_template_is_blocked_by_template_approval(
    planner: Planner, defs_dir: Path
) -> None:
    defs = load(planner.session_factory, defs_dir, approve=())
    import_sample(planner.session_factory, planner.keyring)
    report = planner(defs)
    rows = [r for found in planner.rows("statin-refill").values() for r in found]
    assert len(rows) == 9 and {r.status for r in rows} == {st.BLOCKED}
    assert all(r.reasons[-1]["rule"] == "template-approval" for r in rows)
    assert report.campaigns["statin-refill"].summary.unapproved_templates


def test_suppressed_patient_is_blocked(planner: Planner, sample: DefinitionSet) -> None:
    with planner.session_factory.begin() as session:
        consent_queries.add_suppression(
            session=session, keyring=planner.keyring, e164="+12125550101", reason="stop"
        )
    planner(sample)
    (row,) = planner.rows("statin-refill")["S001"]
    assert (row.status, row.outcome) == (st.BLOCKED, "deny")
    assert [r["rule"] for r in row.reasons] == ["suppressed"]
    assert row.reasons[0]["policy"] == "engage"


def test_queued_rows_of_an_earlier_tick_count_towards_caps(
    planner: Planner, defs_dir: Path
) -> None:
    defs = load(
        planner.session_factory, defs_dir, approve=("statin-refill", "appointment-reminder")
    )
    import_sample(planner.session_factory, planner.keyring)
    with planner.session_factory.begin() as session:
        outbox_queries.set_paused(
            session=session, campaign_id="appointment-reminder", paused=True, by="ops", now=AT
        )
    first = planner(defs)
    assert first.skipped == {"appointment-reminder": "paused"}
    assert "appointment-reminder" not in planner.rows()
    with planner.session_factory.begin() as session:
        outbox_queries.set_paused(
            session=session, campaign_id="appointment-reminder", paused=False, by="ops", now=AT
        )
    second = planner(defs)
    assert second.campaigns["statin-refill"].inserted == 0
    reminders = summary(planner.rows("appointment-reminder"))
    # S001's refill reminder was queued by the first tick: one healthcare text a day.
    assert reminders["S001"] == ["expired:defer:hc-daily-cap"]


# --- idempotency ---------------------------------------------------------------------------


def test_planning_twice_adds_no_rows(planner: Planner, sample: DefinitionSet) -> None:
    first = planner(sample)
    rows = planner.count()
    second = planner(sample)
    assert planner.count() == rows == first.inserted == 9 + 2
    assert second.inserted == 0 and second.already_present == first.inserted


def test_an_edited_and_approved_template_does_not_replan(
    planner: Planner, sample: DefinitionSet, defs_dir: Path
) -> None:
    planner(sample)
    before = {r.idempotency_key: r.template_version for r in planner.rows()["S001"]}
    path = defs_dir / "templates" / "statin-refill.en.sms.j2"
    write(path, path.read_text().replace("is due soon", "is due in 3 days"))
    edited = load(planner.session_factory, defs_dir)
    assert edited.templates[("statin-refill", "en")].version not in before.values()
    report = planner(edited)
    assert report.inserted == 0
    assert {r.idempotency_key: r.template_version for r in planner.rows()["S001"]} == before


@pytest.mark.parametrize("workers", [2])
def test_concurrent_planners_make_one_row_per_occurrence(
    db_url: str,
    keyring: Keyring,
    session_factory: sessionmaker[Session],
    defs_dir: Path,
    workers: int,
) -> None:
    defs = load(session_factory, defs_dir, approve=("statin-refill", "appointment-reminder"))
    add_population(session_factory, keyring, 120)
    reports: list[PlanReport] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def work() -> None:
        engine = make_engine(db_url)
        try:
            barrier.wait()
            planner = Planner(make_session_factory(engine), keyring)
            reports.append(planner(defs, batch_size=8))
        except BaseException as exc:
            errors.append(exc)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    planner = Planner(session_factory, keyring)
    rows = [r for found in planner.rows().values() for r in found]
    assert len(rows) == 240  # a refill and an appointment reminder for each patient
    assert len({r.idempotency_key for r in rows}) == 240
    assert sum(r.inserted for r in reports) == 240
    assert all(r.inserted + r.already_present == 240 for r in reports)
    with session_factory() as session:
        links = session.scalars(select(m.SchedulingLink)).all()
    sendable = {
        r.id for r in rows if r.campaign_id == "appointment-reminder" and r.status in st.WAITING
    }
    assert sendable and sorted(link.outbox_id for link in links) == sorted(sendable)


def add_population(session_factory: sessionmaker[Session], keyring: Keyring, n: int) -> None:
    """n New York patients with a statin refill due 2026-12-10, a visit on 2026-12-09 and
    written consent (no healthcare caps), built through the store API."""
    ids = [f"P{i:04d}" for i in range(n)]
    patient = Patient(external_id="", given_name="Zebulon", family_name="Quackenbush")
    records = [
        queries.PatientRecord(
            replace(patient, external_id=e, timezone="America/New_York", region="NY"),
            phone=f"+1212555{i:04d}",
        )
        for i, e in enumerate(ids)
    ]
    refill = Prescription("", "atorvastatin", "statin", date(2026, 12, 10))
    visit = Appointment("", datetime(2026, 12, 9, 19, 30, tzinfo=UTC), "primary-care")
    consent = ConsentEvent("", "", "granted", AT - timedelta(days=90), legal_basis="written")
    with session_factory.begin() as session:
        queries.upsert_patients(session=session, keyring=keyring, records=records)
        rows = queries.patient_ids_for(session=session, external_ids=ids)
        queries.upsert_prescriptions(
            session=session,
            keyring=keyring,
            items=[(rows[e], replace(refill, rx_id=f"{e}-RX")) for e in ids],
        )
        queries.upsert_appointments(
            session=session,
            items=[(rows[e], replace(visit, appointment_id=f"{e}-A")) for e in ids],
        )
        consent_queries.record_consent_events(
            session=session,
            keyring=keyring,
            items=[
                (rows[e], replace(consent, patient=e, purpose=purpose))
                for e in ids
                for purpose in ("adherence", "appointment")
            ],
        )


# --- expiry, pause, storage ----------------------------------------------------------------


def test_expiry_sweep_expires_waiting_rows(planner: Planner, sample: DefinitionSet) -> None:
    planner(sample)
    later = AT + timedelta(hours=10)  # past the refill reminders' 01:00Z expiry
    report = planner(sample, now=later)
    assert report.expired == 5  # the queued refill reminders
    rows = planner.rows("statin-refill")
    assert rows["S001"][0].status == st.EXPIRED
    assert rows["S001"][0].reasons[-1]["rule"] == "expired"
    assert rows["S002"][0].status == st.BLOCKED  # closed rows are left alone
    with planner.session_factory() as session:
        status = outbox_queries.outbox_status(session=session, campaign_id="statin-refill")
    assert status.by_rule[(st.EXPIRED, "expired")] == 5
    assert status.by_rule[(st.EXPIRED, "hc-daily-cap")] == 1
    assert status.by_rule[(st.BLOCKED, "consent-required")] == 2
    assert planner(sample, now=later).expired == 0


def test_paused_campaigns_are_not_planned(
    planner: Planner, sample: DefinitionSet, defs_dir: Path
) -> None:
    with planner.session_factory.begin() as session:
        outbox_queries.set_paused(
            session=session, campaign_id="statin-refill", paused=True, by="ops", now=AT
        )
        assert outbox_queries.is_paused(session=session, campaign_id="statin-refill")
        assert outbox_queries.paused_campaigns(session=session) == {"statin-refill"}
    report = planner(sample)
    assert report.skipped == {"statin-refill": "paused"}
    assert not planner.rows("statin-refill")
    path = defs_dir / "campaigns" / "appointment-reminder.yaml"
    write(path, path.read_text() + "status: paused\n")
    paused_in_file = load(planner.session_factory, defs_dir)
    assert planner(paused_in_file).skipped == {
        "statin-refill": "paused",
        "appointment-reminder": "paused in its definition",
    }


def _outbox_estimate(planner: Planner) -> float | None:
    """PostgreSQL's planner estimate of the outbox's rows (ANALYZE sets it)."""
    with planner.session_factory() as session:
        if session.get_bind().dialect.name != "postgresql":
            return None
        return session.scalar(text("SELECT reltuples FROM pg_class WHERE relname = 'outbox'"))


@pytest.mark.parametrize("threshold", [1, 10_000])
def test_a_large_tick_refreshes_the_outbox_statistics(
    planner: Planner, sample: DefinitionSet, monkeypatch: pytest.MonkeyPatch, threshold: int
) -> None:
    """On PostgreSQL a tick that inserted at least ANALYZE_AFTER_ROWS rows analyzes the
    outbox at once (here 11 rows: the estimate then counts them exactly); SQLite has
    nothing to refresh."""
    monkeypatch.setattr(planner_module, "ANALYZE_AFTER_ROWS", threshold)
    before = _outbox_estimate(planner)
    report = planner(sample)
    after = _outbox_estimate(planner)
    assert report.inserted == planner.count() == 11
    if before is None:
        assert after is None
    elif threshold <= report.inserted:
        assert after == 11
    else:
        assert after == before != 11


def test_decided_rows_are_written_several_batches_at_a_time_on_sqlite(
    planner: Planner, sample: DefinitionSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: rows wait until SQLITE_WRITE_ROWS are decided, then go in one transaction,
    and the rest at the end; PostgreSQL writes each batch's. Either way every row once."""
    monkeypatch.setattr(planner_module, "SQLITE_WRITE_ROWS", 4)
    writes: list[int] = []
    insert = planner_module.outbox_insert.insert_outbox_rows

    def counted(*, session: Session, rows: list[dict[str, object]]) -> dict[str, int]:
        writes.append(len(rows))
        return insert(session=session, rows=rows)

    monkeypatch.setattr(planner_module.outbox_insert, "insert_outbox_rows", counted)
    report = planner(sample, batch_size=2)
    assert sum(writes) == report.inserted == planner.count() == 11
    if planner.session_factory.kw["bind"].dialect.name == "sqlite":
        assert all(n >= 4 for n in writes[:-1]) and len(writes) == 3
    else:
        assert all(n <= 4 for n in writes) and len(writes) >= 4  # at most 2 rows a patient


def test_a_failed_analyze_costs_only_the_statistics(
    planner: Planner,
    sample: DefinitionSet,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refused(*, session: Session) -> bool:
        session.execute(text("SELECT * FROM no_such_table_to_analyze"))
        return True

    monkeypatch.setattr(planner_module, "ANALYZE_AFTER_ROWS", 1)
    monkeypatch.setattr(outbox_queries, "refresh_statistics", refused)
    report = planner(sample)
    assert report.inserted == planner.count() == 11
    assert [r.message for r in caplog.records] == ["planner.analyze_failed"]
    with planner.session_factory() as session:
        assert session.scalar(select(func.count()).select_from(m.AuditEntry)) >= 1


@pytest.mark.parametrize("db_backend", ["postgresql"], indirect=True)  # SQLite: no ANALYZE
def test_an_analyze_that_cannot_get_its_lock_gives_up_and_the_tick_stands(
    planner: Planner,
    sample: DefinitionSet,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A VACUUM in progress (here: its lock, held by another connection) makes ANALYZE
    wait; the tick waits at most the lock timeout, then logs and returns its report."""
    with planner.session_factory() as holder:
        holder.execute(text("LOCK TABLE outbox IN SHARE UPDATE EXCLUSIVE MODE"))
        monkeypatch.setattr(planner_module, "ANALYZE_AFTER_ROWS", 1)
        started = time.monotonic()
        report = planner(sample)
        waited = time.monotonic() - started
        holder.rollback()
    assert report.inserted == planner.count() == 11
    assert waited < 10
    assert [r.message for r in caplog.records] == ["planner.analyze_failed"]
    assert caplog.records[0].fields == {"error": "LockNotAvailable"}


def test_bodies_are_sealed_at_rest(planner: Planner, sample: DefinitionSet, db_url: str) -> None:
    planner(sample)
    (row,) = planner.rows("statin-refill")["S001"]
    assert "Hi Ada" in (planner.body(row) or "")
    with planner.session_factory() as session:
        raw = session.scalars(select(m.Outbox.body_enc)).all()
    assert raw and all(b"Ada" not in bytes(body) for body in raw if body)
    if db_url.startswith("sqlite:///"):
        path = Path(db_url.removeprefix("sqlite:///"))
        stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert b"Lovelace" not in stored and b"Hi Ada" not in stored


def test_links_are_minted_for_sendable_rows_and_stored_hashed(
    planner: Planner, defs_dir: Path, db_url: str
) -> None:
    defs = load(planner.session_factory, defs_dir, approve=("appointment-reminder",))
    import_sample(planner.session_factory, planner.keyring)
    planner(defs)
    (row,) = planner.rows("appointment-reminder")["S001"]
    assert row.status == st.QUEUED
    text = planner.body(row) or ""
    token = LINK.search(text).group(1)  # type: ignore[union-attr]
    assert 22 <= len(token) <= 24  # 16 random bytes (128 bits), URL-safe base64
    with planner.session_factory() as session:
        links = session.scalars(select(m.SchedulingLink)).all()
    by_outbox = {link.outbox_id: link for link in links}
    link = by_outbox[row.id]
    assert link.token_hash == token_hash(token) and link.token_hash != token
    assert link.kind == "primary-care" and link.patient_id == row.patient_id
    assert link.expires_at == row.due_at + timedelta(days=7)
    if db_url.startswith("sqlite:///"):
        path = Path(db_url.removeprefix("sqlite:///"))
        stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert token.encode() not in stored


def test_blocked_rows_get_no_link(planner: Planner, sample: DefinitionSet) -> None:
    planner(sample)  # appointment-reminder is not approved in `sample`
    rows = [r for found in planner.rows("appointment-reminder").values() for r in found]
    assert len(rows) == 2 and {r.status for r in rows} == {st.BLOCKED}
    assert planner.count(m.SchedulingLink) == 0
    assert all(f"/s/{PREVIEW_LINK_TOKEN}" in (planner.body(r) or "") for r in rows)


# --- schedule kinds ------------------------------------------------------------------------

ONCE = """\
id: flu-day
name: Flu shot day
purpose: adherence
template: statin-refill
audience:
  anchor: none
schedule:
  on: 2026-12-07
  at: "08:00"
expires_after: 8h
"""

DAILY = """\
id: refill-daily
name: Daily refill nudges
purpose: adherence
template: statin-refill
audience:
  anchor: prescription
  where: 'prescription.medication_class == "statin"'
schedule:
  every: day
  start: prescription.refill_due
  count: 3
  at: "18:00"
expires_after: 2h
"""


def test_once_occurrence_due_within_the_horizon_is_decided_for_its_due_time(
    planner: Planner, defs_dir: Path
) -> None:
    write(defs_dir / "campaigns" / "flu-day.yaml", ONCE)
    defs = load(planner.session_factory, defs_dir)
    import_sample(planner.session_factory, planner.keyring)
    due = datetime(2026, 12, 7, 13, 0, tzinfo=UTC)  # 08:00 in New York
    planner(defs, now=due - timedelta(minutes=6))
    assert sorted(planner.rows("flu-day")) == ["S003", "S004"]  # Berlin: due at 07:00Z
    planner(defs, now=due - timedelta(minutes=3))
    rows = planner.rows("flu-day")
    # at 07:57 quiet hours would defer it; decided for 08:00 it is allowed
    (s001,) = rows["S001"]
    assert (s001.status, s001.send_at, s001.occurrence) == (st.QUEUED, due, "once")
    assert s001.decided_at == due - timedelta(minutes=3)
    assert rows["S003"][0].due_at == datetime(2026, 12, 7, 7, 0, tzinfo=UTC)
    assert len(rows) == 10  # everyone, once


def test_recurring_schedules_plan_each_occurrence_once(planner: Planner, defs_dir: Path) -> None:
    write(defs_dir / "campaigns" / "refill-daily.yaml", DAILY)
    defs = load(planner.session_factory, defs_dir, approve=("statin-refill", "awareness-monthly"))
    import_sample(planner.session_factory, planner.keyring)
    labels: dict[str, set[str]] = {}
    for day in (10, 11, 12, 13):
        now = datetime(2026, 12, day, 23, 0, tzinfo=UTC)  # 18:00 in New York
        planner(defs, now=now)
        for rows in planner.rows("refill-daily").values():
            for r in rows:
                labels.setdefault(r.anchor, set()).add(r.occurrence)
    assert labels["prescription:S001-RX1"] == {"2026-12-10", "2026-12-11", "2026-12-12"}
    planner(defs, now=datetime(2026, 12, 1, 16, 0, tzinfo=UTC))
    (december,) = planner.rows("awareness-monthly")["S009"]
    assert (december.occurrence, december.status) == ("2026-12-01", st.QUEUED)
    planner(defs, now=datetime(2027, 1, 1, 16, 0, tzinfo=UTC))
    monthly = planner.rows("awareness-monthly")
    by_label = {r.occurrence: r.status for r in monthly["S009"]}
    # a new row for January; December's, never dispatched here, has expired
    assert by_label == {"2026-12-01": st.EXPIRED, "2027-01-01": st.QUEUED}
    assert monthly["S001"][0].reasons[0]["rule"] == "consent-required"  # no marketing consent


def test_appointment_reminder_is_relative_to_the_visit(planner: Planner, defs_dir: Path) -> None:
    defs = load(planner.session_factory, defs_dir, approve=("appointment-reminder",))
    import_sample(planner.session_factory, planner.keyring)
    planner(defs, now=datetime(2026, 12, 7, 14, 0, tzinfo=UTC))
    assert not planner.rows("appointment-reminder")  # due at 15:00Z
    planner(defs, now=datetime(2026, 12, 7, 14, 56, tzinfo=UTC))
    rows = planner.rows("appointment-reminder")
    assert sorted(rows) == ["S001", "S009"]
    assert rows["S001"][0].occurrence == "-2d@2026-12-09T19:30Z"
    assert rows["S001"][0].send_at == datetime(2026, 12, 7, 15, 0, tzinfo=UTC)


# --- several processes ---------------------------------------------------------------------


def test_a_tick_split_over_processes_plans_what_one_process_plans(
    planner: Planner, sample: DefinitionSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planner_parallel, "MIN_PATIENTS_PER_PROCESS", 3)
    ranges = planner_parallel.id_ranges(planner.session_factory, 3)
    assert len(ranges) == 3 and ranges[0][0] is None and ranges[-1][1] is None
    assert ranges[0][1] == ranges[1][0] and ranges[1][1] == ranges[2][0]
    report = planner(sample, processes=3)
    assert summary(planner.rows("statin-refill")) == SAMPLE_STATIN
    statin = report.campaigns["statin-refill"]
    assert dict(statin.summary.outcomes) == {"allow": 5, "defer": 1, "deny": 3}
    assert statin.inserted == 9 and report.patients_seen == 10
    with planner.session_factory() as session:
        ticks = session.scalars(select(m.AuditEntry).where(m.AuditEntry.action == "plan_tick"))
        assert [t.details["inserted"] for t in ticks] == [report.inserted]
    again = planner(sample, processes=3)
    assert again.inserted == 0 and again.already_present == report.inserted


def test_a_small_population_or_a_memory_database_is_planned_in_process(
    planner: Planner, sample: DefinitionSet
) -> None:
    assert planner_parallel.id_ranges(planner.session_factory, 4) == [(None, None)]
    memory = make_session_factory(make_engine("sqlite://"))
    assert planner_parallel.database_url(memory) is None
    assert planner_parallel.id_ranges(memory, 4, min_per_process=1) == [(None, None)]
