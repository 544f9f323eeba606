"""A database with appointment reminders planned (their links minted), open slots imported,
and helpers to read a patient's real link token back out of their sealed message body."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from engine.crypto import Keyring, load_keys, new_token
from engine.runtime import Runtime
from engine.settings import Settings
from engine.store import models as m
from engine.store import queries
from engine.store.outbox_queries import body_field
from tests.integration.conftest import Engage
from tests.integration.test_cli import AT, SAMPLE

PUBLIC_URL = "https://rh.example"
LINK = re.compile(re.escape(PUBLIC_URL) + r"/s/([A-Za-z0-9_-]+)")
NOW = datetime.fromisoformat(AT)  # 2026-12-07 11:00 in New York

SLOTS_CSV = """slot_id,kind,provider,location,starts_at,duration_min
PC-1,primary-care,Dr. Chen,Main St Clinic,2026-12-10T14:00:00Z,30
PC-2,primary-care,Dr. Chen,Main St Clinic,2026-12-10T14:30:00Z,30
PC-3,primary-care,Dr. Patel,Elm Ave Clinic,2026-12-11T15:00:00Z,20
PC-SOON,primary-care,Dr. Chen,Main St Clinic,2026-12-07T16:30:00Z,30
PC-FAR,primary-care,Dr. Chen,Main St Clinic,2027-03-01T15:00:00Z,30
CARD-1,cardiology,Dr. Ruiz,Miami Beach Clinic,2026-12-10T15:00:00Z,45
"""
OFFERED = ["PC-1", "PC-2", "PC-3"]  # primary-care, an hour ahead or more, within 60 days


@dataclass
class Booking:
    """The prepared database: the CLI runner, settings and a runtime on them."""

    engage: Engage
    settings: Settings
    runtime: Runtime

    @property
    def keyring(self) -> Keyring:
        return load_keys(self.settings)

    def token(self, external_id: str, *, latest: bool = False) -> str:
        """The token in the (first or latest) appointment reminder planned for them."""
        with self.runtime.session_factory() as session:
            patient = queries.patient_by_external_id(session=session, external_id=external_id)
            assert patient is not None
            row = session.scalar(
                select(m.Outbox)
                .where(
                    m.Outbox.patient_id == patient.id,
                    m.Outbox.campaign_id == "appointment-reminder",
                    m.Outbox.template_id == "appointment-reminder",
                )
                .order_by(m.Outbox.id.desc() if latest else m.Outbox.id)
                .limit(1)
            )
            assert row is not None and row.body_enc is not None
            cipher = queries.cipher_for(session=session, keyring=self.keyring, patient=patient)
            body = cipher.decrypt_field(body_field(row.idempotency_key), row.body_enc) or ""
        found = LINK.search(body)
        assert found, body
        return found.group(1)

    def mint(self, external_id: str, *, kind: str = "primary-care", days: int = 7) -> str:
        """A link made directly, e.g. for many concurrent bookers: tied to the patient's
        appointment reminder when they have one (that campaign confirms the booking)."""
        token, digest = new_token()
        with self.runtime.session_factory.begin() as session:
            patient = queries.patient_by_external_id(session=session, external_id=external_id)
            assert patient is not None
            reminder = session.scalar(
                select(m.Outbox.id).where(
                    m.Outbox.patient_id == patient.id,
                    m.Outbox.campaign_id == "appointment-reminder",
                )
            )
            session.add(
                m.SchedulingLink(
                    token_hash=digest,
                    outbox_id=reminder,
                    patient_id=patient.id,
                    kind=kind,
                    expires_at=NOW + timedelta(days=days),
                    clicks=0,
                )
            )
        return token


def prepare(
    engage: Engage,
    settings: Settings,
    tmp_path: Path,
    *,
    approve: tuple[str, ...] = ("appointment-reminder", "booking-confirmation"),
) -> Booking:
    slots = tmp_path / "slots.csv"
    slots.write_text(SLOTS_CSV, encoding="utf-8")
    engage("import", *sorted(str(p) for p in SAMPLE.glob("*.csv")), str(slots))
    for template in approve:
        engage("approve", template, "--by", "carol")
    engage("plan", "--at", AT)
    settings = settings.with_(public_url=PUBLIC_URL)
    return Booking(engage, settings, Runtime(settings))
