"""one live copy per (storage, path)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

A path on a storage is held by at most one live replica (state not DELETED or LOST): a unique
partial index enforces it for every writer. A catalogue that already holds such duplicates
(possible before this revision) is refused with the first few of them named, and is left as it
was; the operator settles them (expire or delete one of each pair) and runs `dlm init` again.
"""

import sqlalchemy as sa
from alembic import op

from lifecycle.errors import ConflictError

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_LIVE = sa.text("state NOT IN ('DELETED', 'LOST')")


def upgrade() -> None:
    conn = op.get_bind()
    dups = conn.execute(
        sa.text(
            "SELECT s.name, r.path, count(*) AS n FROM replica r JOIN storage s ON s.id = r.storage_id "
            "WHERE r.state NOT IN ('DELETED', 'LOST') "
            "GROUP BY s.name, r.storage_id, r.path HAVING count(*) > 1 ORDER BY s.name, r.path LIMIT 6"
        )
    ).all()
    if dups:
        shown = ", ".join(f"{path!r} on {name!r} ({n} copies)" for name, path, n in dups[:5])
        more = " and more" if len(dups) > 5 else ""
        raise ConflictError(
            "cannot upgrade the catalogue: some paths are held by more than one live copy, "
            f"so deleting one would delete the other's bytes: {shown}{more}; "
            "expire or delete all but one item of each, then run `dlm init` again"
        )
    op.create_index(
        "uq_replica_storage_path_live",
        "replica",
        ["storage_id", "path"],
        unique=True,
        sqlite_where=_LIVE,
        postgresql_where=_LIVE,
    )


def downgrade() -> None:
    op.drop_index(
        "uq_replica_storage_path_live", table_name="replica", sqlite_where=_LIVE, postgresql_where=_LIVE
    )
