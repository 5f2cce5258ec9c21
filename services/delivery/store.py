"""Delivery's tables (schema `delivery`)."""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table

from shared.db import UtcDateTime
from shared.outbox import outbox_table

SCHEMA = "delivery"
metadata = MetaData(schema=SCHEMA)

deliveries = Table(
    "deliveries",
    metadata,
    Column("touch_id", String(64), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("promotion_id", String(128), nullable=False),
    Column("wave", String(16), nullable=False),
    Column("channel", String(16), nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Index("ix_deliveries_user", "user_id", "updated_at"),
)

outbox = outbox_table(metadata)
