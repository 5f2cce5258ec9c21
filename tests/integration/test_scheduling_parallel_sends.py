"""A parallel touch (`TouchDue.parallel` = 2) reports one `delivery.sent` per channel
accepted: scheduling counts the touch once for the caps, on SQLite and PostgreSQL, whether
the outcomes come one by one or in one batch."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from services.scheduling import handlers, store
from shared.events import DeliveryFailed, DeliverySent, Event, default_registry, encode
from tests.integration.scheduling_harness import scheduling

NOW = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)
REGISTRY = default_registry()


def outcome(touch_id: str, channel: str, failed: bool = False) -> Event[Any]:
    fields: dict[str, Any] = {
        "touch_id": touch_id,
        "user_id": "u-1",
        "promotion_id": "p-1",
        "wave": "day7",
        "channel": channel,
        "at": NOW,
    }
    data = DeliveryFailed(**fields, reason="provider_failed") if failed else DeliverySent(**fields)
    return REGISTRY.decode(encode(data, source="afterglow/delivery", time=NOW))


@pytest.mark.parametrize("together", [False, True], ids=["one_by_one", "one_batch"])
async def test_two_sends_of_one_touch_are_one_contact(database_url: str, together: bool) -> None:
    events = [
        outcome("t-1", "sms"),
        outcome("t-1", "push"),
        outcome("t-1", "push"),  # a redelivered report
        outcome("t-2", "email", failed=True),  # nothing reached the user: the slot is free
        outcome("t-3", "sms", failed=True),  # one channel of a parallel touch failed ...
        outcome("t-3", "push"),  # ... the other was accepted: the contact counts
    ]
    async with scheduling(database_url, NOW) as harness:
        if together:
            await handlers.on_delivery_outcomes(harness.ctx, events)
        else:
            for event in events:
                await handlers.on_delivery_outcomes(harness.ctx, [event])
        async with harness.ctx.db.connect() as conn:
            rows = (
                await conn.execute(select(store.contacts).where(store.contacts.c.user_id == "u-1"))
            ).all()
        assert sorted((r.touch_id, r.status) for r in rows) == [
            ("t-1", "sent"),
            ("t-2", "released"),
            ("t-3", "sent"),
        ]
