"""Segmentation's tables (schema `segmentation`)."""

from __future__ import annotations

from sqlalchemy import Column, MetaData, String, Table

from shared.db import UtcDateTime
from shared.outbox import outbox_table

SCHEMA = "segmentation"
metadata = MetaData(schema=SCHEMA)

participants = Table(
    "participants",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("user_id", String(128), primary_key=True),
    Column("added_at", UtcDateTime(), nullable=False),
)

# One row per ended promotion whose audience is being (or was) emitted; the
# cursor moves in the same transaction as each chunk's outbox rows, so a crash
# resumes where it stopped instead of emitting twice or skipping.
audiences = Table(
    "audiences",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("policy", String(64), nullable=False),
    Column("ended_at", UtcDateTime(), nullable=False),
    Column("cursor", String(128), nullable=True),
    Column("completed_at", UtcDateTime(), nullable=True),
)

outbox = outbox_table(metadata)
