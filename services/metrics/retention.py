"""Bounded deduplication: counted event ids older than the retention are deleted.

`seen_events` holds one row per counted event so that a redelivered or replayed event counts
once. Kept forever, it would grow with every event ever counted; an id is only needed while
the event can still come again, which is bounded by the topics' retention. Each id is kept
with a time at or after its event's (the newest of the events counted with it); the ids kept
with a time older than `seen_retention_days` are deleted every `seen_prune_interval_s`, a
chunk per transaction so that counting never waits long for the delete. Counting leaves out
the events older than the retention (handlers.on_events): their ids may be gone, and a
replay of them must not count them twice.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.metrics import periodic, store
from services.metrics.config import MetricsSettings
from shared.service import ServiceContext

log = logging.getLogger(__name__)

CHUNK = 10_000


async def prune_chunk(conn: AsyncConnection, before: datetime, limit: int = CHUNK) -> int:
    """Delete up to `limit` ids of events older than `before`; returns how many."""
    s = store.seen_events
    old = select(s.c.event_id).where(s.c.seen_at < before).limit(limit).scalar_subquery()
    result = await conn.execute(delete(s).where(s.c.event_id.in_(old)))
    return int(result.rowcount or 0)


async def prune_seen(ctx: ServiceContext, retention: timedelta, limit: int = CHUNK) -> int:
    """Delete every id of an event older than `retention`; returns how many."""
    before = ctx.clock.now() - retention
    total = 0
    while True:
        async with ctx.db.begin() as conn:
            deleted = await prune_chunk(conn, before, limit)
        total += deleted
        if deleted < limit:
            return total


async def run(ctx: ServiceContext, settings: MetricsSettings) -> None:
    """Prune now, then every `seen_prune_interval_s` of the service clock."""

    async def prune() -> None:
        deleted = await prune_seen(ctx, settings.seen_retention)
        if deleted:
            log.info("old counted event ids deleted", extra={"deleted": deleted})

    await periodic.every(
        ctx, settings.seen_prune_interval_s, prune, "deleting old counted event ids"
    )
