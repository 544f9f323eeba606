"""Self-scheduling: when a link was first opened and which slot it booked.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("scheduling_links") as batch:
        batch.add_column(sa.Column("opened_at", TS, nullable=True))
        batch.add_column(sa.Column("booked_slot_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_scheduling_links_booked_slot_id_slots", "slots", ["booked_slot_id"], ["id"]
        )
        batch.create_unique_constraint("uq_scheduling_links_booked_slot_id", ["booked_slot_id"])
    op.create_index("ix_slots_booked_by", "slots", ["booked_by"])


def downgrade() -> None:
    op.drop_index("ix_slots_booked_by", "slots")
    with op.batch_alter_table("scheduling_links") as batch:
        batch.drop_constraint("uq_scheduling_links_booked_slot_id", type_="unique")
        batch.drop_constraint("fk_scheduling_links_booked_slot_id_slots", type_="foreignkey")
        batch.drop_column("booked_slot_id")
        batch.drop_column("opened_at")
