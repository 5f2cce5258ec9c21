"""Delivery's tables (schema `delivery`)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

from shared.db import UtcDateTime
from shared.outbox import outbox_table

SCHEMA = "delivery"
metadata = MetaData(schema=SCHEMA)

# One row per touch. `status`: sending (the call on `channel` is recorded and may be
# under way: after a crash it is repeated with the same Idempotency-Key), sent, failed.
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
    Column("variant", String(64), nullable=True),
    Column("reason", String(32), nullable=True),
    Column("detail", String(500), nullable=True),
    Column("cost", Float, nullable=True),
    Column("provider_message_id", String(256), nullable=True),
    Column("coupon_code", String(32), nullable=True),
    # Channels that failed for this touch, in order (the fallback goes past them).
    Column("tried", JSON, nullable=True),
    Column("due_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=True),
    Index("ix_deliveries_user", "user_id", "updated_at"),
    Index("ux_deliveries_coupon", "coupon_code", unique=True),
)

# The extra channels of a parallel touch (`TouchDue.parallel` > 1): lane 0 is the
# `deliveries` row, lanes 1.. are here, each its own call with its own fallback and its
# own Idempotency-Key (`<touch id>:<channel>`). Statuses as in `deliveries`.
parallel_sends = Table(
    "parallel_sends",
    metadata,
    Column("touch_id", String(64), primary_key=True),
    Column("lane", Integer, primary_key=True),
    Column("channel", String(16), nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("reason", String(32), nullable=True),
    Column("cost", Float, nullable=True),
    Column("provider_message_id", String(256), nullable=True),
    Column("coupon_code", String(32), nullable=True),
    Column("tried", JSON, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Delivery's own copy of each user's contact state, from `user.updated` / `user.erased`.
contacts = Table(
    "contacts",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("addresses", JSON, nullable=False),
    Column("consent", JSON, nullable=False),
    Column("erased", Boolean, nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Spend per promotion and channel, including calls under way (refunded if they fail).
spend = Table(
    "spend",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("channel", String(16), primary_key=True),
    Column("spent", Float, nullable=False),
    Column("sent", Integer, nullable=False),
)

# Final outcome of provider calls per channel, for the success rate.
channel_stats = Table(
    "channel_stats",
    metadata,
    Column("channel", String(16), primary_key=True),
    Column("accepted", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
)

# One engagement per (touch, kind): a receipt posted twice is recorded once.
receipts = Table(
    "receipts",
    metadata,
    Column("touch_id", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("received_at", UtcDateTime(), nullable=False),
)

outbox = outbox_table(metadata)
