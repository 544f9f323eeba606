"""The outbox's idempotency key is unique per patient: UNIQUE (patient_id, idempotency_key)
instead of UNIQUE (idempotency_key).

The two say the same thing. A planned row's key is a hash of its patient's external id
(with the campaign, anchor and offset), a patient's external id never changes and names one
patient row, so two rows with the same key have the same patient; a program reply's key
names the inbound message it answers, which is stored once. But an index on the key alone
takes every new row at a random place, and a planner's rows then dirty about one page of it
each; ordered by patient, as planners write them, they go in at the end.

On SQLite a table's UNIQUE constraint cannot be dropped in place: the table is rebuilt
(engine.store.db runs migrations with SQLite's foreign keys off, and checks them before
commit: scheduling_links points at the outbox).

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ("uq_outbox_idempotency_key", ["idempotency_key"])
NEW = ("uq_outbox_patient_id_idempotency_key", ["patient_id", "idempotency_key"])


def upgrade() -> None:
    _swap(drop=OLD, create=NEW)


def downgrade() -> None:
    _swap(drop=NEW, create=OLD)


def _swap(*, drop: tuple[str, list[str]], create: tuple[str, list[str]]) -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.create_unique_constraint(*create)
        batch.drop_constraint(drop[0], type_="unique")
