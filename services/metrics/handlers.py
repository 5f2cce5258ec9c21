"""Metrics' event handlers: count each event once, per promotion, wave and measure."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from services.metrics import domain, store
from shared.db import insert_ignore, upsert_add
from shared.events import DeliverySent, Event, TouchEvent, TouchPlanned
from shared.service import ServiceContext

MEASURE_OF: dict[type[Any], str] = {TouchPlanned: "planned", DeliverySent: "sent"}


async def on_touch_event(ctx: ServiceContext, event: Event[Any]) -> None:
    data: TouchEvent = event.data
    measure = MEASURE_OF[type(data)]
    async with ctx.db.begin() as conn:
        first = await conn.execute(
            insert_ignore(store.seen_events), {"event_id": event.id, "seen_at": ctx.clock.now()}
        )
        if first.rowcount != 1:
            return
        await conn.execute(
            upsert_add(
                store.wave_counts,
                {"promotion_id": data.promotion_id, "wave": data.wave, "measure": measure},
                "value",
                1,
            )
        )


async def funnel_by_wave(ctx: ServiceContext, promotion_id: str) -> list[dict[str, Any]]:
    w = store.wave_counts
    async with ctx.db.connect() as conn:
        rows = (
            await conn.execute(
                select(w.c.wave, w.c.measure, w.c.value).where(w.c.promotion_id == promotion_id)
            )
        ).all()
    by_wave: dict[str, dict[str, int]] = {}
    for wave, measure, value in rows:
        by_wave.setdefault(wave, {})[measure] = int(value)
    return [{"wave": wave, **domain.funnel_row(counts)} for wave, counts in sorted(by_wave.items())]
