"""The extra channels of a parallel touch (TouchDue.parallel > 1).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "delivery"


def upgrade() -> None:
    op.create_table(
        "parallel_sends",
        sa.Column("touch_id", sa.String(64), primary_key=True),
        sa.Column("lane", sa.Integer, primary_key=True),
        sa.Column("channel", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("cost", sa.Float, nullable=True),
        sa.Column("provider_message_id", sa.String(256), nullable=True),
        sa.Column("coupon_code", sa.String(32), nullable=True),
        sa.Column("tried", sa.JSON, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("parallel_sends", schema=SCHEMA)
