"""Two of the outbox's indexes keep only the rows they are read for.

- `ix_outbox_provider_sid` holds only rows with a provider sid (WHERE provider_sid IS NOT
  NULL). It is read by sid (status callbacks, reconciliation), and a planned row has none
  until it is sent: every row a planner inserted went into it, under NULL.
- `ix_outbox_patient_id_sent_at` holds only sent rows (WHERE sent_at IS NOT NULL), the
  only ones its reader (the reply-rate join) asks for.

A query comparing the column with a value (`=`, `IN`) implies the condition, so both
databases still read through these indexes.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_outbox_provider_sid", ["provider_sid"], "provider_sid IS NOT NULL"),
    ("ix_outbox_patient_id_sent_at", ["patient_id", "sent_at"], "sent_at IS NOT NULL"),
)


def upgrade() -> None:
    for name, columns, where in INDEXES:
        op.drop_index(name, "outbox")
        condition = sa.text(where)
        op.create_index(name, "outbox", columns, postgresql_where=condition, sqlite_where=condition)


def downgrade() -> None:
    for name, columns, _ in INDEXES:
        op.drop_index(name, "outbox")
        op.create_index(name, "outbox", columns)
