"""Scheduling's commands and event handlers: policies, ending and cancelling promotions,
planning from audience events, and what users, engagements and deliveries change."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import String, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduling import domain, store
from services.scheduling.policy import Policy
from services.scheduling.state import (
    DEFAULT_POLICY,
    UnknownPolicy,
    among,
    current_policy,
    fatigue_values,
    history_row,
    load_fatigue,
    lock_users,
    policy_at,
)
from shared.db import UtcDateTime, insert_ignore, upsert
from shared.events import (
    DeliveryFailed,
    DeliverySent,
    EngagementRecorded,
    Event,
    PromotionCancelled,
    PromotionEnded,
    Reason,
    TouchSuppressed,
    UserErased,
    UserUpdated,
)
from shared.service import ServiceContext

__all__ = ["UnknownPolicy", "touch_id"]

touch_id = domain.touch_id
CANCEL_CHUNK = 2000
_KEY_CHUNK = 5000


# -- policies ---------------------------------------------------------------------


async def get_policy(ctx: ServiceContext, name: str) -> tuple[int, Policy]:
    async with ctx.db.begin() as conn:
        return await current_policy(conn, name, ctx.clock.now())


async def put_policy(ctx: ServiceContext, name: str, policy: Policy) -> tuple[int, bool]:
    """Store a new version unless it equals the newest; returns (version, created)."""
    now = ctx.clock.now()
    body = policy.model_dump(mode="json")
    async with ctx.db.begin() as conn:
        try:
            version, latest = await current_policy(conn, name, now)
        except UnknownPolicy:
            version, latest = 0, None
        if latest is not None and latest.model_dump(mode="json") == body:
            return version, False
        p = store.policies
        await conn.execute(
            p.insert(), {"name": name, "version": version + 1, "body": body, "created_at": now}
        )
    return version + 1, True


# -- promotions -------------------------------------------------------------------


async def end_promotion(
    ctx: ServiceContext, promotion_id: str, *, ended_at: datetime, name: str, policy: str
) -> bool:
    """Record the end of a promotion and announce it, once; False when it had already ended."""
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        version, _ = await current_policy(conn, policy, now)
        result = await conn.execute(
            insert_ignore(store.promotions),
            {
                "promotion_id": promotion_id,
                "name": name,
                "policy": policy,
                "policy_version": version,
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


async def on_promotion_ended(ctx: ServiceContext, event: Event[Any]) -> None:
    """A promotion ended elsewhere (or our own announcement): remember it, once."""
    ended: PromotionEnded = event.data
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        try:
            version, _ = await current_policy(conn, ended.policy, now)
            policy = ended.policy
        except UnknownPolicy:
            version, _ = await current_policy(conn, DEFAULT_POLICY, now)
            policy = DEFAULT_POLICY
        await conn.execute(
            insert_ignore(store.promotions),
            {
                "promotion_id": ended.promotion_id,
                "name": ended.name,
                "policy": policy,
                "policy_version": version,
                "ended_at": ended.ended_at,
                "status": "ended",
                "created_at": now,
            },
        )


async def cancel_promotion(ctx: ServiceContext, promotion_id: str) -> int | None:
    """Stop what is pending (idempotent); returns how many touches it cancelled now.

    The call that cancels the promotion counts every touch of it that the cancellation
    stopped, those the `promotion.cancelled` handler (this service consumes its own event,
    to finish a walk cut short by a crash) reached first while this walk went on included.
    A later call counts only what it still found pending."""
    now = ctx.clock.now()
    p, t = store.promotions, store.touches
    async with ctx.db.begin() as conn:
        known = (
            await conn.execute(select(p.c.status).where(p.c.promotion_id == promotion_id))
        ).scalar_one_or_none()
        if known is None:
            return None
        # Conditional: of two calls racing here, the second waits for the first's row lock
        # and then updates nothing (one owner, one promotion.cancelled).
        flipped = await conn.execute(
            update(p)
            .where(p.c.promotion_id == promotion_id, p.c.status != "cancelled")
            .values(status="cancelled", cancelled_at=now)
        )
        owner = flipped.rowcount == 1
        if owner:
            await ctx.outbox.add(
                conn, [PromotionCancelled(promotion_id=promotion_id, cancelled_at=now)], now=now
            )
    # The promotion's touches are its participants' (`plan_members`): CANCEL_CHUNK of them a
    # transaction, in user order, each user's planned touches of this promotion.
    pm = store.plan_members
    cancelled, after = 0, ""
    while True:
        async with ctx.db.begin() as conn:
            users = list(
                (
                    await conn.execute(
                        select(pm.c.user_id)
                        .where(pm.c.promotion_id == promotion_id, pm.c.user_id > after)
                        .order_by(pm.c.user_id)
                        .limit(CANCEL_CHUNK)
                    )
                ).scalars()
            )
            if not users:
                break
            after = users[-1]
            query = select(
                t.c.touch_id, t.c.user_id, t.c.promotion_id, t.c.wave, t.c.variant, t.c.status
            ).where(
                among(conn, t.c.user_id, users),
                t.c.promotion_id == promotion_id,
                t.c.status.in_(("planned", "cancelled")) if owner else t.c.status == "planned",
            )
            if conn.dialect.name == "postgresql":
                # Waits for a concurrent walker's chunk, then sees what it cancelled.
                query = query.with_for_update()
            rows = (await conn.execute(query)).all()
            pending = [r for r in rows if r.status == "planned"]
            if pending:
                await _close_pending(
                    ctx, conn, pending, status="cancelled", reason="cancelled", now=now
                )
            cancelled += len(rows)
        ctx.outbox.notify()
    return cancelled


async def on_promotion_cancelled(ctx: ServiceContext, event: Event[Any]) -> None:
    data: PromotionCancelled = event.data
    await cancel_promotion(ctx, data.promotion_id)


# -- users ------------------------------------------------------------------------


async def on_user_updated(ctx: ServiceContext, event: Event[Any]) -> None:
    data: UserUpdated = event.data
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        await conn.execute(
            upsert(store.users, ["user_id"], ["timezone", "consent", "updated_at"]),
            {
                "user_id": data.user_id,
                "timezone": data.timezone,
                "consent": dict(data.consent),
                "fatigue": "normal",
                "unanswered": 0,
                "first_seen_at": now,
                "updated_at": now,
            },
        )


async def on_user_erased(ctx: ServiceContext, event: Event[Any]) -> None:
    """Forget what we know of the user, keep a tombstone, and suppress what is pending."""
    data: UserErased = event.data
    now = ctx.clock.now()
    u, t = store.users, store.touches
    async with ctx.db.begin() as conn:
        await lock_users(conn, [data.user_id])
        await conn.execute(
            upsert(
                u,
                ["user_id"],
                ["timezone", "consent", "erased_at", "paused", "last_engaged_at", "updated_at"],
            ),
            {
                "user_id": data.user_id,
                "timezone": "UTC",
                "consent": None,
                "erased_at": data.erased_at,
                "paused": None,
                "last_engaged_at": None,
                "fatigue": "normal",
                "unanswered": 0,
                "updated_at": now,
            },
        )
        await conn.execute(
            store.fatigue_history.delete().where(store.fatigue_history.c.user_id == data.user_id)
        )
        pending = (
            await conn.execute(
                select(t.c.touch_id, t.c.user_id, t.c.promotion_id, t.c.wave, t.c.variant).where(
                    t.c.user_id == data.user_id, t.c.status == "planned"
                )
            )
        ).all()
        if not pending:
            return
        await _close_pending(ctx, conn, pending, status="suppressed", reason="erased", now=now)
    ctx.outbox.notify()


async def _close_pending(
    ctx: ServiceContext,
    conn: AsyncConnection,
    rows: Sequence[Any],
    *,
    status: str,
    reason: Reason,
    now: datetime,
) -> None:
    """End planned touches for good and say so on `touches`, in the caller's transaction."""
    t = store.touches
    # By user, then id: (user_id, due_at) is the index, and touch ids are unique.
    await conn.execute(
        update(t)
        .where(
            among(conn, t.c.user_id, sorted({r.user_id for r in rows})),
            among(conn, t.c.touch_id, [r.touch_id for r in rows]),
            t.c.status == "planned",
        )
        .values(status=status, reason=reason, updated_at=now)
    )
    await ctx.outbox.add(
        conn,
        [
            TouchSuppressed(
                touch_id=r.touch_id,
                user_id=r.user_id,
                promotion_id=r.promotion_id,
                wave=r.wave,
                variant=r.variant,
                reason=reason,
                at=now,
            )
            for r in rows
        ],
        now=now,
    )


# -- engagements and deliveries ---------------------------------------------------


async def on_engagement(ctx: ServiceContext, event: Event[Any]) -> None:
    """Receipts drive the fatigue state machine of the policy the touch was planned with."""
    data: EngagementRecorded = event.data
    if data.kind not in ("opened", "clicked", "complained", "unsubscribed"):
        return
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        policy = await _policy_of_promotion(ctx, conn, data.promotion_id, now)
        await lock_users(conn, [data.user_id])
        before = await load_fatigue(conn, data.user_id)
        after, change = domain.on_engagement(
            before, data.kind, data.channel, data.at, policy.fatigue
        )
        if after == before:
            return
        await conn.execute(
            upsert(store.users, ["user_id"], [*list(fatigue_values(after)), "updated_at"]),
            {
                "user_id": data.user_id,
                "timezone": "UTC",
                "first_seen_at": now,
                "updated_at": now,
                **fatigue_values(after),
            },
        )
        if change is not None:
            await conn.execute(store.fatigue_history.insert(), history_row(data.user_id, change))


async def _policy_of_promotion(
    ctx: ServiceContext, conn: AsyncConnection, promotion_id: str, now: datetime
) -> Policy:
    p = store.promotions
    row = (
        await conn.execute(
            select(p.c.policy, p.c.policy_version).where(p.c.promotion_id == promotion_id)
        )
    ).one_or_none()
    if row is None:
        version, _ = await current_policy(conn, DEFAULT_POLICY, now)
        return await policy_at(ctx, conn, DEFAULT_POLICY, version)
    return await policy_at(ctx, conn, row.policy, row.policy_version)


_SETTLE_TOUCH = (
    update(store.touches)
    # By user, then id: (user_id, due_at) is the index.
    .where(store.touches.c.user_id == bindparam("b_user_id"))
    .where(store.touches.c.touch_id == bindparam("b_touch_id"))
    # Not IN (...): an expanding parameter cannot be used with executemany.
    .where(or_(store.touches.c.status == "planned", store.touches.c.status == "dispatched"))
    .values(
        status=bindparam("b_status"),
        reason=bindparam("b_reason"),
        channel=func.coalesce(bindparam("b_channel", type_=String()), store.touches.c.channel),
        updated_at=bindparam("b_updated_at", type_=UtcDateTime()),
    )
)
_SETTLE_CONTACT = upsert(store.contacts, ["touch_id"], ["status"])


async def on_delivery_outcomes(ctx: ServiceContext, events: Sequence[Event[Any]]) -> None:
    """delivery.sent confirms the reserved slot; delivery.failed releases it (nothing reached
    the user, so the slot may serve a later touch).

    A batch (sent and failed mixed, in their order) in one transaction, with the same result
    as one event at a time: a touch takes the status of its first outcome (later ones find it
    settled), its contact the status of its last one (an upsert of each)."""
    now = ctx.clock.now()
    touches: dict[str, dict[str, Any]] = {}
    contacts: dict[str, dict[str, Any]] = {}
    for event in events:
        outcome: DeliverySent | DeliveryFailed = event.data
        sent = not isinstance(outcome, DeliveryFailed)
        touches.setdefault(
            outcome.touch_id,
            {
                "b_touch_id": outcome.touch_id,
                "b_user_id": outcome.user_id,
                "b_status": "sent" if sent else "failed",
                "b_reason": str(outcome.reason)[:32]
                if isinstance(outcome, DeliveryFailed)
                else None,
                "b_channel": outcome.channel,
                "b_updated_at": now,
            },
        )
        contact = contacts.setdefault(
            outcome.touch_id,
            {
                "touch_id": outcome.touch_id,
                "user_id": outcome.user_id,
                "at": outcome.at,
                "promotion_id": outcome.promotion_id,
                "wave": outcome.wave,
            },
        )
        contact["status"] = "sent" if sent else "released"
    # In touch id order, so that concurrent batches lock rows in the same order.
    async with ctx.db.begin() as conn:
        await conn.execute(_SETTLE_TOUCH, [touches[k] for k in sorted(touches)])
        await conn.execute(_SETTLE_CONTACT, [contacts[k] for k in sorted(contacts)])
