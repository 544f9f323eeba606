"""The audit log made append-only in the database itself.

audit_log refuses UPDATE and DELETE (and TRUNCATE on PostgreSQL). The chain's head row
stays updatable, since every append bumps it, but it cannot be deleted and its entry count
cannot go down, so truncating the log and rewinding the head takes more than one statement
with triggers bypassed. `engage audit verify` catches what a bypass leaves behind.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_POSTGRES = (
    "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$",
    "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()",
    "CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
    "CREATE FUNCTION audit_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF TG_OP <> 'UPDATE' THEN RAISE EXCEPTION 'audit_head cannot be deleted'; END IF; "
    "IF NEW.entries < OLD.entries THEN "
    "RAISE EXCEPTION 'audit_head cannot go back to fewer entries'; END IF; "
    "RETURN NEW; END $$",
    "CREATE TRIGGER audit_head_guard BEFORE UPDATE OR DELETE ON audit_head "
    "FOR EACH ROW EXECUTE FUNCTION audit_head_guard()",
    "CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_head_guard()",
)
_SQLITE = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head "
    "BEGIN SELECT RAISE(ABORT, 'audit_head cannot be deleted'); END",
    "CREATE TRIGGER audit_head_no_rewind BEFORE UPDATE ON audit_head "
    "WHEN NEW.entries < OLD.entries "
    "BEGIN SELECT RAISE(ABORT, 'audit_head cannot go back to fewer entries'); END",
)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for statement in _POSTGRES if postgres else _SQLITE:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, trigger in (
            ("audit_head", "audit_head_no_truncate"),
            ("audit_head", "audit_head_guard"),
            ("audit_log", "audit_log_no_truncate"),
            ("audit_log", "audit_log_append_only"),
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS audit_head_guard()")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
        return
    for trigger in (
        "audit_head_no_rewind",
        "audit_head_no_delete",
        "audit_log_no_delete",
        "audit_log_no_update",
    ):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}")
