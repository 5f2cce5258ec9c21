"""Deliveries and the outbox.

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

SCHEMA = "delivery"


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("touch_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("promotion_id", sa.String(128), nullable=False),
        sa.Column("wave", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_index("ix_deliveries_user", "deliveries", ["user_id", "updated_at"], schema=SCHEMA)
    create_outbox(SCHEMA, packs=False)


def downgrade() -> None:
    op.drop_table("outbox", schema=SCHEMA)
    op.drop_table("deliveries", schema=SCHEMA)
