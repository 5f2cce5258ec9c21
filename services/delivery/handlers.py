"""Delivery's event handlers.

The foundation's smoke flow records each due touch once and reports it sent;
provider adapters, consent checks, retries and budgets replace it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from services.delivery import store
from shared.db import insert_ignore
from shared.events import DeliverySent, Event, TouchDue
from shared.service import ServiceContext


async def on_touch_due(ctx: ServiceContext, event: Event[Any]) -> None:
    due: TouchDue = event.data
    channel = due.channel or (due.channels[0] if due.channels else None)
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        result = await conn.execute(
            insert_ignore(store.deliveries),
            {
                "touch_id": due.touch_id,
                "user_id": due.user_id,
                "promotion_id": due.promotion_id,
                "wave": due.wave,
                "channel": channel,
                "status": "sent",
                "attempts": 1,
                "updated_at": now,
            },
        )
        if result.rowcount != 1:
            return
        await ctx.outbox.add(
            conn,
            [
                DeliverySent(
                    touch_id=due.touch_id,
                    user_id=due.user_id,
                    promotion_id=due.promotion_id,
                    wave=due.wave,
                    channel=channel,
                    variant=due.variant,
                    at=now,
                )
            ],
            now=now,
        )
    ctx.outbox.notify()


async def user_deliveries(ctx: ServiceContext, user_id: str) -> list[dict[str, Any]]:
    d = store.deliveries
    async with ctx.db.connect() as conn:
        rows = (
            await conn.execute(select(d).where(d.c.user_id == user_id).order_by(d.c.updated_at))
        ).all()
    return [
        {
            "touch_id": r.touch_id,
            "promotion_id": r.promotion_id,
            "wave": r.wave,
            "channel": r.channel,
            "status": r.status,
            "attempts": r.attempts,
            "at": r.updated_at,
        }
        for r in rows
    ]
