"""Metrics' tables (schema `metrics`)."""

from __future__ import annotations

from typing import get_args, get_type_hints

from sqlalchemy import BigInteger, Column, Float, Index, MetaData, String, Table, Text

from shared.db import UtcDateTime
from shared.events import EngagementRecorded, Reason
from shared.outbox import outbox_table

SCHEMA = "metrics"
metadata = MetaData(schema=SCHEMA)

# Every counted event id, so that a redelivered or replayed event counts once; deleted once
# seen_at is older than the retention (services/metrics/retention.py). seen_at, the newest
# event time of the transaction that counted the id (at or after the event's own), grows
# nearly with insertion order, so a BRIN index (a few pages) finds the old ones at almost no
# cost per insert.
seen_events = Table(
    "seen_events",
    metadata,
    Column("event_id", String(64), primary_key=True),
    Column("seen_at", UtcDateTime(), nullable=False),
    Index("ix_seen_events_seen_at", "seen_at", postgresql_using="brin"),
)

# Every measure counted, by name. A touch's suppression counts as `suppressed.<reason>`.
SUPPRESSION_REASONS: tuple[str, ...] = get_args(Reason)
MEASURES: tuple[str, ...] = (
    "planned",
    "ltv",
    "ltv_touches",
    "sends",
    "sent",
    "cost",
    "failed",
    *get_args(get_type_hints(EngagementRecorded)["kind"]),
    "orders",
    "revenue",
    "converted",
    "holdout_orders",
    "holdout_revenue",
    "holdout_converted",
    *(f"suppressed.{reason}" for reason in SUPPRESSION_REASONS),
)


def measure_column(measure: str) -> str:
    """The `minute_counts` column of a measure ("suppressed.holdout" -> "suppressed_holdout")."""
    return measure.replace(".", "_")


# Per-minute aggregates: one row per promotion, minute and dimensions, one column per measure
# (the measures counted for the same touch at the same minute, such as sends, sent and cost,
# share one row: a third of the rows to write of a measure per row).
# "sent" counts a touch once (its first accepted send recorded, under that send's channel);
# "sends" counts every accepted channel send (a parallel touch sends on two channels).
# Touch measures are bucketed at the minute of their event; conversions, orders and
# revenue at the minute of the attributed exposure (cohort of the touch).
# Unknown dimensions are stored as "" (channel of a planned touch, a touch not yet planned).
# Rows are mostly added to (updated): on PostgreSQL pages are 80% full (migration 0008) so
# that an update stays on its row's page (HOT) and adds no index entry.
COUNT_KEY = ("promotion_id", "minute", "wave", "channel", "segment", "variant")
minute_counts = Table(
    "minute_counts",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("minute", UtcDateTime(), primary_key=True),
    Column("wave", String(16), primary_key=True),
    Column("channel", String(16), primary_key=True),
    Column("segment", String(64), primary_key=True),
    Column("variant", String(64), primary_key=True),
    *(Column(measure_column(m), Float, nullable=False, server_default="0") for m in MEASURES),
)

# What metrics knows of each touch: its dimensions and its attribution exposure.
# Most rows are updated after their insert (planned, then sent, opened, credited in later
# transactions): indexed on user_id alone, so that setting exposed_at changes no indexed
# column, and on PostgreSQL with pages 70% full (migration 0008), so that such an update
# stays on its page (HOT) and adds no index entry.
touches = Table(
    "touches",
    metadata,
    Column("touch_id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("promotion_id", String(128), nullable=False),
    Column("wave", String(16), nullable=False),
    Column("segment", String(64), nullable=True),
    Column("variant", String(64), nullable=False, server_default=""),
    Column("channel", String(16), nullable=False, server_default=""),
    # "sent" (a delivery) or "holdout" (suppressed for the holdout): what a purchase credits.
    Column("exposure", String(8), nullable=True),
    Column("exposed_at", UtcDateTime(), nullable=True),
    Column("orders", BigInteger, nullable=False, server_default="0"),
    # Accepted channel sends (a parallel touch has several): the touch counts as "sent" once.
    Column("sends", BigInteger, nullable=False, server_default="0"),
    # The participant's LTV once counted for this touch ("ltv", "ltv_touches"); None: not yet.
    Column("ltv", Float, nullable=True),
    # Counts made for the touch while its segment was unknown (its touch.planned came later),
    # counted under segment "" until then: a JSON list of [minute (minutes since the epoch),
    # channel, measure, value]; touch.planned moves them to its segment and clears this.
    # Kept in the row the counting writes anyway (migration 0009; was a table of its own).
    Column("pending", Text, nullable=True),
    Index("ix_touches_user", "user_id"),
    Index("ix_touches_promotion_wave", "promotion_id", "wave"),
)

# Each participant's LTV (segmentation's snapshot when the promotion ended, from the audience
# topic): counted once per planned touch of theirs, for the funnel's mean LTV and health index.
participants = Table(
    "participants",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("user_id", String(128), primary_key=True),
    Column("ltv", Float, nullable=False),
)

# Every purchase and the touch it is attributed to (None: no exposure within the window).
purchases = Table(
    "purchases",
    metadata,
    Column("activity_id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("amount", Float, nullable=False),
    Column("touch_id", String(128), nullable=True),
    Index("ix_purchases_user_occurred", "user_id", "occurred_at"),
)

# Business alerts (services/metrics/alerts.py): one row per series, metric and day that
# deviated, or per traffic light change; alert_id is derived from those, so evaluating
# again never raises an alert twice. status: open, or resolved (a later day of the series
# was evaluated; the promotion's light turned green or changed colour).
alerts = Table(
    "alerts",
    metadata,
    Column("alert_id", String(40), primary_key=True),
    Column("promotion_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),  # deviation or traffic_light
    Column("metric", String(32), nullable=False),
    Column("wave", String(16), nullable=False),  # "" for a promotion's traffic light
    Column("channel", String(16), nullable=False),
    Column("day", UtcDateTime(), nullable=False),
    Column("value", Float, nullable=True),
    Column("baseline", Float, nullable=True),
    Column("severity", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("message", String(512), nullable=False),
    Column("raised_at", UtcDateTime(), nullable=False),
    Column("resolved_at", UtcDateTime(), nullable=True),
    Index("ix_alerts_day", "day", "alert_id"),
    Index("ix_alerts_promotion", "promotion_id", "status"),
)

# Each promotion's traffic light as of its last evaluated day.
traffic_lights = Table(
    "traffic_lights",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("light", String(8), nullable=False),  # green, yellow, red
    Column("streak", BigInteger, nullable=False),  # days in a row under the baseline
    Column("day", UtcDateTime(), nullable=True),  # last complete day evaluated
    Column("conversion", Float, nullable=True),
    Column("baseline", Float, nullable=True),
    Column("updated_at", UtcDateTime(), nullable=False),
)

outbox = outbox_table(metadata)
