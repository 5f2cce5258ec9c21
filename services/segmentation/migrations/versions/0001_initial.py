"""Participants, audience emission state and the outbox.

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

SCHEMA = "segmentation"


def upgrade() -> None:
    op.create_table(
        "participants",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "audiences",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cursor", sa.String(128), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        schema=SCHEMA,
    )
    create_outbox(SCHEMA, packs=False)


def downgrade() -> None:
    op.drop_table("outbox", schema=SCHEMA)
    op.drop_table("audiences", schema=SCHEMA)
    op.drop_table("participants", schema=SCHEMA)
