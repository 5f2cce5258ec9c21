"""A parallel touch (`TouchDue.parallel` = 2) reports one `delivery.sent` per channel
accepted: scheduling counts the touch once for the caps, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from services.scheduling import handlers, store
from shared.events import DeliverySent, default_registry, encode
from tests.conftest import fresh_database
from tests.integration.scheduling_harness import scheduling

NOW = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
        return
    async with fresh_database(request.getfixturevalue("postgres_url"), f"t_{unique}") as url:
        yield url


async def test_two_sends_of_one_touch_are_one_contact(database_url: str) -> None:
    registry = default_registry()
    async with scheduling(database_url, NOW) as harness:
        for channel in ("sms", "push", "push"):  # the last: a redelivered report
            sent = DeliverySent(
                touch_id="t-1",
                user_id="u-1",
                promotion_id="p-1",
                wave="day7",
                channel=channel,
                at=NOW,
            )
            event = registry.decode(encode(sent, source="afterglow/delivery", time=NOW))
            await handlers.on_delivery_outcome(harness.ctx, event)
        async with harness.ctx.db.connect() as conn:
            rows = (
                await conn.execute(select(store.contacts).where(store.contacts.c.user_id == "u-1"))
            ).all()
        assert [(r.touch_id, r.status) for r in rows] == [("t-1", "sent")]
