"""Scheduling's commands and event handlers.

The planning and dispatch below are the smoke flow of the foundation: one
`launch` touch per participant, due at once. Policies, waves, caps, quiet
hours and durable timers replace it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update

from services.scheduling import store
from shared.db import insert_ignore
from shared.events import (
    AudienceMemberResolved,
    DeliveryFailed,
    DeliverySent,
    Event,
    PromotionEnded,
    TouchDue,
    TouchPlanned,
)
from shared.service import ServiceContext

TOUCH_NAMESPACE = uuid.UUID("6f1b7a52-3c1e-4d8e-9a7e-1f0c2b9d4e11")


def touch_id(promotion_id: str, user_id: str, wave: str) -> str:
    """Deterministic, so a redelivered audience event plans the same touch again (a no-op)."""
    return str(uuid.uuid5(TOUCH_NAMESPACE, f"{promotion_id}\x1f{user_id}\x1f{wave}"))


async def end_promotion(
    ctx: ServiceContext, promotion_id: str, *, ended_at: datetime, name: str, policy: str
) -> bool:
    """Record the end of a promotion and announce it, once; False when it had already ended."""
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        result = await conn.execute(
            insert_ignore(store.promotions),
            {
                "promotion_id": promotion_id,
                "name": name,
                "policy": policy,
                "ended_at": ended_at,
                "status": "ended",
                "created_at": now,
            },
        )
        if result.rowcount != 1:
            return False
        await ctx.outbox.add(
            conn,
            [
                PromotionEnded(
                    promotion_id=promotion_id, name=name, ended_at=ended_at, policy=policy
                )
            ],
            now=now,
        )
    ctx.outbox.notify()
    return True


async def on_audience_member(ctx: ServiceContext, event: Event[Any]) -> None:
    member: AudienceMemberResolved = event.data
    tid = touch_id(member.promotion_id, member.user_id, "launch")
    now = ctx.clock.now()
    channel = member.segment.channel_order[0] if member.segment.channel_order else "email"
    async with ctx.db.begin() as conn:
        result = await conn.execute(
            insert_ignore(store.touches),
            {
                "touch_id": tid,
                "promotion_id": member.promotion_id,
                "user_id": member.user_id,
                "wave": "launch",
                "channel": channel,
                "variant": None,
                "due_at": member.ended_at,
                "status": "planned",
                "reason": None,
                "updated_at": now,
            },
        )
        if result.rowcount != 1:
            return
        common = {
            "touch_id": tid,
            "promotion_id": member.promotion_id,
            "user_id": member.user_id,
            "wave": "launch",
            "channel": channel,
        }
        await ctx.outbox.add(
            conn,
            [
                TouchPlanned(**common, due_at=member.ended_at),
                TouchDue(**common, due_at=member.ended_at, channels=[channel]),
            ],
            now=now,
        )
    ctx.outbox.notify()


async def on_delivery_outcome(ctx: ServiceContext, event: Event[Any]) -> None:
    outcome: DeliverySent | DeliveryFailed = event.data
    status = "sent" if isinstance(outcome, DeliverySent) else "failed"
    reason = None if isinstance(outcome, DeliverySent) else str(outcome.reason)[:32]
    async with ctx.db.begin() as conn:
        await conn.execute(
            update(store.touches)
            .where(store.touches.c.touch_id == outcome.touch_id)
            .where(store.touches.c.status == "planned")
            .values(status=status, reason=reason, updated_at=ctx.clock.now())
        )


async def plan_summary(ctx: ServiceContext, promotion_id: str) -> dict[str, Any] | None:
    t = store.touches
    async with ctx.db.connect() as conn:
        promotion = (
            await conn.execute(
                select(store.promotions).where(store.promotions.c.promotion_id == promotion_id)
            )
        ).one_or_none()
        if promotion is None:
            return None
        rows = (
            await conn.execute(
                select(t.c.wave, t.c.status, t.c.reason, func.count())
                .where(t.c.promotion_id == promotion_id)
                .group_by(t.c.wave, t.c.status, t.c.reason)
            )
        ).all()
    waves: dict[str, dict[str, Any]] = {}
    for wave, status, reason, count in rows:
        entry = waves.setdefault(
            wave,
            {"wave": wave, "planned": 0, "pending": 0, "sent": 0, "failed": 0, "suppressed": {}},
        )
        entry["planned"] += count
        if status == "planned":
            entry["pending"] += count
        elif status in ("sent", "failed"):
            entry[status] += count
        elif status == "suppressed":
            entry["suppressed"][reason or "unknown"] = count
    return {
        "promotion_id": promotion_id,
        "policy": promotion.policy,
        "policy_version": 1,
        "waves": list(waves.values()),
    }


async def user_touches(ctx: ServiceContext, user_id: str) -> list[dict[str, Any]]:
    t = store.touches
    async with ctx.db.connect() as conn:
        rows = (
            await conn.execute(
                select(t).where(t.c.user_id == user_id).order_by(t.c.due_at, t.c.touch_id)
            )
        ).all()
    return [
        {
            "id": r.touch_id,
            "promotion_id": r.promotion_id,
            "wave": r.wave,
            "channel": r.channel,
            "variant": r.variant,
            "due_at": r.due_at,
            "status": r.status,
            "reason": r.reason,
        }
        for r in rows
    ]
