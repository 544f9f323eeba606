"""Initial schema: every table of engage.

Revision ID: 0001
Revises:
Create Date: 2024-06-01

Constraint names follow engine.store.models.NAMING_CONVENTION so later migrations can
refer to them on SQLite (batch mode) and PostgreSQL alike. consent_events is append-only:
triggers refuse UPDATE and DELETE on both databases.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def _id(big: bool = False) -> sa.Column:
    return sa.Column("id", BigId if big else sa.Integer(), primary_key=True)


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=f"pk_{table}")


def _fk(table: str, column: str, target: str = "patients", nullable: bool = False) -> sa.Column:
    return sa.Column(
        column,
        BigId if target == "outbox" else sa.Integer(),
        sa.ForeignKey(f"{target}.id", name=f"fk_{table}_{column}_{target}"),
        nullable=nullable,
    )


def _str(name: str, length: int, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.String(length), nullable=nullable)


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, TS, nullable=nullable)


def _bin(name: str) -> sa.Column:
    return sa.Column(name, sa.LargeBinary(), nullable=True)


def _unique(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=f"uq_{table}_{'_'.join(columns)}")


def _index(table: str, *columns: str, unique: bool = False) -> None:
    op.create_index(f"ix_{table}_{'_'.join(columns)}", table, list(columns), unique=unique)


def upgrade() -> None:
    _people()
    _clinical()
    _consent()
    _definitions()
    _messages()
    _replies_and_links()
    _access()
    _append_only("consent_events")


def _people() -> None:
    op.create_table(
        "patients",
        _id(),
        _str("external_id", 64),
        _bin("given_name_enc"),
        _bin("family_name_enc"),
        _bin("phone_enc"),
        _bin("birth_date_enc"),
        _str("phone_index", 80, nullable=True),
        _str("timezone", 64, nullable=True),
        sa.Column("candidate_timezones", sa.Text(), nullable=False),
        _str("locale", 16),
        _str("country", 2),
        _str("region", 16, nullable=True),
        sa.Column("allow_phi_sms", sa.Boolean(), nullable=False),
        _bin("attributes_enc"),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("erased_at", nullable=True),
        _pk("patients"),
        _unique("patients", "external_id"),
    )
    _index("patients", "phone_index")
    op.create_table(
        "patient_keys",
        _id(),
        _fk("patient_keys", "patient_id"),
        _bin("wrapped_key"),
        _str("master_key_id", 16),
        _ts("created_at"),
        _ts("destroyed_at", nullable=True),
        _pk("patient_keys"),
        _unique("patient_keys", "patient_id"),
    )


def _clinical() -> None:
    op.create_table(
        "prescriptions",
        _id(),
        _fk("prescriptions", "patient_id"),
        _str("rx_id", 64),
        _bin("medication_enc"),
        _str("medication_class", 64),
        sa.Column("refill_due", sa.Date(), nullable=False),
        _str("status", 32),
        _ts("created_at"),
        _ts("updated_at"),
        _pk("prescriptions"),
        _unique("prescriptions", "patient_id", "rx_id"),
    )
    _index("prescriptions", "medication_class")
    _index("prescriptions", "refill_due")
    op.create_table(
        "appointments",
        _id(),
        _fk("appointments", "patient_id"),
        _str("appointment_id", 64),
        _ts("starts_at"),
        _str("kind", 64),
        _str("provider", 128),
        _str("location", 128),
        _str("status", 32),
        _ts("created_at"),
        _ts("updated_at"),
        _pk("appointments"),
        _unique("appointments", "appointment_id"),
    )
    _index("appointments", "patient_id", "starts_at")
    _index("appointments", "starts_at")
    op.create_table(
        "slots",
        _id(),
        _str("slot_id", 64),
        _str("kind", 64),
        _str("provider", 128),
        _str("location", 128),
        _ts("starts_at"),
        sa.Column("duration_min", sa.Integer(), nullable=False),
        _fk("slots", "booked_by", nullable=True),
        _ts("booked_at", nullable=True),
        _ts("created_at"),
        _pk("slots"),
        _unique("slots", "slot_id"),
    )
    _index("slots", "kind", "starts_at")


def _consent() -> None:
    op.create_table(
        "consent_events",
        _id(big=True),
        _fk("consent_events", "patient_id"),
        _str("purpose", 64),
        _str("channel", 16),
        _str("status", 16),
        _str("legal_basis", 32, nullable=True),
        _str("method", 64, nullable=True),
        _str("notice_version", 64, nullable=True),
        _bin("evidence_enc"),
        _ts("occurred_at"),
        _ts("recorded_at"),
        _str("recorded_by", 128, nullable=True),
        _str("source", 256, nullable=True),
        _pk("consent_events"),
    )
    _index("consent_events", "patient_id", "occurred_at")
    op.create_table(
        "suppressions",
        _id(),
        _str("phone_index", 80),
        _str("reason", 64),
        _ts("created_at"),
        _pk("suppressions"),
        _unique("suppressions", "phone_index"),
    )


def _definitions() -> None:
    op.create_table(
        "definitions",
        _id(),
        _str("kind", 16),
        _str("def_id", 128),
        _str("version", 64),
        _str("path", 512),
        sa.Column("content", sa.Text(), nullable=False),
        _ts("loaded_at"),
        sa.Column("active", sa.Boolean(), nullable=False),
        _pk("definitions"),
        _unique("definitions", "kind", "def_id", "version"),
    )
    _index("definitions", "kind", "active")
    op.create_table(
        "definition_sets",
        _id(),
        _str("version", 64),
        _ts("loaded_at"),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        _pk("definition_sets"),
        _unique("definition_sets", "version"),
    )
    op.create_table(
        "approvals",
        _id(),
        _str("template_id", 128),
        _str("locale", 16),
        _str("version", 64),
        _str("decision", 16),
        _str("approved_by", 128),
        _ts("approved_at"),
        sa.Column("comment", sa.Text(), nullable=True),
        _pk("approvals"),
    )
    _index("approvals", "template_id", "locale", "version")


def _messages() -> None:
    op.create_table(
        "outbox",
        _id(big=True),
        _str("idempotency_key", 128),
        _str("campaign_id", 128),
        _str("campaign_version", 64),
        _str("template_id", 128, nullable=True),
        _str("template_version", 64, nullable=True),
        _str("locale", 16, nullable=True),
        _str("purpose", 64),
        _fk("outbox", "patient_id"),
        _str("occurrence", 64),
        _str("anchor", 128),
        _str("outcome", 8),
        _str("status", 16),
        _ts("due_at"),
        _ts("send_at", nullable=True),
        _ts("expires_at"),
        _bin("body_enc"),
        sa.Column("segments", sa.Integer(), nullable=True),
        _str("encoding", 8, nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        _str("policy_set", 64, nullable=True),
        _str("provider_sid", 64, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        _ts("sent_at", nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _pk("outbox"),
        _unique("outbox", "idempotency_key"),
    )
    _index("outbox", "status", "send_at")
    _index("outbox", "patient_id", "status")
    _index("outbox", "patient_id", "sent_at")
    _index("outbox", "provider_sid")


def _replies_and_links() -> None:
    op.create_table(
        "inbound_messages",
        _id(big=True),
        _str("provider_sid", 64, nullable=True),
        _str("from_index", 80),
        _str("to_number", 32),
        _fk("inbound_messages", "patient_id", nullable=True),
        _bin("body_enc"),
        _str("classification", 16),
        _ts("received_at"),
        _ts("handled_at", nullable=True),
        _pk("inbound_messages"),
        _unique("inbound_messages", "provider_sid"),
    )
    _index("inbound_messages", "from_index")
    _index("inbound_messages", "patient_id")
    op.create_table(
        "scheduling_links",
        _id(),
        _str("token_hash", 64),
        _fk("scheduling_links", "patient_id"),
        _str("kind", 64),
        _fk("scheduling_links", "outbox_id", target="outbox", nullable=True),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
        sa.Column("clicks", sa.Integer(), nullable=False),
        _ts("created_at"),
        _pk("scheduling_links"),
        _unique("scheduling_links", "token_hash"),
    )
    _index("scheduling_links", "patient_id")


def _access() -> None:
    op.create_table(
        "audit_log",
        _id(big=True),
        _ts("at"),
        _str("actor", 128),
        _str("action", 64),
        _str("subject", 256, nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        _str("prev_hash", 64, nullable=True),
        _str("hash", 64),
        _pk("audit_log"),
        _unique("audit_log", "hash"),
    )
    _index("audit_log", "at")
    _index("audit_log", "action")
    op.create_table(
        "users",
        _id(),
        _str("username", 128),
        _str("password_hash", 256),
        _str("role", 32),
        _ts("created_at"),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        _ts("last_login_at", nullable=True),
        _pk("users"),
        _unique("users", "username"),
    )
    op.create_table(
        "api_tokens",
        _id(),
        _str("token_hash", 64),
        _str("name", 128),
        _str("role", 32),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        _ts("last_used_at", nullable=True),
        _pk("api_tokens"),
        _unique("api_tokens", "token_hash"),
    )


def _append_only(table: str) -> None:
    """Refuse UPDATE and DELETE on `table` in the database itself."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"CREATE FUNCTION {table}_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            f"BEGIN RAISE EXCEPTION '{table} is append-only'; END $$"
        )
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
        )
        return
    for action in ("UPDATE", "DELETE"):
        op.execute(
            f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS consent_events_append_only ON consent_events")
        op.execute("DROP FUNCTION IF EXISTS consent_events_append_only()")
    for table in (
        "api_tokens",
        "users",
        "audit_log",
        "scheduling_links",
        "inbound_messages",
        "outbox",
        "approvals",
        "definition_sets",
        "definitions",
        "suppressions",
        "consent_events",
        "slots",
        "appointments",
        "prescriptions",
        "patient_keys",
        "patients",
    ):
        op.drop_table(table)
