"""Metrics' migration 0009: counts that were waiting for a touch's segment in the `pending`
table before the upgrade still move to that segment when its touch.planned comes after."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from services.metrics import handlers, queries, store
from shared.db import Database
from shared.events import Event, TouchPlanned
from shared.migrations import downgrade_async, upgrade_async
from tests.conftest import fresh_database

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


async def sent_before_planned(
    conn: Any, minute: datetime, channel: str, counts: tuple[tuple[str, float], ...]
) -> None:
    """Touch t1 as 0008's counting left a send counted before its touch.planned: its row
    without a segment, and the measures waiting for one in `pending`."""
    await conn.execute(
        text(
            "INSERT INTO metrics.touches (touch_id, user_id, promotion_id, wave, segment,"
            " variant, channel, exposure, exposed_at, orders, sends)"
            " VALUES ('t1', 'u1', 'p', 'launch', NULL, '', :channel, 'sent', :at, 0, 1)"
        ),
        {"at": minute, "channel": channel},
    )
    for seq, (measure, value) in enumerate(counts):
        await conn.execute(
            text("INSERT INTO metrics.pending VALUES ('t1', :seq, :minute, :channel, :m, :v)"),
            {"seq": seq, "minute": minute, "channel": channel, "m": measure, "v": value},
        )


@pytest.fixture(params=["sqlite", "postgresql"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            yield f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        else:
            server = request.getfixturevalue("postgres_url")
            name = f"t_{uuid.uuid4().hex[:10]}"
            yield await stack.enter_async_context(fresh_database(server, name))


async def test_counts_pending_before_the_upgrade_move_to_the_segment_after(url: str) -> None:
    await upgrade_async(url, store.SCHEMA, "0008")
    db = Database(url, store.SCHEMA)
    await db.start()
    try:
        # As 0008's counting left a send counted before its touch.planned: under segment "".
        minute = T0.replace(tzinfo=None) if url.startswith("sqlite") else T0
        async with db.begin() as conn:
            await sent_before_planned(
                conn, minute, "email", (("sends", 1.0), ("sent", 1.0), ("cost", 0.5))
            )
            await conn.execute(
                text(
                    "INSERT INTO metrics.minute_counts (promotion_id, minute, wave, channel,"
                    " segment, variant, sends, sent, cost)"
                    " VALUES ('p', :minute, 'launch', 'email', '', '', 1, 1, 0.5)"
                ),
                {"minute": minute},
            )
        await db.stop()
        await upgrade_async(url, store.SCHEMA)
        await db.start()

        data = TouchPlanned(
            touch_id="t1", user_id="u1", promotion_id="p", wave="launch", due_at=T0, segment="vip"
        )
        planned: Event[Any] = Event[Any](
            id="t1.planned", source="test", type=data.event_type(), time=T0, data=data
        )
        async with db.begin() as conn:
            await handlers.apply(conn, [planned], handlers.timedelta(days=7))
        async with db.connect() as conn:
            rows = await queries.funnel(conn, "p", ("segment",), {})
        by_segment = {r["segment"]: r for r in rows}
        assert by_segment["vip"]["sent"] == 1
        assert by_segment["vip"]["planned"] == 1
        assert by_segment["vip"]["cost"] == pytest.approx(0.5)
        assert "" not in by_segment or not by_segment[""]["sent"]
    finally:
        await db.stop()


async def test_a_downgrade_puts_the_waiting_counts_back_in_the_pending_table(url: str) -> None:
    await upgrade_async(url, store.SCHEMA, "0008")
    db = Database(url, store.SCHEMA)
    await db.start()
    minute = T0.replace(tzinfo=None) if url.startswith("sqlite") else T0
    try:
        async with db.begin() as conn:
            await sent_before_planned(conn, minute, "sms", (("sends", 1.0), ("cost", 0.5)))
        await db.stop()
        await upgrade_async(url, store.SCHEMA)
        await downgrade_async(url, store.SCHEMA, "0008")
        await db.start()
        async with db.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT touch_id, seq, channel, measure, value FROM metrics.pending"
                        " ORDER BY seq"
                    )
                )
            ).all()
        assert [tuple(r) for r in rows] == [
            ("t1", 0, "sms", "sends", 1.0),
            ("t1", 1, "sms", "cost", 0.5),
        ]
    finally:
        await db.stop()
