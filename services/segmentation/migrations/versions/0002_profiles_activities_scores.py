"""Profiles, erasures, activities, aggregates, monthly buckets, engagement, scores.

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

SCHEMA = "segmentation"


def _ts(name: str, nullable: bool = False) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("birth_year", sa.Integer, nullable=True),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("locale", sa.String(35), nullable=True),
        sa.Column("addresses", sa.JSON, nullable=False),
        sa.Column("consent", sa.JSON, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        schema=SCHEMA,
    )
    op.create_table(
        "erasures",
        sa.Column("user_id", sa.String(128), primary_key=True),
        _ts("erased_at"),
        schema=SCHEMA,
    )
    op.create_table(
        "activities",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        _ts("occurred_at"),
        sa.Column("amount", sa.Float, nullable=True),
        sa.Column("currency", sa.String(3), nullable=True),
        sa.Column("item_id", sa.String(128), nullable=True),
        sa.Column("category", sa.String(128), nullable=True),
        sa.Column("promotion_id", sa.String(128), nullable=True),
        _ts("recorded_at"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_activities_user_time", "activities", ["user_id", "occurred_at"], schema=SCHEMA
    )
    op.create_table(
        "aggregates",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("purchases", sa.Integer, nullable=False),
        sa.Column("visits", sa.Integer, nullable=False),
        sa.Column("monetary", sa.Float, nullable=False),
        sa.Column("ltv", sa.Float, nullable=False),
        _ts("last_purchase_at", nullable=True),
        _ts("last_interaction_at", nullable=True),
        sa.Column("abuse_review", sa.Boolean, nullable=False),
        _ts("updated_at"),
        schema=SCHEMA,
    )
    op.create_table(
        "user_months",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("month", sa.Date, primary_key=True),
        sa.Column("amount", sa.Float, nullable=False),
        sa.Column("purchases", sa.Integer, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "channel_engagement",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("opens", sa.Integer, nullable=False),
        sa.Column("clicks", sa.Integer, nullable=False),
        _ts("last_at"),
        schema=SCHEMA,
    )
    op.create_table(
        "engagements_seen",
        sa.Column("touch_id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        schema=SCHEMA,
    )
    op.create_table(
        "user_scores",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("r", sa.SmallInteger, nullable=False),
        sa.Column("f", sa.SmallInteger, nullable=False),
        sa.Column("m", sa.SmallInteger, nullable=False),
        sa.Column("value_layer", sa.String(8), nullable=False),
        sa.Column("ltv", sa.Float, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "scoring_state",
        sa.Column("id", sa.Integer, primary_key=True),
        _ts("scored_at", nullable=True),
        sa.Column("users", sa.Integer, nullable=False),
        sa.Column("cuts", sa.JSON, nullable=True),
        sa.Column("ltv_window_start", sa.Date, nullable=True),
        sa.Column("seconds", sa.Float, nullable=True),
        schema=SCHEMA,
    )


def downgrade() -> None:
    for table in (
        "scoring_state",
        "user_scores",
        "engagements_seen",
        "channel_engagement",
        "user_months",
        "aggregates",
    ):
        op.drop_table(table, schema=SCHEMA)
    op.drop_index("ix_activities_user_time", table_name="activities", schema=SCHEMA)
    for table in ("activities", "erasures", "users"):
        op.drop_table(table, schema=SCHEMA)
