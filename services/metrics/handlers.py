"""Metrics' event handlers: per-minute aggregates and last-touch attribution.

Every batch runs in one transaction: the event ids are recorded first (ON CONFLICT
DO NOTHING ... RETURNING), so only new events count and a redelivered or replayed
event never doubles a number. Counts are summed in memory and written with one
bulk upsert per batch.

Out-of-order events stay exact:
- a touch counted before its touch.planned (which carries the segment) is counted
  under segment "" and remembered in `pending`; touch.planned moves those counts;
- a purchase is credited to the user's latest exposure (touch sent, or suppressed
  for the holdout) at or before it and within the window; an exposure that arrives
  after purchases it should own takes them over from the older exposure.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from services.metrics import store
from services.metrics.config import MetricsSettings
from shared.db import upsert
from shared.events import (
    ActivityRecorded,
    DeliveryFailed,
    DeliverySent,
    EngagementRecorded,
    Event,
    TouchEvent,
    TouchPlanned,
    TouchSuppressed,
)
from shared.service import ServiceContext

HANDLED = (
    TouchPlanned,
    TouchSuppressed,
    DeliverySent,
    DeliveryFailed,
    EngagementRecorded,
    ActivityRecorded,
)

Key = tuple[str, datetime, str, str, str, str, str]


def minute_of(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(second=0, microsecond=0)


def window_of(ctx: ServiceContext) -> timedelta:
    settings = ctx.extras.get("metrics_settings")
    if not isinstance(settings, MetricsSettings):
        settings = MetricsSettings()
        ctx.extras["metrics_settings"] = settings
    return settings.attribution_window


_SEEN = (
    postgresql.insert(store.seen_events)
    .on_conflict_do_nothing()
    .returning(store.seen_events.c.event_id)
)
_ADD = postgresql.insert(store.minute_counts)
_ADD = _ADD.on_conflict_do_update(
    index_elements=[c.name for c in store.minute_counts.primary_key],
    set_={"value": store.minute_counts.c.value + _ADD.excluded.value},
)
_SAVE_TOUCH = upsert(store.touches, ["touch_id"])


@dataclass
class Batch:
    """One transaction's work: touch state read through, count deltas summed in memory."""

    conn: AsyncConnection
    window: timedelta
    touches: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    deltas: dict[Key, float] = field(default_factory=dict)

    async def touch(self, touch_id: str) -> dict[str, Any] | None:
        if touch_id not in self.touches:
            t = store.touches
            row = (await self.conn.execute(select(t).where(t.c.touch_id == touch_id))).first()
            self.touches[touch_id] = dict(row._mapping) if row else None
        return self.touches[touch_id]

    async def touch_of(self, data: TouchEvent) -> dict[str, Any]:
        known = await self.touch(data.touch_id)
        if known is not None:
            return known
        row: dict[str, Any] = {
            "touch_id": data.touch_id,
            "user_id": data.user_id,
            "promotion_id": data.promotion_id,
            "wave": data.wave,
            "segment": None,
            "variant": data.variant or "",
            "channel": "",
            "exposure": None,
            "exposed_at": None,
            "orders": 0,
            "sends": 0,
        }
        self.touches[data.touch_id] = row
        await self.save(row)
        return row

    async def save(self, row: dict[str, Any]) -> None:
        await self.conn.execute(_SAVE_TOUCH, [row])

    def add(self, key: Key, value: float) -> None:
        self.deltas[key] = self.deltas.get(key, 0.0) + value

    async def count(
        self, touch: dict[str, Any], at: datetime, measure: str, value: float, channel: str = ""
    ) -> None:
        channel = channel or touch["channel"]
        minute = minute_of(at)
        segment = touch["segment"]
        key = (
            touch["promotion_id"],
            minute,
            touch["wave"],
            channel,
            segment or "",
            touch["variant"],
            measure,
        )
        self.add(key, value)
        if segment is None:
            await self.conn.execute(
                store.pending.insert(),
                [
                    {
                        "touch_id": touch["touch_id"],
                        "seq": random.getrandbits(62),
                        "minute": minute,
                        "channel": channel,
                        "measure": measure,
                        "value": value,
                    }
                ],
            )

    async def flush(self) -> None:
        rows = [
            {
                "promotion_id": k[0],
                "minute": k[1],
                "wave": k[2],
                "channel": k[3],
                "segment": k[4],
                "variant": k[5],
                "measure": k[6],
                "value": v,
            }
            for k, v in sorted(self.deltas.items(), key=lambda kv: kv[0])
            if v != 0
        ]
        if rows:
            await self.conn.execute(_ADD, rows)
        self.deltas.clear()

    # -- events ---------------------------------------------------------------

    async def planned(self, event: Event[Any]) -> None:
        data: TouchPlanned = event.data
        touch = await self.touch_of(data)
        segment = data.segment or ""
        if touch["segment"] is None:
            await self._settle_segment(touch, segment)
        if data.variant and not touch["variant"]:
            touch["variant"] = data.variant
        await self.save(touch)
        await self.count(touch, event.time, "planned", 1)

    async def _settle_segment(self, touch: dict[str, Any], segment: str) -> None:
        p = store.pending
        moved = (await self.conn.execute(select(p).where(p.c.touch_id == touch["touch_id"]))).all()
        for row in moved:
            base = (touch["promotion_id"], row.minute, touch["wave"], row.channel)
            tail = (touch["variant"], row.measure)
            self.add((*base, "", *tail), -row.value)
            self.add((*base, segment, *tail), row.value)
        if moved:
            await self.conn.execute(delete(p).where(p.c.touch_id == touch["touch_id"]))
        touch["segment"] = segment

    async def suppressed(self, event: Event[Any]) -> None:
        data: TouchSuppressed = event.data
        touch = await self.touch_of(data)
        await self.count(touch, data.at, f"suppressed.{data.reason}", 1)
        if data.reason == "holdout" and touch["exposure"] is None:
            await self._expose(touch, "holdout", data.at)

    async def sent(self, event: Event[Any]) -> None:
        """A touch counts as "sent" once, at its first accepted send recorded here (under
        that send's channel); "sends" and cost count every accepted channel of a parallel
        touch. Event ids are counted once, so a replay changes nothing."""
        data: DeliverySent = event.data
        touch = await self.touch_of(data)
        first = not touch["sends"]
        touch["sends"] += 1
        if first and data.channel and not touch["channel"]:
            touch["channel"] = data.channel
        await self.save(touch)
        channel = data.channel or ""
        await self.count(touch, data.at, "sends", 1, channel)
        if first:
            await self.count(touch, data.at, "sent", 1, channel)
        if data.cost:
            await self.count(touch, data.at, "cost", data.cost, channel)
        if touch["exposure"] is None:
            await self._expose(touch, "sent", data.at)

    async def failed(self, event: Event[Any]) -> None:
        data: DeliveryFailed = event.data
        touch = await self.touch_of(data)
        await self.count(touch, data.at, "failed", 1, data.channel or "")
        if data.cost:
            await self.count(touch, data.at, "cost", data.cost, data.channel or "")

    async def engaged(self, event: Event[Any]) -> None:
        data: EngagementRecorded = event.data
        touch = await self.touch_of(data)
        await self.count(touch, data.at, data.kind, 1, data.channel or "")

    async def purchase(self, event: Event[Any]) -> None:
        data: ActivityRecorded = event.data
        if data.kind != "purchase":
            return
        pu = store.purchases
        row = {
            "activity_id": data.id,
            "user_id": data.user_id,
            "occurred_at": data.occurred_at,
            "amount": float(data.amount or 0.0),
            "touch_id": None,
        }
        first = await self.conn.execute(postgresql.insert(pu).on_conflict_do_nothing(), [row])
        if first.rowcount != 1:
            return
        t = store.touches
        best = (
            await self.conn.execute(
                select(t.c.touch_id)
                .where(
                    t.c.user_id == data.user_id,
                    t.c.exposed_at.is_not(None),
                    t.c.exposed_at <= data.occurred_at,
                    t.c.exposed_at >= data.occurred_at - self.window,
                )
                .order_by(t.c.exposed_at.desc(), t.c.touch_id.desc())
                .limit(1)
            )
        ).first()
        if best is None:
            return
        touch = await self.touch(best.touch_id)
        assert touch is not None
        await self._credit(touch, float(data.amount or 0.0), +1)
        await self.conn.execute(
            update(pu).where(pu.c.activity_id == data.id).values(touch_id=touch["touch_id"])
        )

    async def _expose(self, touch: dict[str, Any], kind: str, at: datetime) -> None:
        """`touch` becomes an exposure at `at`: take over the purchases it is now the last for."""
        touch["exposure"], touch["exposed_at"] = kind, at
        await self.save(touch)
        pu, t = store.purchases, store.touches
        candidates = (
            await self.conn.execute(
                select(pu.c.activity_id, pu.c.amount, pu.c.touch_id, t.c.exposed_at)
                .select_from(pu.outerjoin(t, t.c.touch_id == pu.c.touch_id))
                .where(
                    pu.c.user_id == touch["user_id"],
                    pu.c.occurred_at >= at,
                    pu.c.occurred_at <= at + self.window,
                    or_(
                        pu.c.touch_id.is_(None),
                        t.c.exposed_at < at,
                        and_(t.c.exposed_at == at, t.c.touch_id < touch["touch_id"]),
                    ),
                )
            )
        ).all()
        for p in candidates:
            if p.touch_id is not None:
                old = await self.touch(p.touch_id)
                if old is not None:
                    await self._credit(old, p.amount, -1)
            await self._credit(touch, p.amount, +1)
            await self.conn.execute(
                update(pu)
                .where(pu.c.activity_id == p.activity_id)
                .values(touch_id=touch["touch_id"])
            )

    async def _credit(self, touch: dict[str, Any], amount: float, sign: int) -> None:
        prefix = "holdout_" if touch["exposure"] == "holdout" else ""
        at = touch["exposed_at"]
        before = touch["orders"]
        touch["orders"] = before + sign
        await self.save(touch)
        await self.count(touch, at, f"{prefix}orders", sign)
        await self.count(touch, at, f"{prefix}revenue", sign * amount)
        if before == 0 and sign > 0:
            await self.count(touch, at, f"{prefix}converted", 1)
        elif before == 1 and sign < 0:
            await self.count(touch, at, f"{prefix}converted", -1)


DISPATCH: dict[type[Any], Callable[[Batch, Event[Any]], Awaitable[None]]] = {
    TouchPlanned: Batch.planned,
    TouchSuppressed: Batch.suppressed,
    DeliverySent: Batch.sent,
    DeliveryFailed: Batch.failed,
    EngagementRecorded: Batch.engaged,
    ActivityRecorded: Batch.purchase,
}


async def on_events(ctx: ServiceContext, events: Sequence[Event[Any]]) -> None:
    """Count a batch of events (any mix of the handled types) once, in one transaction."""
    window = window_of(ctx)
    async with ctx.db.begin() as conn:
        await apply(conn, events, window, ctx.clock.now())


_LOCK = text(
    "SELECT pg_advisory_xact_lock(k)"
    " FROM (SELECT unnest(CAST(:keys AS bigint[])) AS k ORDER BY k) AS s"
)


async def lock_users(conn: AsyncConnection, users: set[str]) -> None:
    """On PostgreSQL, hold a transaction lock per user (taken in key order, so batches never
    deadlock): topics are consumed concurrently, and a purchase and the exposure that should own
    it, counted in two concurrent transactions, would otherwise each miss the other."""
    if conn.dialect.name != "postgresql" or not users:
        return
    keys = sorted(
        int.from_bytes(
            hashlib.blake2b(f"metrics-user:{u}".encode(), digest_size=8).digest(),
            "big",
            signed=True,
        )
        for u in users
    )
    await conn.execute(_LOCK, {"keys": keys})


async def apply(
    conn: AsyncConnection, events: Sequence[Event[Any]], window: timedelta, now: datetime
) -> int:
    """Count the events not seen before on `conn`; returns how many were new."""
    ids = list(dict.fromkeys(e.id for e in events))
    if not ids:
        return 0
    fresh = {
        r[0]
        for r in (await conn.execute(_SEEN, [{"event_id": i, "seen_at": now} for i in ids])).all()
    }
    await lock_users(conn, {e.data.user_id for e in events if e.id in fresh})
    batch = Batch(conn, window)
    counted = 0
    for event in events:
        if event.id not in fresh:
            continue
        fresh.discard(event.id)
        await DISPATCH[type(event.data)](batch, event)
        counted += 1
    await batch.flush()
    return counted
