"""Metrics' tables (schema `metrics`)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, MetaData, String, Table

from shared.db import UtcDateTime
from shared.outbox import outbox_table

SCHEMA = "metrics"
metadata = MetaData(schema=SCHEMA)

# Every counted event id, so that a redelivered or replayed event counts once.
seen_events = Table(
    "seen_events",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("seen_at", UtcDateTime(), nullable=False),
)

wave_counts = Table(
    "wave_counts",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("wave", String(16), primary_key=True),
    Column("measure", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

outbox = outbox_table(metadata)
