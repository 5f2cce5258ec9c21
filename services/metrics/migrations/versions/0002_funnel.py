"""Per-minute aggregates, touches, pending re-keys and purchases (attribution).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "minute_counts",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("minute", TS, primary_key=True),
        sa.Column("wave", sa.String(16), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("segment", sa.String(64), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
        sa.Column("measure", sa.String(48), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "touches",
        sa.Column("touch_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("promotion_id", sa.String(128), nullable=False),
        sa.Column("wave", sa.String(16), nullable=False),
        sa.Column("segment", sa.String(64), nullable=True),
        sa.Column("variant", sa.String(64), nullable=False, server_default=""),
        sa.Column("channel", sa.String(16), nullable=False, server_default=""),
        sa.Column("exposure", sa.String(8), nullable=True),
        sa.Column("exposed_at", TS, nullable=True),
        sa.Column("orders", sa.BigInteger, nullable=False, server_default="0"),
        schema=SCHEMA,
    )
    op.create_index("ix_touches_user_exposed", "touches", ["user_id", "exposed_at"], schema=SCHEMA)
    op.create_table(
        "pending",
        sa.Column("touch_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("minute", TS, nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("measure", sa.String(48), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "purchases",
        sa.Column("activity_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("occurred_at", TS, nullable=False),
        sa.Column("amount", sa.Float, nullable=False),
        sa.Column("touch_id", sa.String(128), nullable=True),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_purchases_user_occurred", "purchases", ["user_id", "occurred_at"], schema=SCHEMA
    )
    op.drop_table("wave_counts", schema=SCHEMA)


def downgrade() -> None:
    op.create_table(
        "wave_counts",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("wave", sa.String(16), primary_key=True),
        sa.Column("measure", sa.String(32), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
        schema=SCHEMA,
    )
    op.drop_index("ix_purchases_user_occurred", table_name="purchases", schema=SCHEMA)
    op.drop_table("purchases", schema=SCHEMA)
    op.drop_table("pending", schema=SCHEMA)
    op.drop_index("ix_touches_user_exposed", table_name="touches", schema=SCHEMA)
    op.drop_table("touches", schema=SCHEMA)
    op.drop_table("minute_counts", schema=SCHEMA)
