"""`engage demo`: a working installation on one machine, in two steps.

`setup` (no servers): the SQLite database and keys under the demo's var dir (`engage init`),
the definition folders (`engage sync`), every template version approved by
"compliance-demo" (as `engage approve` records it), one staff user per role with a fresh
random password, and synthetic patients written as CSV files and read by the importer
`engage import` uses (engine.demo_data makes them).

engine.demo_services runs it: the sandbox provider, the worker and the web app.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path

from sqlalchemy import func, select

from engine import accounts, audit, demo_data
from engine.crypto import ensure_key_files
from engine.definitions import DefinitionSet, load_definitions
from engine.importer import ImportReport, import_files
from engine.runtime import Runtime
from engine.sandbox.config import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN, SANDBOX_FROM_NUMBER
from engine.settings import Settings
from engine.store import db
from engine.store import models as m
from engine.store.defqueries import approved_versions, record_review, sync_definitions
from engine.yamlsource import SourceErrors

REVIEWER = "compliance-demo"
ACTOR = "cli:demo"
USERS = (
    ("demo-marketer", "marketer"),
    ("demo-compliance", "compliance"),
    ("demo-it", "it_admin"),
    ("demo-viewer", "viewer"),
)
DEFAULT_SEED = 7
DEFAULT_PATIENTS = 300
FOLDERS = ("campaigns", "templates", "policies")
HEADERS = {
    "patients": "external_id,given_name,family_name,phone,timezone,locale,country,region,"
    "birth_date,allow_phi_sms,mrn",
    "consents": "external_id,purpose,status,legal_basis,method,notice_version,occurred_at",
    "prescriptions": "external_id,rx_id,medication,medication_class,refill_due,status",
    "appointments": "external_id,appointment_id,starts_at,kind,provider,location,status",
    "slots": "slot_id,kind,provider,location,starts_at,duration_min",
}
# What --reset removes from the var dir: the demo's own files, nothing else.
DEMO_FILES = ("engage.db", "engage.db-wal", "engage.db-shm", "master.key", "index.key")
DEMO_FILES += ("secret.key",)


class DemoError(Exception):
    """The demo cannot start; the message says what to do."""


@dataclass(frozen=True)
class DemoUser:
    username: str
    role: str
    password: str


@dataclass
class DemoSetup:
    settings: Settings
    users: list[DemoUser]
    patients: int
    approved: list[str]
    definitions: str
    imported: ImportReport
    files: list[Path] = field(default_factory=list)
    reused: bool = False  # the database held patients already


def demo_settings(base: Settings, var_dir: Path, *, public_url: str, sandbox_url: str) -> Settings:
    """The demo's own SQLite database and keys under `var_dir`, the sandbox transport, and
    webhooks checked with the sandbox's auth token; definitions as `base` finds them."""
    return base.with_(
        var_dir=var_dir,
        database_url=f"sqlite:///{var_dir / 'engage.db'}",
        master_key_file=var_dir / "master.key",
        index_key_file=var_dir / "index.key",
        secret_key_file=var_dir / "secret.key",
        master_key=None,
        index_key=None,
        secret_key=None,
        public_url=public_url.rstrip("/"),
        transport="sandbox",
        twilio_account_sid=SANDBOX_ACCOUNT_SID,
        twilio_auth_token=SANDBOX_AUTH_TOKEN,
        twilio_api_base_url=sandbox_url.rstrip("/"),
        twilio_from_number=SANDBOX_FROM_NUMBER,
        twilio_messaging_service_sid=None,
        status_callback_url=f"{public_url.rstrip('/')}/twilio/status",
        trust_proxy=False,
    )


def check_folders(root: Path) -> None:
    missing = [name for name in FOLDERS if not (root / name).is_dir()]
    if missing:
        raise DemoError(
            f"no {', '.join(f'{n}/' for n in missing)} folder in {root.resolve()}: run "
            "`engage demo` from the repository root, or set ENGAGE_DEFINITIONS_DIR to the "
            "folder that holds campaigns/, templates/ and policies/"
        )


def reset(var_dir: Path) -> list[Path]:
    """Remove the demo's database, keys and data files (and nothing else) from `var_dir`."""
    removed = [var_dir / name for name in DEMO_FILES if (var_dir / name).exists()]
    removed += [var_dir / "data" / f"{kind}.csv" for kind in HEADERS]
    removed = [path for path in removed if path.exists()]
    for path in removed:
        path.unlink()
    return removed


def setup(
    settings: Settings,
    *,
    now: datetime,
    seed: int = DEFAULT_SEED,
    patients: int = DEFAULT_PATIENTS,
) -> DemoSetup:
    """Everything but the servers; run again on the same var dir, it reuses the database
    (new passwords, reminders placed anew around `now`)."""
    check_folders(settings.definitions_dir)
    rt = Runtime(settings)
    try:
        ensure_key_files(settings)
        db.upgrade(rt.engine)
        try:
            defs = load_definitions(settings.definitions_dir)
        except SourceErrors as exc:
            problems = "\n".join(str(e) for e in exc.errors)
            raise DemoError(f"the definitions do not load:\n{problems}") from exc
        with rt.session_factory.begin() as session:
            version = sync_definitions(session=session, defs=defs, now=now).version
        approved = approve_all(rt, now)
        users = ensure_users(rt, now)
        with rt.session_factory() as session:
            reused = bool(session.scalar(select(func.count()).select_from(m.Patient)))
        files = write_population(settings, defs, now=now, seed=seed, count=patients)
        report = import_files(
            files,
            session_factory=rt.session_factory,
            keyring=rt.keyring,
            progress=False,
            purposes=set(defs.purposes),
            declared_attributes=set(defs.patient_attributes),
            actor="demo",
        )
        if any(f.error for f in report.files):
            raise DemoError("\n".join(report.lines()))
        with rt.session_factory() as session:
            count = session.scalar(select(func.count()).select_from(m.Patient)) or 0
    finally:
        if "engine" in vars(rt):
            rt.engine.dispose()
    return DemoSetup(settings, users, count, approved, version, report, files, reused)


def approve_all(rt: Runtime, now: datetime) -> list[str]:
    """Approve every active template version not yet approved; the files approved."""
    done = []
    with rt.session_factory.begin() as session:
        defs = rt.definitions(session)
        approved = approved_versions(session=session)
        for (template_id, locale), template in sorted(defs.templates.items()):
            if template.version in approved:
                continue
            record_review(
                session=session,
                template_id=template_id,
                locale=locale,
                version=template.version,
                decision="approve",
                by=REVIEWER,
                now=now,
                comment="approved for the demo",
            )
            audit.record(
                session=session,
                actor=ACTOR,
                action="template_approved",
                subject=f"template:{template_id}.{locale}",
                details={"version": template.version, "reviewer": REVIEWER, "source": "demo"},
                now=now,
            )
            done.append(template.file)
    return done


def ensure_users(rt: Runtime, now: datetime) -> list[DemoUser]:
    """One user per role with a new random password (an existing one gets a new password
    and is unlocked): the passwords are only ever shown by the run that set them."""
    users = []
    with rt.session_factory.begin() as session:
        for username, role in USERS:
            password = secrets.token_urlsafe(12)
            user = session.scalar(select(m.User).where(m.User.username == username))
            if user is None:
                accounts.create_user(
                    session=session,
                    username=username,
                    password=password,
                    role=role,
                    now=now,
                    by="demo",
                )
                action = "user_created"
            else:
                user.password_hash = accounts.hash_password(password)
                user.role, user.disabled = role, False
                user.failed_logins, user.locked_until = 0, None
                action = "user_password_reset"
            audit.record(
                session=session,
                actor=ACTOR,
                action=action,
                subject=f"user:{username}",
                details={"role": role},
                now=now,
            )
            users.append(DemoUser(username, role, password))
    return users


def write_population(
    settings: Settings, defs: DefinitionSet, *, now: datetime, seed: int, count: int
) -> list[Path]:
    """The synthetic patients as import files under <var dir>/data."""
    roster = demo_data.roster(seed, count)
    timing = timings(defs)
    link_kinds = sorted({c.link.kind for c in defs.campaigns.values() if c.link})
    rows = {
        "patients": demo_data.patient_rows(roster),
        "consents": demo_data.consent_rows(seed, roster, now),
        "prescriptions": demo_data.prescription_rows(seed, roster, now, timing.get("prescription")),
        "appointments": demo_data.appointment_rows(seed, roster, now, timing.get("appointment")),
        "slots": [row for kind in link_kinds for row in demo_data.slot_rows(kind, now)],
    }
    folder = settings.var_dir / "data"
    return [
        demo_data.write_csv(folder / f"{kind}.csv", rows[kind], HEADERS[kind].split(","))
        for kind in HEADERS
    ]


def timings(defs: DefinitionSet) -> dict[str, demo_data.Timing]:
    """Per anchor (prescription, appointment): when the first active campaign on it sends
    a day's reminder, within its expiry and the quiet hours that apply to all its texts."""
    found: dict[str, demo_data.Timing] = {}
    for campaign in sorted(defs.campaigns.values(), key=lambda c: c.id):
        schedule = campaign.schedule
        if campaign.status != "active" or schedule.kind != "relative":
            continue
        if campaign.anchor in found or not schedule.offsets:
            continue
        opens, closes = quiet_window(defs, campaign.purpose)
        expires = datetime.combine(date.min, schedule.at) + campaign.expires_after
        until = expires.time() if expires.date() == date.min else time.max
        window = (max(schedule.at, opens), min(until, closes))
        if window[0] < window[1]:
            found[campaign.anchor] = demo_data.Timing(schedule.offsets, *window)
    return found


def quiet_window(defs: DefinitionSet, purpose: str) -> tuple[time, time]:
    """The local window every message of `purpose` must fall in, by the quiet-hours rules
    that apply to all such messages (those with a `where` apply to some patients only)."""
    opens, closes = time.min, time.max
    for compiled in defs.policy_set.rules:
        rule = compiled.rule
        if rule.kind != "quiet_hours" or rule.applies_to.where:
            continue
        if rule.applies_to.purposes is not None and purpose not in rule.applies_to.purposes:
            continue
        if rule.window_start is None or rule.window_end is None:
            continue
        if rule.window_start < rule.window_end:  # a window across midnight: leave it be
            opens, closes = max(opens, rule.window_start), min(closes, rule.window_end)
    return opens, closes
