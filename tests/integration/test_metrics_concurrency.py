"""Two metrics transactions counting the same user at once, on PostgreSQL: a purchase and the
send that should own it, each counted in its own transaction, still meet (the user's lock
makes the second wait for the first), whatever else the transactions count."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from services.metrics import handlers, queries, store
from shared.db import Database
from shared.events import DeliverySent
from tests.conftest import fresh_database
from tests.integration.test_metrics_exactness import T0, WINDOW, P, ev, planned, purchase, touch


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[Database]:
    async with fresh_database(postgres_url, f"t_{uuid.uuid4().hex[:10]}") as url:
        database = Database(url, store.SCHEMA)
        await database.start()
        try:
            await database.create_all(store.metadata)
            yield database
        finally:
            await database.stop()


async def test_a_purchase_and_its_send_counted_at_once_meet(db: Database) -> None:
    # Many other users in each transaction: more users than there are user locks.
    others = [purchase(f"x{i}", f"other-{i}", T0, 1.0) for i in range(2 * handlers.USER_LOCKS)]
    buy = purchase("a1", "u1", T0 + timedelta(hours=1), 40.0)
    at = T0 + timedelta(minutes=1)
    sent = ev("t1.sent", DeliverySent(**touch("t1", "u1"), channel="email", at=at), at)
    async with db.begin() as first:
        await handlers.apply(first, [planned("t1", "u1", "high", ""), buy, *others], WINDOW)
        # The send's transaction starts while the purchase's is still open: it must wait.
        second = asyncio.create_task(_apply(db, [sent]))
        await asyncio.sleep(0.5)
        assert not second.done()
    await second
    async with db.connect() as conn:
        (row,) = await queries.funnel(conn, P, ("wave",))
    assert (row["sent"], row["converted"], row["revenue"]) == (1, 1, 40.0)


async def _apply(db: Database, events: list[handlers.Event[object]]) -> None:
    async with db.begin() as conn:
        await handlers.apply(conn, events, WINDOW)
