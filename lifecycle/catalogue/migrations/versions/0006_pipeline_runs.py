"""The log of pipeline runs

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

`pipeline_run` (lifecycle.catalogue.run_log): one row per finished run of a pipeline, with its
outcome and duration, for GET /metrics and the operator dashboard. A new table only: an
existing catalogue upgrades without touching its rows.
"""

import sqlalchemy as sa
from alembic import op

import lifecycle.catalogue.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "pipeline_run",
        sa.Column("id", big, nullable=False),
        sa.Column("pipeline", sa.String(length=32), nullable=False),
        sa.Column("partition", sa.String(length=32), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("started_at", lifecycle.catalogue.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", lifecycle.catalogue.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("copied", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("bytes_moved", big, nullable=False),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.CheckConstraint("outcome IN ('completed', 'failed')", name="ck_pipeline_run_outcome"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_pipeline_run_finished", "pipeline_run", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_pipeline_run_finished", table_name="pipeline_run")
    op.drop_table("pipeline_run")
