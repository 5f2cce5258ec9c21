"""Seen events, per-wave counts and the outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.migrations import create_outbox

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"


def upgrade() -> None:
    op.create_table(
        "seen_events",
        sa.Column("event_id", sa.String(64), primary_key=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "wave_counts",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("wave", sa.String(16), primary_key=True),
        sa.Column("measure", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )
    create_outbox(SCHEMA, packs=False)


def downgrade() -> None:
    op.drop_table("outbox", schema=SCHEMA)
    op.drop_table("wave_counts", schema=SCHEMA)
    op.drop_table("seen_events", schema=SCHEMA)
