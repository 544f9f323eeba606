"""The database tables (SQLAlchemy 2 typed models). Migrations live in `migrations/`.

Columns ending in `_enc` hold AES-GCM ciphertexts sealed with the patient's data key
(see engine.crypto); nothing identifying is stored in clear. `phone_index` columns hold
the keyed blind index of an E.164 number.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from engine.store.coltypes import UTCDateTime, utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Rows the dispatcher may claim (engine.outbox_status.WAITING), as SQL: the claim's
# condition must read exactly so for SQLite to use the partial index below.
WAITING_SQL = "status IN ('deferred', 'queued')"

# 64-bit ids on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
        bytes: LargeBinary(),
        date: Date(),
    }


class Patient(Base):
    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    external_id: Mapped[str] = mapped_column(String(64), unique=True)
    given_name_enc: Mapped[bytes | None]
    family_name_enc: Mapped[bytes | None]
    phone_enc: Mapped[bytes | None]
    birth_date_enc: Mapped[bytes | None]
    # Not unique: family members may share one phone.
    phone_index: Mapped[str | None] = mapped_column(String(80), index=True)
    timezone: Mapped[str | None] = mapped_column(String(64))
    candidate_timezones: Mapped[str] = mapped_column(Text, default="")
    locale: Mapped[str] = mapped_column(String(16), default="en")
    country: Mapped[str] = mapped_column(String(2), default="US")
    region: Mapped[str | None] = mapped_column(String(16))
    allow_phi_sms: Mapped[bool] = mapped_column(Boolean, default=False)
    # Declared extra attributes (policies/data.yaml), sealed as one JSON document.
    attributes_enc: Mapped[bytes | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    erased_at: Mapped[datetime | None]


class PatientKey(Base):
    """The patient's wrapped data key; NULL once destroyed by erasure."""

    __tablename__ = "patient_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), unique=True)
    wrapped_key: Mapped[bytes | None]
    master_key_id: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    destroyed_at: Mapped[datetime | None]


class Prescription(Base):
    __tablename__ = "prescriptions"
    __table_args__ = (UniqueConstraint("patient_id", "rx_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    rx_id: Mapped[str] = mapped_column(String(64))
    medication_enc: Mapped[bytes | None]
    medication_class: Mapped[str] = mapped_column(String(64), index=True)
    refill_due: Mapped[date] = mapped_column(index=True)
    status: Mapped[str] = mapped_column(String(32), default="active")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Appointment(Base):
    __tablename__ = "appointments"
    __table_args__ = (Index(None, "patient_id", "starts_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    appointment_id: Mapped[str] = mapped_column(String(64), unique=True)
    starts_at: Mapped[datetime] = mapped_column(index=True)
    kind: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(128), default="")
    location: Mapped[str] = mapped_column(String(128), default="")
    status: Mapped[str] = mapped_column(String(32), default="booked")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Slot(Base):
    __tablename__ = "slots"
    __table_args__ = (Index(None, "kind", "starts_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    slot_id: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(128), default="")
    location: Mapped[str] = mapped_column(String(128), default="")
    starts_at: Mapped[datetime]
    duration_min: Mapped[int] = mapped_column(Integer, default=30)
    booked_by: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), index=True)
    booked_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsentEvent(Base):
    """Append-only: database triggers refuse UPDATE and DELETE (migration 0001)."""

    __tablename__ = "consent_events"
    __table_args__ = (Index(None, "patient_id", "occurred_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    purpose: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16), default="sms")
    status: Mapped[str] = mapped_column(String(16))
    legal_basis: Mapped[str | None] = mapped_column(String(32))
    method: Mapped[str | None] = mapped_column(String(64))
    notice_version: Mapped[str | None] = mapped_column(String(64))
    evidence_enc: Mapped[bytes | None]
    occurred_at: Mapped[datetime]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
    recorded_by: Mapped[str | None] = mapped_column(String(128))
    source: Mapped[str | None] = mapped_column(String(256))


class Suppression(Base):
    """A number that must never be texted (STOP, erasure), kept only as its blind index."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(primary_key=True)
    phone_index: Mapped[str] = mapped_column(String(80), unique=True)
    reason: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Definition(Base):
    __tablename__ = "definitions"
    __table_args__ = (
        UniqueConstraint("kind", "def_id", "version"),
        Index(None, "kind", "active"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # campaign|template|policy|purposes|data|program
    def_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512), default="")
    content: Mapped[str] = mapped_column(Text)
    loaded_at: Mapped[datetime] = mapped_column(default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=False)


class DefinitionSet(Base):
    __tablename__ = "definition_sets"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    loaded_at: Mapped[datetime] = mapped_column(default=utcnow)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Approval(Base):
    __tablename__ = "approvals"
    __table_args__ = (Index(None, "template_id", "locale", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[str] = mapped_column(String(128))
    locale: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))  # approve|reject
    approved_by: Mapped[str] = mapped_column(String(128))
    approved_at: Mapped[datetime] = mapped_column(default=utcnow)
    comment: Mapped[str | None] = mapped_column(Text)


class Outbox(Base):
    """One occurrence's decision and message; the idempotency key makes it one ever."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index(None, "status", "send_at"),
        # The dispatcher's claim: due rows in (send_at, id) order, read straight off this
        # partial index instead of sorting every waiting row (a second per claim at 1M).
        Index(
            "ix_outbox_due",
            "send_at",
            "id",
            postgresql_where=text(WAITING_SQL),
            sqlite_where=text(WAITING_SQL),
        ),
        Index(None, "patient_id", "status"),
        # Sent rows only, and rows handed to the provider only: the only ones read through
        # them, and a planned row is neither (migration 0011).
        Index(
            "ix_outbox_patient_id_sent_at",
            "patient_id",
            "sent_at",
            postgresql_where=text("sent_at IS NOT NULL"),
            sqlite_where=text("sent_at IS NOT NULL"),
        ),
        Index(
            "ix_outbox_provider_sid",
            "provider_sid",
            postgresql_where=text("provider_sid IS NOT NULL"),
            sqlite_where=text("provider_sid IS NOT NULL"),
        ),
        Index(None, "campaign_id", "status"),
        # One row per key, scoped by patient (migration 0010): the key hashes the patient's
        # external id, so this is the key's own uniqueness, but planners write rows in
        # patient order and this index takes them at its end, where one on the random key
        # alone took each at a random page.
        UniqueConstraint("patient_id", "idempotency_key"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    campaign_id: Mapped[str] = mapped_column(String(128))
    campaign_version: Mapped[str] = mapped_column(String(64))
    template_id: Mapped[str | None] = mapped_column(String(128))
    template_version: Mapped[str | None] = mapped_column(String(64))
    locale: Mapped[str | None] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"))
    occurrence: Mapped[str] = mapped_column(String(64))
    anchor: Mapped[str] = mapped_column(String(128), default="")
    outcome: Mapped[str] = mapped_column(String(8))  # allow|defer|deny
    status: Mapped[str] = mapped_column(String(16))
    due_at: Mapped[datetime]
    send_at: Mapped[datetime | None]
    expires_at: Mapped[datetime]
    body_enc: Mapped[bytes | None]
    segments: Mapped[int | None]
    encoding: Mapped[str | None] = mapped_column(String(8))
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    policy_set: Mapped[str | None] = mapped_column(String(64))
    provider_sid: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]
    # Set, guarded, just before the provider call (engine.dispatch_gate): a `sending` row
    # without it was never handed to the provider and may still be withdrawn.
    send_started_at: Mapped[datetime | None]
    # Set when an attempt ends without a clear answer (the provider may have accepted it):
    # the earliest such claim time, until a provider lookup or an answer settles it. The
    # next attempt first asks the provider for texts since then, and until then the row
    # counts as sent for frequency caps.
    unsettled_since: Mapped[datetime | None]
    error_code: Mapped[int | None] = mapped_column(Integer)
    provider_status: Mapped[str | None] = mapped_column(String(16))
    decided_at: Mapped[datetime | None]


class CampaignState(Base):
    """Operational state of a campaign: paused campaigns are not dispatched."""

    __tablename__ = "campaign_states"

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(128), unique=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(128))


class InboundMessage(Base):
    __tablename__ = "inbound_messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    provider_sid: Mapped[str | None] = mapped_column(String(64), unique=True)
    from_index: Mapped[str] = mapped_column(String(80), index=True)
    to_number: Mapped[str] = mapped_column(String(32), default="")
    patient_id: Mapped[int | None] = mapped_column(ForeignKey("patients.id"), index=True)
    body_enc: Mapped[bytes | None]
    classification: Mapped[str] = mapped_column(String(16), default="other")
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    handled_at: Mapped[datetime | None]


class SchedulingLink(Base):
    __tablename__ = "scheduling_links"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    outbox_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("outbox.id"))
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    clicks: Mapped[int] = mapped_column(Integer, default=0)
    opened_at: Mapped[datetime | None]  # the first click
    booked_slot_id: Mapped[int | None] = mapped_column(ForeignKey("slots.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only and hash-chained: `hash` covers the entry and `prev_hash`."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str | None] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AuditHead(Base):
    """The chain's one head row: appenders lock it first, so entries form one line."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    entries: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str | None] = mapped_column(String(64))


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    last_login_at: Mapped[datetime | None]
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    locked_until: Mapped[datetime | None]
    created_by: Mapped[str | None] = mapped_column(String(128))


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    prefix: Mapped[str] = mapped_column(String(16), default="", server_default="")
    created_by: Mapped[str | None] = mapped_column(String(128))


class TemplateDraft(Base):
    """A template edited in the browser: pending until a compliance reviewer (not its
    author) approves it, which makes it part of a new active definition set."""

    __tablename__ = "template_drafts"
    __table_args__ = (Index(None, "template_id", "locale"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    template_id: Mapped[str] = mapped_column(String(128))
    locale: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    content: Mapped[str] = mapped_column(Text)
    base_version: Mapped[str | None] = mapped_column(String(64))
    author: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending|approved|rejected|...
    reviewed_by: Mapped[str | None] = mapped_column(String(128))
    reviewed_at: Mapped[datetime | None]
    comment: Mapped[str | None] = mapped_column(Text)


class RightsRequest(Base):
    """A data subject's access or erasure request (GDPR Art. 15, 17), due one month after
    receipt (Art. 12(3)). The patient is named by external id so the entry outlives erasure."""

    __tablename__ = "rights_requests"
    __table_args__ = (Index(None, "status", "due_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # access|erasure
    patient_external_id: Mapped[str] = mapped_column(String(64), index=True)
    received_at: Mapped[datetime]
    due_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))  # open|done|refused
    completed_at: Mapped[datetime | None]
    handled_by: Mapped[str | None] = mapped_column(String(128))
    note: Mapped[str | None] = mapped_column(Text)
