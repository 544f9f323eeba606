"""Accounts: login throttling, token prefixes, template drafts edited in the browser, and
the audit chain's head (one row every appender locks first).

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("failed_logins", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("locked_until", TS, nullable=True))
        batch.add_column(sa.Column("created_by", sa.String(128), nullable=True))
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("prefix", sa.String(16), nullable=False, server_default=""))
        batch.add_column(sa.Column("created_by", sa.String(128), nullable=True))
    op.create_table(
        "template_drafts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("template_id", sa.String(128), nullable=False),
        sa.Column("locale", sa.String(16), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("base_version", sa.String(64), nullable=True),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reviewed_by", sa.String(128), nullable=True),
        sa.Column("reviewed_at", TS, nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_template_drafts"),
    )
    op.create_index("ix_template_drafts_status", "template_drafts", ["status"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("entries", sa.BigInteger(), nullable=False),
        sa.Column("last_hash", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_head"),
    )
    op.execute("INSERT INTO audit_head (id, entries, last_hash) VALUES (1, 0, NULL)")
    op.create_index(
        "ix_template_drafts_template_id_locale", "template_drafts", ["template_id", "locale"]
    )


def downgrade() -> None:
    op.drop_table("audit_head")
    op.drop_table("template_drafts")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("created_by")
        batch.drop_column("prefix")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("created_by")
        batch.drop_column("locked_until")
        batch.drop_column("failed_logins")
