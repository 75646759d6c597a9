"""API tokens

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

The `token` table of the REST API (lifecycle.catalogue.tokens): an id, the owner the token acts
as, an admin flag, when it was created and revoked, and the SHA-256 of its secret (never the
secret itself). Chained after 0002 on its branch; 0003 (event kinds) comes first when merged.
"""

import sqlalchemy as sa
import sqlmodel
from alembic import op

import lifecycle.catalogue.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token",
        sa.Column("id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("owner", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("secret_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("created_at", lifecycle.catalogue.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", lifecycle.catalogue.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("uq_token_hash", "token", ["secret_sha256"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_token_hash", table_name="token")
    op.drop_table("token")
