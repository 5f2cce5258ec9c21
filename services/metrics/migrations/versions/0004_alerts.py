"""Business alerts and each promotion's traffic light.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("alert_id", sa.String(40), primary_key=True),
        sa.Column("promotion_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("wave", sa.String(16), nullable=False),
        sa.Column("channel", sa.String(16), nullable=False),
        sa.Column("day", TS, nullable=False),
        sa.Column("value", sa.Float, nullable=True),
        sa.Column("baseline", sa.Float, nullable=True),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.String(512), nullable=False),
        sa.Column("raised_at", TS, nullable=False),
        sa.Column("resolved_at", TS, nullable=True),
        schema=SCHEMA,
    )
    op.create_index("ix_alerts_day", "alerts", ["day", "alert_id"], schema=SCHEMA)
    op.create_index("ix_alerts_promotion", "alerts", ["promotion_id", "status"], schema=SCHEMA)
    op.create_table(
        "traffic_lights",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("light", sa.String(8), nullable=False),
        sa.Column("streak", sa.BigInteger, nullable=False),
        sa.Column("day", TS, nullable=True),
        sa.Column("conversion", sa.Float, nullable=True),
        sa.Column("baseline", sa.Float, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("traffic_lights", schema=SCHEMA)
    op.drop_index("ix_alerts_promotion", table_name="alerts", schema=SCHEMA)
    op.drop_index("ix_alerts_day", table_name="alerts", schema=SCHEMA)
    op.drop_table("alerts", schema=SCHEMA)
