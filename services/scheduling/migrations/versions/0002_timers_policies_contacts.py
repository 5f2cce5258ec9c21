"""Policies, durable timer columns, participants planned, user state, fatigue history and
contact history.

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

SCHEMA = "scheduling"
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("promotions", schema=SCHEMA) as batch:
        batch.add_column(
            sa.Column("policy_version", sa.Integer, nullable=False, server_default=sa.text("1"))
        )
        batch.add_column(sa.Column("cancelled_at", TS, nullable=True))
    op.create_table(
        "policies",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("body", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        schema=SCHEMA,
    )
    with op.batch_alter_table("touches", schema=SCHEMA) as batch:
        batch.add_column(sa.Column("planned_due_at", TS, nullable=True))
        batch.add_column(sa.Column("deadline", TS, nullable=True))
        batch.add_column(
            sa.Column("rank", sa.SmallInteger, nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(
            sa.Column("parallel", sa.SmallInteger, nullable=False, server_default=sa.text("1"))
        )
        batch.add_column(
            sa.Column("coupon", sa.Boolean, nullable=False, server_default=sa.text("false"))
        )
        batch.add_column(
            sa.Column("essential", sa.Boolean, nullable=False, server_default=sa.text("false"))
        )
        batch.add_column(
            sa.Column("channel_order", sa.String(64), nullable=False, server_default="")
        )
        batch.add_column(sa.Column("segment", sa.String(32), nullable=True))
        batch.add_column(
            sa.Column("deferrals", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(
            sa.Column("deferred_s", sa.Float, nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("dispatched_at", TS, nullable=True))
    op.create_index(
        "ix_touches_due",
        "touches",
        ["due_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'planned'"),
        sqlite_where=sa.text("status = 'planned'"),
    )
    op.create_table(
        "plan_members",
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("user_id", sa.String(128), primary_key=True),
        schema=SCHEMA,
    )
    op.create_table(
        "users",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"),
        sa.Column("consent", sa.JSON, nullable=True),
        sa.Column("erased_at", TS, nullable=True),
        sa.Column("fatigue", sa.String(16), nullable=False, server_default="normal"),
        sa.Column("paused", sa.JSON, nullable=True),
        sa.Column("unanswered", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_engaged_at", TS, nullable=True),
        sa.Column("first_seen_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        schema=SCHEMA,
    )
    op.create_table(
        "fatigue_history",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("signal", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(16), nullable=True),
        sa.Column("from_state", sa.String(96), nullable=False),
        sa.Column("to_state", sa.String(96), nullable=False),
        schema=SCHEMA,
    )
    op.create_index("ix_fatigue_history_user", "fatigue_history", ["user_id", "id"], schema=SCHEMA)
    op.create_table(
        "contacts",
        sa.Column("touch_id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("promotion_id", sa.String(128), nullable=True),
        sa.Column("wave", sa.String(16), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        schema=SCHEMA,
    )
    op.create_index("ix_contacts_user_at", "contacts", ["user_id", "at"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_table("contacts", schema=SCHEMA)
    op.drop_table("fatigue_history", schema=SCHEMA)
    op.drop_table("users", schema=SCHEMA)
    op.drop_table("plan_members", schema=SCHEMA)
    op.drop_index("ix_touches_due", table_name="touches", schema=SCHEMA)
    with op.batch_alter_table("touches", schema=SCHEMA) as batch:
        for name in (
            "dispatched_at",
            "deferred_s",
            "deferrals",
            "segment",
            "channel_order",
            "essential",
            "coupon",
            "parallel",
            "rank",
            "deadline",
            "planned_due_at",
        ):
            batch.drop_column(name)
    op.drop_table("policies", schema=SCHEMA)
    with op.batch_alter_table("promotions", schema=SCHEMA) as batch:
        batch.drop_column("cancelled_at")
        batch.drop_column("policy_version")
