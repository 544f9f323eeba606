"""Data subject requests (GDPR Art. 15 access, Art. 17 erasure): the register of requests
with their due dates. The patient is named by external id, not a foreign key, so the entry
outlives the erasure it records.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rights_requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("patient_external_id", sa.String(64), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("due_at", TS, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("handled_by", sa.String(128), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rights_requests"),
    )
    op.create_index(
        "ix_rights_requests_patient_external_id", "rights_requests", ["patient_external_id"]
    )
    op.create_index("ix_rights_requests_status_due_at", "rights_requests", ["status", "due_at"])


def downgrade() -> None:
    op.drop_index("ix_rights_requests_status_due_at", "rights_requests")
    op.drop_index("ix_rights_requests_patient_external_id", "rights_requests")
    op.drop_table("rights_requests")
