"""What the scheduling API reads: plans, a user's touches, a user's fatigue."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, desc, func, select

from services.scheduling import store
from services.scheduling.state import load_fatigue
from shared.service import ServiceContext

WAVE_ORDER = {"launch": 0, "day3": 1, "day7": 2, "day14": 3, "day30": 4}


async def plan_summary(ctx: ServiceContext, promotion_id: str) -> dict[str, Any] | None:
    t, p, pm = store.touches, store.promotions, store.plan_members
    async with ctx.db.connect() as conn:
        promotion = (
            await conn.execute(select(p).where(p.c.promotion_id == promotion_id))
        ).one_or_none()
        if promotion is None:
            return None
        rows = (
            await conn.execute(
                select(
                    t.c.wave,
                    t.c.status,
                    t.c.reason,
                    func.count(),
                    func.count().filter(t.c.deferrals > 0),
                    func.coalesce(func.sum(t.c.deferred_s), 0.0),
                    func.coalesce(func.max(t.c.deferred_s), 0.0),
                )
                # Through its participants: touches are indexed by user, not by promotion.
                .select_from(
                    pm.join(
                        t, and_(t.c.user_id == pm.c.user_id, t.c.promotion_id == pm.c.promotion_id)
                    )
                )
                .where(pm.c.promotion_id == promotion_id)
                .group_by(t.c.wave, t.c.status, t.c.reason)
            )
        ).all()
    waves: dict[str, dict[str, Any]] = {}
    for wave, status, reason, count, deferred, delay_sum, delay_max in rows:
        entry = waves.setdefault(
            wave,
            {
                "wave": wave,
                "planned": 0,
                "pending": 0,
                "dispatched": 0,
                "sent": 0,
                "failed": 0,
                "cancelled": 0,
                "suppressed": {},
                "deferred": 0,
                "deferred_hours_total": 0.0,
                "deferred_hours_max": 0.0,
            },
        )
        entry["planned"] += count
        if status == "planned":
            entry["pending"] += count
        elif status in ("dispatched", "sent", "failed", "cancelled"):
            entry[status] += count
        elif status == "suppressed":
            key = reason or "unknown"
            entry["suppressed"][key] = entry["suppressed"].get(key, 0) + count
        entry["deferred"] += deferred
        entry["deferred_hours_total"] += float(delay_sum) / 3600
        entry["deferred_hours_max"] = max(entry["deferred_hours_max"], float(delay_max) / 3600)
    ordered = sorted(waves.values(), key=lambda w: WAVE_ORDER.get(w["wave"], 99))
    for entry in ordered:
        entry["deferred_hours_total"] = round(entry["deferred_hours_total"], 3)
        entry["deferred_hours_max"] = round(entry["deferred_hours_max"], 3)
    return {
        "promotion_id": promotion_id,
        "name": promotion.name,
        "status": promotion.status,
        "ended_at": promotion.ended_at,
        "policy": promotion.policy,
        "policy_version": promotion.policy_version,
        "waves": ordered,
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
            "status": public_status(r.status),
            "reason": r.reason,
            "planned_due_at": r.planned_due_at,
            "deadline": r.deadline,
            "deferrals": r.deferrals,
            "dispatched_at": r.dispatched_at,
        }
        for r in rows
    ]


def public_status(status: str) -> str:
    """PRODUCT.md's statuses: a touch handed to delivery but not yet confirmed is still
    `planned` to callers; its `dispatched_at` says it is on its way."""
    return "planned" if status == "dispatched" else status


async def user_fatigue(ctx: ServiceContext, user_id: str) -> dict[str, Any]:
    h = store.fatigue_history
    async with ctx.db.connect() as conn:
        state = await load_fatigue(conn, user_id)
        rows = (
            await conn.execute(select(h).where(h.c.user_id == user_id).order_by(desc(h.c.id)))
        ).all()
    return {
        "user_id": user_id,
        "state": state.state,
        "paused_channels": sorted(state.paused),
        "ignored_in_a_row": state.unanswered,
        "last_engaged_at": state.last_engaged_at,
        "history": [
            {
                "at": r.at,
                "signal": r.signal,
                "channel": r.channel,
                "from": r.from_state,
                "to": r.to_state,
            }
            for r in reversed(rows)
        ],
    }
