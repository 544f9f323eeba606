"""Sending: claim and error columns on the outbox, campaign pause state.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("claimed_at", TS, nullable=True))
        batch.add_column(sa.Column("error_code", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("provider_status", sa.String(16), nullable=True))
        batch.add_column(sa.Column("decided_at", TS, nullable=True))
    op.create_index("ix_outbox_campaign_id_status", "outbox", ["campaign_id", "status"])
    op.create_table(
        "campaign_states",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("campaign_id", sa.String(128), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("updated_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_campaign_states"),
        sa.UniqueConstraint("campaign_id", name="uq_campaign_states_campaign_id"),
    )


def downgrade() -> None:
    op.drop_table("campaign_states")
    op.drop_index("ix_outbox_campaign_id_status", "outbox")
    with op.batch_alter_table("outbox") as batch:
        for column in ("decided_at", "provider_status", "error_code", "claimed_at", "claimed_by"):
            batch.drop_column(column)
