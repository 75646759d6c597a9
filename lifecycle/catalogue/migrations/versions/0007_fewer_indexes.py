"""drop indexes no query uses, so each registered item costs fewer index writes

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

Every registered item writes an item, a replica and an event row, and each index on those
tables is one more write per row. Two indexes answered no query:

- `ix_event_ts` (event.ts): events are read by item (`ix_event_item`), storage
  (`ix_event_storage`) or id, never by time. Dropped on every database.
- `ix_replica_verified` (replica.verified_at), on PostgreSQL: verify reads the copies oldest
  `verified_at` first with never-verified ones first (`ORDER BY verified_at ASC NULLS FIRST,
  uid`), an order a plain ascending PostgreSQL index (NULLs last) cannot give, so PostgreSQL
  sorts either way. SQLite puts NULLs first in an ascending index and walks it for that order:
  it keeps the index.

The downgrade creates them again.
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_event_ts", table_name="event")
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_replica_verified", table_name="replica")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index("ix_replica_verified", "replica", ["verified_at"], unique=False)
    op.create_index("ix_event_ts", "event", ["ts"], unique=False)
