"""Bounded deduplication: the metrics service deletes the counted event ids older than its
retention (`AFTERGLOW_METRICS_SEEN_RETENTION_DAYS`), keeps the younger ones, and a
redelivery within the retention still counts once; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from services.metrics import store
from tests.integration.metrics_harness import Metrics, running_metrics
from tests.integration.test_metrics_api import funnel_rows, out
from tests.integration.test_metrics_exactness import T0, planned

TOKEN = "t-admin"


@pytest.fixture(params=["sqlite", "postgres"])
async def metrics(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Metrics]:
    async with running_metrics(
        request, tmp_path, unique, start=T0, tokens={TOKEN: frozenset({"*"})}
    ) as m:
        yield m


async def seen_ids(m: Metrics) -> set[str]:
    async with m.app.state.ctx.db.connect() as conn:
        rows = await conn.execute(select(store.seen_events.c.event_id))
        return {r[0] for r in rows.all()}


async def eventually(m: Metrics, want: set[str]) -> None:
    deadline = time.monotonic() + 20
    while (got := await seen_ids(m)) != want:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.05)


async def test_old_counted_ids_are_deleted_and_neither_old_nor_young_counts_twice(
    metrics: Metrics,
) -> None:
    day = timedelta(days=1)
    old = planned("t-old", "u-1", "high", "A")
    young = planned("t-young", "u-2", "high", "A", at=T0 + 20 * day)
    await metrics.bus.publish([out(old)])
    await eventually(metrics, {old.id})
    metrics.clock.advance(20 * day)
    await metrics.bus.publish([out(young)])
    await eventually(metrics, {old.id, young.id})

    # 31 days after the first event (default retention 30 days), 11 after the second:
    # moving the clock wakes the pruning, which deletes the first id only.
    metrics.clock.advance(11 * day)
    await eventually(metrics, {young.id})

    # Both redelivered: the young one is still known and counts once; the old one's id is
    # gone, and it is older than the retention, so it is left out rather than counted again.
    # A new event after them on each partition (same users) shows when they have been handled.
    now = T0 + 31 * day
    after = [planned(f"t-after-{u}", u, "high", "A", at=now) for u in ("u-1", "u-2")]
    await metrics.bus.publish([out(young), out(old), *(out(a) for a in after)])
    await eventually(metrics, {young.id, *(a.id for a in after)})
    rows = await funnel_rows(metrics.client)
    assert [r["planned"] for r in rows] == [4]
    exposition = (await metrics.client.get("/metrics")).text
    assert 'afterglow_metrics_stale_events_total{type="' + old.type + '"} 1.0' in exposition, (
        exposition
    )
