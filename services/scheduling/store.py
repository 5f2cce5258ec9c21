"""Scheduling's tables (schema `scheduling`): promotions, policies, the durable timers
(`touches`, one row per touch), per-user state and contact history, and the outbox."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    text,
)

from shared.db import UtcDateTime
from shared.outbox import outbox_table

SCHEMA = "scheduling"
metadata = MetaData(schema=SCHEMA)

promotions = Table(
    "promotions",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("name", String(256), nullable=False),
    Column("policy", String(64), nullable=False),
    Column("ended_at", UtcDateTime(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("policy_version", Integer, nullable=False, server_default=text("1")),
    Column("cancelled_at", UtcDateTime(), nullable=True),
)

# Every version of every policy; a promotion records the version it was planned with.
policies = Table(
    "policies",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("body", JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

# The durable timers: status planned -> dispatched -> sent | failed, or suppressed / cancelled.
# On PostgreSQL the touch id has no index of its own (migrations 0003 and 0005): it is unique
# by construction and planning claims each participant once (`plan_members`); every lookup by
# id also names the user, and goes through (user_id, due_at). An index on a random id cost
# more than the row itself to plan. SQLite keeps a primary key on it. A promotion's touches
# are found through its participants in `plan_members` (no index by promotion to write).
touches = Table(
    "touches",
    metadata,
    Column("touch_id", String(64), nullable=False),
    Column("promotion_id", String(128), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("wave", String(16), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("variant", String(32), nullable=True),
    Column("due_at", UtcDateTime(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(32), nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("planned_due_at", UtcDateTime(), nullable=True),
    Column("deadline", UtcDateTime(), nullable=True),
    Column("rank", SmallInteger, nullable=False, server_default=text("0")),
    Column("parallel", SmallInteger, nullable=False, server_default=text("1")),
    Column("coupon", Boolean, nullable=False, server_default=text("false")),
    Column("essential", Boolean, nullable=False, server_default=text("false")),
    Column("channel_order", String(64), nullable=False, server_default=""),
    Column("segment", String(32), nullable=True),
    Column("deferrals", Integer, nullable=False, server_default=text("0")),
    Column("deferred_s", Float, nullable=False, server_default=text("0")),
    Column("dispatched_at", UtcDateTime(), nullable=True),
    Index("ix_touches_user", "user_id", "due_at"),
    Index(
        "ix_touches_due",
        "due_at",
        postgresql_where=text("status = 'planned'"),
        sqlite_where=text("status = 'planned'"),
    ),
)

# Which participants were planned already: a redelivered audience event plans nothing twice.
plan_members = Table(
    "plan_members",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("user_id", String(128), primary_key=True),
)

# What scheduling knows of a user: timezone and consent (user.updated), erasure, fatigue.
users = Table(
    "users",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("timezone", String(64), nullable=False, server_default="UTC"),
    Column("consent", JSON, nullable=True),
    Column("erased_at", UtcDateTime(), nullable=True),
    Column("fatigue", String(16), nullable=False, server_default="normal"),
    Column("paused", JSON, nullable=True),
    Column("unanswered", Integer, nullable=False, server_default=text("0")),
    Column("last_engaged_at", UtcDateTime(), nullable=True),
    Column("first_seen_at", UtcDateTime(), nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

fatigue_history = Table(
    "fatigue_history",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("user_id", String(128), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("signal", String(32), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("from_state", String(96), nullable=False),
    Column("to_state", String(96), nullable=False),
    Index("ix_fatigue_history_user", "user_id", "id"),
)

# Contact history across every promotion: a slot is reserved when touch.due is emitted,
# confirmed by delivery.sent and released by delivery.failed.
contacts = Table(
    "contacts",
    metadata,
    Column("touch_id", String(64), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("promotion_id", String(128), nullable=True),
    Column("wave", String(16), nullable=True),
    Column("status", String(16), nullable=False),
    Index("ix_contacts_user_at", "user_id", "at"),
)

outbox = outbox_table(metadata)
