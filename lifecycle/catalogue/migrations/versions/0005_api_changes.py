"""event kinds of changes made through the API and the CLI; an index for metadata filters

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Widens ck_event_kind with the kinds added since 0003 (`item.metadata_changed`,
`item.upload_aborted`, `replica.expiry_changed`, `storage.changed`): the constraint is replaced
by one listing every kind in KINDS below (SQLite: batch mode). On PostgreSQL it also adds
`ix_item_meta`, a GIN index (jsonb_path_ops) on item.meta, which the filter language uses for
`meta.KEY = 'text'` (lifecycle.catalogue.query_sql), so a selective metadata filter reads the
matching rows instead of every item.

The downgrade gives an event of a kind 0003 does not know the kind 'legacy.unknown', keeping
the kind in details["legacy_kind"] (as 0003 does), then restores 0003's constraint, and
drops the index.
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

KINDS = (
    "dataset.created",
    "dataset.deleted",
    "item.registered",
    "item.ready",
    "item.phase_changed",
    "item.expiry_changed",
    "item.metadata_changed",
    "item.expired",
    "item.deleted",
    "item.corrupted",
    "item.repaired",
    "item.checked_out",
    "item.upload_aborted",
    "replica.created",
    "replica.deleted",
    "replica.delete_failed",
    "replica.corrupted",
    "replica.lost",
    "replica.repaired",
    "replica.repair_failed",
    "replica.restored",
    "replica.expiry_changed",
    "transfer.failed",
    "storage.added",
    "storage.online",
    "storage.draining",
    "storage.offline",
    "storage.retired",
    "storage.drained",
    "storage.temp_removed",
    "storage.changed",
    "policy.refused",
    "reconcile.link_skipped",
    "legacy.unknown",
)
ADDED = ("item.metadata_changed", "item.upload_aborted", "replica.expiry_changed", "storage.changed")
LEGACY_UNKNOWN = "legacy.unknown"


def _in(kinds: tuple[str, ...]) -> str:
    return ", ".join(f"'{k}'" for k in kinds)


_DETAILS = {
    "postgresql": "CASE WHEN jsonb_typeof(details) = 'object' "
    "THEN details || jsonb_build_object('legacy_kind', kind) "
    "ELSE jsonb_build_object('legacy_kind', kind, 'details', details) END",
    "sqlite": "CASE WHEN json_type(details) = 'object' "
    "THEN json_set(details, '$.legacy_kind', kind) "
    "ELSE json_object('legacy_kind', kind, 'details', json(details)) END",
}


def _replace_constraint(kinds: tuple[str, ...]) -> None:
    with op.batch_alter_table("event") as batch:
        batch.drop_constraint("ck_event_kind", type_="check")
        batch.create_check_constraint("ck_event_kind", sa.text(f"kind IN ({_in(kinds)})"))


def upgrade() -> None:
    _replace_constraint(KINDS)
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_item_meta",
            "item",
            ["meta"],
            postgresql_using="gin",
            postgresql_ops={"meta": "jsonb_path_ops"},
        )


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        op.drop_index("ix_item_meta", table_name="item")
    conn.execute(
        sa.text(
            f"UPDATE event SET kind = :legacy, details = {_DETAILS[conn.dialect.name]} "
            f"WHERE kind IN ({_in(ADDED)})"
        ),
        {"legacy": LEGACY_UNKNOWN},
    )
    _replace_constraint(tuple(k for k in KINDS if k not in ADDED))
