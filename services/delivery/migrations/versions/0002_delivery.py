"""Delivery state per touch, contacts, spend, channel stats and receipts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "delivery"

NEW_DELIVERY_COLUMNS = (
    ("variant", sa.String(64)),
    ("reason", sa.String(32)),
    ("detail", sa.String(500)),
    ("cost", sa.Float),
    ("provider_message_id", sa.String(256)),
    ("coupon_code", sa.String(32)),
    ("tried", sa.JSON),
    ("due_at", sa.DateTime(timezone=True)),
    ("created_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    for name, type_ in NEW_DELIVERY_COLUMNS:
        op.add_column("deliveries", sa.Column(name, type_, nullable=True), schema=SCHEMA)
    op.create_index(
        "ux_deliveries_coupon", "deliveries", ["coupon_code"], unique=True, schema=SCHEMA
    )
    op.create_table(
        "contacts",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("addresses", sa.JSON, nullable=False),
        sa.Column("consent", sa.JSON, nullable=False),
        sa.Column("erased", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "spend",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("spent", sa.Float, nullable=False),
        sa.Column("sent", sa.Integer, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "channel_stats",
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("accepted", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "receipts",
        sa.Column("touch_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("receipts", schema=SCHEMA)
    op.drop_table("channel_stats", schema=SCHEMA)
    op.drop_table("spend", schema=SCHEMA)
    op.drop_table("contacts", schema=SCHEMA)
    op.drop_index("ux_deliveries_coupon", table_name="deliveries", schema=SCHEMA)
    for name, _ in reversed(NEW_DELIVERY_COLUMNS):
        op.drop_column("deliveries", name, schema=SCHEMA)
