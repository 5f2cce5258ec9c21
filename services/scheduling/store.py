"""Scheduling's tables (schema `scheduling`)."""

from __future__ import annotations

from sqlalchemy import Column, Index, MetaData, String, Table

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
)

touches = Table(
    "touches",
    metadata,
    Column("touch_id", String(64), primary_key=True),
    Column("promotion_id", String(128), nullable=False),
    Column("user_id", String(128), nullable=False),
    Column("wave", String(16), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("variant", String(32), nullable=True),
    Column("due_at", UtcDateTime(), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(32), nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_touches_user", "user_id", "due_at"),
    Index("ix_touches_promotion", "promotion_id", "wave", "status"),
)

outbox = outbox_table(metadata)
