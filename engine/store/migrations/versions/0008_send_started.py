"""outbox.send_started_at: the moment a claimed row was handed to the provider.

A `sending` row without it has not been sent and can still be withdrawn by an opt-out;
rows already `sending` when this runs are taken as started (the safe reading: they are
reconciled through the provider, never requeued blindly).

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("send_started_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE outbox SET send_started_at = claimed_at WHERE status = 'sending'")


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("send_started_at")
