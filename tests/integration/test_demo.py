"""`engage demo`: its setup on SQLite (users, synthetic patients encrypted at rest,
approvals, reminders due at any time of day) and the phone simulator against the running
sandbox and web app, where a STOP typed as a patient reaches the signed webhook."""

from __future__ import annotations

import csv
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import func, select

from engine import accounts, demo, demo_data
from engine import outbox_status as status
from engine.cli import main
from engine.definitions import load_definitions
from engine.demo_services import build_worker, close_worker
from engine.runtime import Runtime, utcnow
from engine.sandbox.client import SandboxClient
from engine.sandbox.config import SANDBOX_FROM_NUMBER, SandboxConfig
from engine.sandbox.server import SandboxServer
from engine.settings import Settings
from engine.store import models as m
from engine.store.consent_queries import current_consents_for
from engine.store.defqueries import approved_versions
from engine.web.admin.simulator import linkify, mask
from tests.integration.admin_fixtures import admin_app, sign_in
from tests.integration.demo_fixtures import (
    PATIENTS,
    demo_settings,
    patients_waiting,
    plan,
    running_demo,
    stop_confirmation,
    waiting_rows,
)

NOON = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
QUIET_START, QUIET_END = time(8, 0), time(21, 0)  # policies/tcpa.yaml


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_setup_creates_users_patients_and_approvals(tmp_path: Path, definitions: Path) -> None:
    settings = demo_settings(tmp_path, definitions)
    result = demo.setup(settings, now=NOON, patients=PATIENTS)

    assert result.patients == PATIENTS
    assert not result.imported.rejections
    rt = Runtime(settings)
    with rt.session_factory.begin() as session:
        roles = {name: role for name, role in session.execute(select(m.User.username, m.User.role))}
        assert roles == dict(demo.USERS)
        for user in result.users:
            login = accounts.authenticate(
                session=session, username=user.username, password=user.password, now=NOON
            )
            assert login.outcome == "ok", user.username
    with rt.session_factory() as session:
        defs = rt.definitions(session)
        assert {t.version for t in defs.templates.values()} <= approved_versions(session=session)
        assert set(session.scalars(select(m.Approval.approved_by))) == {demo.REVIEWER}
        audited = session.scalar(
            select(func.count()).where(m.AuditEntry.action == "template_approved")
        )
        assert audited == len(defs.templates)
        countries = set(session.scalars(select(m.Patient.country)))
        locales = set(session.scalars(select(m.Patient.locale)))
        bases = set(session.scalars(select(m.ConsentEvent.legal_basis)))
        revocations = session.scalar(select(func.count()).where(m.ConsentEvent.status == "revoked"))
        with_consent = session.scalar(select(func.count(func.distinct(m.ConsentEvent.patient_id))))
    rt.engine.dispose()
    assert countries == {"US", "GB", "AU"}
    assert locales == {"en", "es"}
    assert {"express", "written"} <= bases
    assert revocations and with_consent and with_consent < PATIENTS  # some gave none


def test_patients_are_encrypted_at_rest(tmp_path: Path, definitions: Path) -> None:
    settings = demo_settings(tmp_path, definitions)
    demo.setup(settings, now=NOON, patients=PATIENTS)
    rows = read_csv(settings.var_dir / "data" / "patients.csv")
    definition_text = " ".join(p.read_text() for p in definitions.rglob("*.*"))
    secrets = {r["phone"] for r in rows} | {r["mrn"] for r in rows}
    secrets |= {f"{r['given_name']} {r['family_name']}" for r in rows}
    # Names of six letters or more: a shorter one turns up by chance in a megabyte of
    # ciphertext (any three given bytes do, about once in 16 MB).
    secrets |= {
        r["family_name"]
        for r in rows
        if len(r["family_name"]) >= 6 and r["family_name"] not in definition_text
    }
    rt = Runtime(settings)
    with rt.engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    rt.engine.dispose()
    database = settings.var_dir / "engage.db"
    stored = b"".join(p.read_bytes() for p in database.parent.glob("engage.db*"))
    assert len(secrets) > PATIENTS
    assert [s for s in secrets if s.encode() in stored] == []


@pytest.mark.parametrize(
    "at",
    ["2026-12-07T03:00:00+00:00", "2026-12-07T12:00:00+00:00", "2026-12-07T22:30:00+00:00",
     "2026-07-06T12:00:00+00:00"],
    ids=["03:00", "12:00", "22:30", "july-12:00"],
)  # fmt: skip
def test_reminders_are_due_right_after_setup_at_any_time_of_day(
    tmp_path: Path, definitions: Path, at: str
) -> None:
    now = datetime.fromisoformat(at)
    settings = demo_settings(tmp_path, definitions)
    demo.setup(settings, now=now, patients=PATIENTS)
    plan(settings, now)

    rt = Runtime(settings)
    with rt.session_factory() as session:
        due = session.execute(
            select(m.Outbox.outcome, m.Outbox.send_at, m.Patient.timezone)
            .join(m.Patient, m.Patient.id == m.Outbox.patient_id)
            .where(m.Outbox.status == status.QUEUED)
        ).all()
    rt.engine.dispose()
    soon = [row for row in due if row.send_at.replace(tzinfo=UTC) <= now + timedelta(minutes=1)]
    assert len(soon) >= 5, due
    for row in soon:
        local = now.astimezone(ZoneInfo(row.timezone)).time()
        assert row.outcome == "allow"
        assert QUIET_START <= local < QUIET_END, (row.timezone, local)


def test_some_patients_are_awake_at_every_quarter_hour(definitions: Path) -> None:
    """Whatever the hour and season, patients somewhere are inside every reminder's
    sending window (the roster spans UTC-10 to UTC+11)."""
    timings = demo.timings(load_definitions(definitions))
    assert set(timings) == {"prescription", "appointment"}
    roster = demo_data.roster(7, PATIENTS)
    for day in (datetime(2026, 1, 15, tzinfo=UTC), datetime(2026, 7, 15, tzinfo=UTC)):
        for quarter in range(96):
            now = day + timedelta(minutes=15 * quarter)
            for anchor, timing in timings.items():
                opens = timing.opens
                closes = (datetime.combine(now.date(), timing.closes) - demo_data.MARGIN).time()
                awake = [
                    p
                    for p in roster
                    if opens <= now.astimezone(ZoneInfo(p.place.zone)).time() <= closes
                ]
                assert len(awake) >= PATIENTS // 12, (anchor, now)


def test_a_second_run_reuses_the_database(tmp_path: Path, definitions: Path) -> None:
    settings = demo_settings(tmp_path, definitions)
    first = demo.setup(settings, now=NOON, patients=PATIENTS)
    consents = read_csv(settings.var_dir / "data" / "consents.csv")
    second = demo.setup(settings, now=NOON + timedelta(days=1), patients=PATIENTS)

    assert second.patients == PATIENTS
    assert (first.reused, second.reused) == (False, True)
    assert second.approved == []  # already approved
    assert {f.kind: f.unchanged for f in second.imported.files}["consents"] == len(consents)
    rt = Runtime(settings)
    with rt.session_factory.begin() as session:
        assert session.scalar(select(func.count()).select_from(m.ConsentEvent)) == len(consents)
        old, new = first.users[0], second.users[0]
        assert old.password != new.password
        for password, outcome in ((old.password, "bad"), (new.password, "ok")):
            result = accounts.authenticate(
                session=session, username=new.username, password=password, now=NOON
            )
            assert result.outcome == outcome
    rt.engine.dispose()
    assert demo.reset(settings.var_dir)
    assert not (settings.var_dir / "engage.db").exists()


def test_the_data_is_deterministic_for_a_seed(tmp_path: Path, definitions: Path) -> None:
    defs = load_definitions(definitions)
    files = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        settings = demo_settings(tmp_path / name, definitions)
        paths = demo.write_population(settings, defs, now=NOON, seed=seed, count=PATIENTS)
        files[name] = [p.read_bytes() for p in paths]
    assert files["a"] == files["b"]
    assert files["a"][0] != files["c"][0]


def test_demo_says_where_it_looked_for_the_definitions(tmp_path: Path) -> None:
    empty = tmp_path / "nowhere"
    empty.mkdir()
    result = CliRunner().invoke(
        main,
        ["demo", "--var-dir", str(tmp_path / "var"), "--port", "0", "--sandbox-port", "0"],
        env={"ENGAGE_DEFINITIONS_DIR": str(empty)},
    )
    assert result.exit_code == 2
    assert f"no campaigns/, templates/, policies/ folder in {empty.resolve()}" in result.output
    assert not (tmp_path / "var").exists()


# --- the phone simulator -------------------------------------------------------------------


def test_stop_in_the_simulator_goes_through_the_signed_webhook(
    tmp_path: Path, definitions: Path
) -> None:
    with running_demo(tmp_path, definitions, worker=False) as running:
        worker = build_worker(running.settings)
        worker.plan_tick()
        worker.dispatch_tick()
        plan(running.settings, utcnow(), horizon=timedelta(days=7))  # later reminders wait
        app = admin_app(running.settings, clock=utcnow)
        marketer = sign_in(app, "demo-marketer", running.password("demo-marketer"))

        listing = marketer.get("/admin/sandbox")
        threads = marketer.get("/admin/sandbox/state.json").get_json()["threads"]
        assert listing.status_code == 200 and threads
        assert all(t["patient"] in listing.get_data(as_text=True) for t in threads)
        assert all("555" not in t["masked"] for t in threads)
        candidates = sorted({t["patient"] for t in threads} & patients_waiting(running.settings))
        assert candidates, "no patient with a text and a later reminder"
        patient = candidates[0]

        response = marketer.post(f"/admin/sandbox/{patient}/reply", {"body": "STOP"})
        assert response.status_code == 303
        assert waiting_rows(running.settings, patient) == []
        rt = Runtime(running.settings)
        with rt.session_factory() as session:
            row = session.scalars(select(m.Patient).where(m.Patient.external_id == patient)).one()
            inbound = session.scalars(
                select(m.InboundMessage).where(m.InboundMessage.patient_id == row.id)
            ).all()
            consents = current_consents_for(
                session=session,
                keyring=rt.keyring,
                patient_external_id=patient,
                purposes=["adherence", "appointment", "marketing"],
            )
            cancelled = session.scalar(
                select(func.count()).where(
                    m.Outbox.patient_id == row.id, m.Outbox.status == status.CANCELLED
                )
            )
            audited = session.scalar(
                select(func.count()).where(
                    m.AuditEntry.action == "sandbox_text_sent",
                    m.AuditEntry.subject == f"patient:{patient}",
                )
            )
        rt.engine.dispose()
        assert [i.classification for i in inbound] == ["opt_out"]
        assert not any(c.active for c in consents.values())
        assert cancelled and audited == 1  # ids only: the text is not in the audit log

        worker.dispatch_tick()  # the confirmation goes out like any program reply
        close_worker(worker)
        thread = marketer.get(f"/admin/sandbox/state.json?patient={patient}").get_json()
        texts = [
            (message["direction"], "".join(part["text"] for part in message["parts"]))
            for message in thread["messages"]
        ]
        assert ("inbound", "STOP") in texts
        assert texts[-1] == ("outbound", stop_confirmation(running.settings, patient))


def test_simulator_pages(tmp_path: Path, definitions: Path) -> None:
    with running_demo(tmp_path, definitions, worker=False) as running:
        app = admin_app(running.settings, clock=utcnow)
        marketer = sign_in(app, "demo-marketer", running.password("demo-marketer"))
        viewer = sign_in(app, "demo-viewer", running.password("demo-viewer"))
        patient = read_csv(running.settings.var_dir / "data" / "patients.csv")[0]
        link = f"{running.url}/s/AbCdEfGhIjKlMnOpQrStUv"
        _provider_texts(running, patient["phone"], f"Pick a time: {link}. Reply STOP to opt out.")

        page = marketer.get(f"/admin/sandbox/{patient['external_id']}")
        html = page.get_data(as_text=True)
        assert page.status_code == 200
        assert f'<a href="{link}" target="_blank" rel="noopener noreferrer">{link}</a>' in html
        assert patient["phone"] not in html and mask(patient["phone"]) in html
        assert 'src="/static/simulator.js"' in html and "<script>" not in html

        empty = marketer.post(f"/admin/sandbox/{patient['external_id']}/reply", {"body": " "})
        assert empty.status_code == 400
        assert "Type a text to send." in empty.get_data(as_text=True)
        assert viewer.get("/admin/sandbox").status_code == 403
        assert marketer.get("/admin/sandbox/D9999").status_code == 404
        opened = marketer.get("/admin/sandbox?patient=D0002")
        assert opened.status_code == 302 and opened.location.endswith("/admin/sandbox/D0002")

        console = admin_app(running.settings.with_(transport="console"), clock=utcnow)
        elsewhere = sign_in(console, "demo-marketer", running.password("demo-marketer"))
        refused = elsewhere.get("/admin/sandbox")
        assert refused.status_code == 404
        assert "works only with the sandbox transport" in refused.get_data(as_text=True)


def test_a_stop_from_an_unknown_number_is_answered_in_the_twiml(
    tmp_path: Path, definitions: Path
) -> None:
    with running_demo(tmp_path, definitions, worker=False) as running:
        client = SandboxClient(running.services.sandbox.url)
        stranger = "+12025550150"  # NANPA's fictional range; no demo patient has it
        answer = client.text_from(stranger, "STOP")
        thread = client.thread(stranger)
        client.close()
    assert answer["webhook_status"] == 200
    assert [m["direction"] for m in thread["messages"]] == ["inbound", "outbound"]
    assert "unsubscribed" in thread["messages"][1]["body"]


def test_a_text_signed_with_another_token_changes_nothing(
    tmp_path: Path, definitions: Path
) -> None:
    with running_demo(tmp_path, definitions, worker=False) as running:
        patient = read_csv(running.settings.var_dir / "data" / "patients.csv")[0]
        with SandboxServer(SandboxConfig(port=0, auth_token="not-the-apps-token")) as other:
            client = SandboxClient(other.url)
            answer = client.text_from(patient["phone"], "STOP", url=f"{running.url}/twilio/inbound")
            thread = client.thread(patient["phone"])
            client.close()
        rt = Runtime(running.settings)
        with rt.session_factory() as session:
            inbound = session.scalar(select(func.count()).select_from(m.InboundMessage))
            states = current_consents_for(
                session=session,
                keyring=rt.keyring,
                patient_external_id=patient["external_id"],
                purposes=["adherence", "appointment"],
            )
        rt.engine.dispose()
    assert answer["webhook_status"] == 403
    assert [(m["direction"], m["status"]) for m in thread["messages"]] == [
        ("inbound", "not-delivered")
    ]
    assert inbound == 0
    assert any(state.active for state in states.values())


def test_linkify_and_mask() -> None:
    parts = linkify("Book: https://rh.example/s/Tok3n. Or http://x.example/a?b=1, thanks")
    assert [p["href"] for p in parts if p["href"]] == [
        "https://rh.example/s/Tok3n",
        "http://x.example/a?b=1",
    ]
    assert "".join(p["text"] or "" for p in parts).startswith("Book: https://rh.example/s/Tok3n.")
    assert linkify("javascript:alert(1) riversidehealth.example/sms")[0]["href"] is None
    assert mask("+12125550123") == "+1 •••-•••-••23"
    assert mask("+442079460999") == "+44 •• •••• ••99"


def _provider_texts(running: object, to: str, body: str) -> None:
    """A text accepted by the sandbox's Twilio API, as the worker would send it."""
    settings: Settings = running.settings  # type: ignore[attr-defined]
    response = requests.post(
        f"{settings.twilio_api_base_url}/2010-04-01/Accounts/{settings.twilio_account_sid}"
        "/Messages.json",
        data={"To": to, "From": SANDBOX_FROM_NUMBER, "Body": body},
        auth=(settings.twilio_account_sid or "", settings.twilio_auth_token or ""),
        timeout=10,
    )
    assert response.status_code == 201, response.text
