"""outbox.unsettled_since: since when an attempt of a waiting row may have reached the
provider without an answer.

Until now the claim time of such an attempt was kept in `claimed_at`, which the next claim
overwrites; rows waiting for a retry (attempts > 0 with a claim time) take it over.

Revision ID: 0009
Revises: 0008
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("unsettled_since", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE outbox SET unsettled_since = claimed_at WHERE attempts > 0 "
        "AND claimed_at IS NOT NULL AND status IN ('queued', 'deferred', 'sending')"
    )


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("unsettled_since")
