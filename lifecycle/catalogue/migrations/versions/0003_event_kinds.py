"""the database admits only known event kinds

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Adds the CHECK constraint ck_event_kind on event.kind (SQLite: batch mode, which copies the event
table into a new one with the constraint). The kinds are frozen here as this revision knows them;
a later revision that adds a kind replaces the constraint with its own list.

An existing catalogue can only hold kinds from this list: every kind any DLM version has written
is still an EventKind (none was renamed or dropped before this revision). An event of any other
kind (a hand-written row, a development build) does not stop the upgrade and is not dropped: it
becomes 'legacy.unknown' with its old kind kept in details["legacy_kind"] (details that were not
an object are kept under details["details"]). The downgrade drops the constraint only; such
events keep 'legacy.unknown'.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

KINDS = (
    "dataset.created",
    "dataset.deleted",
    "item.registered",
    "item.ready",
    "item.phase_changed",
    "item.expiry_changed",
    "item.expired",
    "item.deleted",
    "item.corrupted",
    "item.repaired",
    "item.checked_out",
    "replica.created",
    "replica.deleted",
    "replica.delete_failed",
    "replica.corrupted",
    "replica.lost",
    "replica.repaired",
    "replica.repair_failed",
    "replica.restored",
    "transfer.failed",
    "storage.added",
    "storage.online",
    "storage.draining",
    "storage.offline",
    "storage.retired",
    "storage.drained",
    "storage.temp_removed",
    "policy.refused",
    "reconcile.link_skipped",
    "legacy.unknown",
)
LEGACY_UNKNOWN = "legacy.unknown"

_KNOWN = ", ".join(f"'{k}'" for k in KINDS)

# the new details of an event of an unknown kind (the right-hand side sees the row's old values)
_DETAILS = {
    "postgresql": "CASE WHEN jsonb_typeof(details) = 'object' "
    "THEN details || jsonb_build_object('legacy_kind', kind) "
    "ELSE jsonb_build_object('legacy_kind', kind, 'details', details) END",
    "sqlite": "CASE WHEN json_type(details) = 'object' "
    "THEN json_set(details, '$.legacy_kind', kind) "
    "ELSE json_object('legacy_kind', kind, 'details', json(details)) END",
}


def upgrade() -> None:
    conn = op.get_bind()
    conn.execute(
        sa.text(
            f"UPDATE event SET kind = :legacy, details = {_DETAILS[conn.dialect.name]} "
            f"WHERE kind NOT IN ({_KNOWN})"
        ),
        {"legacy": LEGACY_UNKNOWN},
    )
    with op.batch_alter_table("event") as batch:
        batch.create_check_constraint("ck_event_kind", sa.text(f"kind IN ({_KNOWN})"))


def downgrade() -> None:
    with op.batch_alter_table("event") as batch:
        batch.drop_constraint("ck_event_kind", type_="check")
