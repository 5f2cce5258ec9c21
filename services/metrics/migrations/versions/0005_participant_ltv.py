"""Participants' LTV (audience topic) for the funnel's mean LTV and the health index.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"


def upgrade() -> None:
    op.create_table(
        "participants",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("ltv", sa.Float, nullable=False),
        schema=SCHEMA,
    )
    op.add_column("touches", sa.Column("ltv", sa.Float, nullable=True), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("touches", "ltv", schema=SCHEMA)
    op.drop_table("participants", schema=SCHEMA)
