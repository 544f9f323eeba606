"""The dispatcher's claim reads due rows in (send_at, id) order from a partial index over
the waiting rows (queued, deferred), instead of sorting all of them for every claim.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WAITING_SQL = "status IN ('deferred', 'queued')"


def upgrade() -> None:
    op.create_index(
        "ix_outbox_due",
        "outbox",
        ["send_at", "id"],
        postgresql_where=sa.text(WAITING_SQL),
        sqlite_where=sa.text(WAITING_SQL),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_due", "outbox")
