"""Planning from audience events: one durable timer row per touch, written in bulk (COPY on
PostgreSQL) together with the touch.planned events, one transaction per batch of events."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduling import domain, store
from services.scheduling.policy import Policy
from services.scheduling.state import (
    DEFAULT_POLICY,
    OUTBOX_COLUMNS,
    FastEncoder,
    UnknownPolicy,
    bulk_insert,
    current_policy,
    policy_at,
    wake_dispatcher,
)
from shared.db import insert_ignore
from shared.events import AudienceMemberResolved, Event, TouchPlanned, TouchSuppressed
from shared.service import ServiceContext

_KEY_CHUNK = 5000
# PostgreSQL: one cached statement per batch instead of a multi-row VALUES compiled each time.
_CLAIM_PG = text(
    "INSERT INTO scheduling.plan_members (promotion_id, user_id) "
    "SELECT * FROM unnest(CAST(:p AS text[]), CAST(:u AS text[])) "
    "ON CONFLICT DO NOTHING RETURNING promotion_id, user_id"
)
_SEED_PG = text(
    "WITH seeded AS ("
    " INSERT INTO scheduling.users (user_id, timezone, consent, fatigue, unanswered,"
    " first_seen_at, updated_at)"
    " SELECT u, tz, CAST(c AS json), 'normal', 0, :now, :now"
    " FROM unnest(CAST(:u AS text[]), CAST(:tz AS text[]), CAST(:consent AS text[])) AS s(u, tz, c)"
    " ON CONFLICT DO NOTHING RETURNING user_id)"
    " SELECT user_id FROM scheduling.users WHERE user_id = ANY(CAST(:u AS text[]))"
    " AND erased_at IS NOT NULL"
)


# -- planning ---------------------------------------------------------------------

TOUCH_COLUMNS = (
    "touch_id",
    "promotion_id",
    "user_id",
    "wave",
    "channel",
    "variant",
    "due_at",
    "status",
    "reason",
    "updated_at",
    "planned_due_at",
    "deadline",
    "rank",
    "parallel",
    "coupon",
    "essential",
    "channel_order",
    "segment",
)


PLANNED_TYPE = TouchPlanned.event_type()
SUPPRESSED_TYPE = TouchSuppressed.event_type()


async def on_audience_members(ctx: ServiceContext, events: list[Event[Any]]) -> None:
    """Plan every participant in the batch: one timer row per touch, one transaction, COPY."""
    members: list[AudienceMemberResolved] = [e.data for e in events]
    now = ctx.clock.now()
    touch_rows: list[tuple[Any, ...]] = []
    encoder = FastEncoder(ctx, now)
    async with ctx.db.begin() as conn:
        promotions = await _promotions_for(ctx, conn, members, now)
        fresh = await _claim_members(conn, members)
        if not fresh:
            return
        erased = await _seed_users(
            conn, [m for m in members if (m.promotion_id, m.user_id) in fresh], now
        )
        for member in members:
            key = (member.promotion_id, member.user_id)
            if key not in fresh:
                continue
            fresh.discard(key)
            status, policy = promotions[member.promotion_id]
            if status == "cancelled" or member.user_id in erased:
                continue
            _plan_one(member, policy, now, touch_rows, encoder)
        await bulk_insert(conn, store.touches, TOUCH_COLUMNS, touch_rows)
        await bulk_insert(conn, store.outbox, OUTBOX_COLUMNS, encoder.rows)
    ctx.outbox.notify()
    wake_dispatcher(ctx)


def _plan_one(
    member: AudienceMemberResolved,
    policy: Policy,
    now: datetime,
    touch_rows: list[tuple[Any, ...]],
    encoder: FastEncoder,
) -> None:
    segment = member.segment
    plan = domain.plan_member(
        policy,
        domain.Member(
            member.user_id,
            member.promotion_id,
            member.ended_at,
            member.timezone,
            segment.ltv_tier,
            segment.value_layer,
            segment.silent,
            segment.abuse_review,
            tuple(segment.channel_order),
        ),
    )
    order = ",".join(segment.channel_order)
    label = segment.ltv_tier
    lane = encoder.lane(member.user_id)
    append = touch_rows.append
    for touch in plan:
        append(
            (
                touch.touch_id,
                touch.promotion_id,
                touch.user_id,
                touch.wave,
                None,
                touch.variant,
                touch.due_at,
                touch.status,
                touch.reason,
                now,
                touch.due_at,
                touch.deadline,
                touch.rank,
                touch.parallel,
                touch.coupon,
                touch.essential,
                order,
                label,
            )
        )
        common = {
            "user_id": touch.user_id,
            "touch_id": touch.touch_id,
            "promotion_id": touch.promotion_id,
            "wave": touch.wave,
            "channel": None,
            "variant": touch.variant,
        }
        # orjson writes aware datetimes as isoformat() does.
        encoder.add(
            PLANNED_TYPE,
            touch.user_id,
            f"{touch.touch_id}.planned",
            {**common, "due_at": touch.due_at, "deadline": touch.deadline, "segment": label},
            lane,
        )
        if touch.status == "suppressed":
            encoder.add(
                SUPPRESSED_TYPE,
                touch.user_id,
                f"{touch.touch_id}.suppressed",
                {**common, "reason": touch.reason, "at": encoder.time},
                lane,
            )


async def _promotions_for(
    ctx: ServiceContext,
    conn: AsyncConnection,
    members: Sequence[AudienceMemberResolved],
    now: datetime,
) -> dict[str, tuple[str, Policy]]:
    """Status and policy of each promotion in the batch; one ended elsewhere is recorded."""
    p = store.promotions
    ids = list(dict.fromkeys(m.promotion_id for m in members))
    rows = {
        r.promotion_id: r
        for r in (
            await conn.execute(
                select(p.c.promotion_id, p.c.status, p.c.policy, p.c.policy_version).where(
                    p.c.promotion_id.in_(ids)
                )
            )
        ).all()
    }
    out: dict[str, tuple[str, Policy]] = {}
    for member in members:
        pid = member.promotion_id
        if pid in out:
            continue
        row = rows.get(pid)
        if row is None:
            name = member.policy
            try:
                version, _ = await current_policy(conn, name, now)
            except UnknownPolicy:
                name = DEFAULT_POLICY
                version, _ = await current_policy(conn, name, now)
            await conn.execute(
                insert_ignore(p),
                {
                    "promotion_id": pid,
                    "name": "",
                    "policy": name,
                    "policy_version": version,
                    "ended_at": member.ended_at,
                    "status": "ended",
                    "created_at": now,
                },
            )
            out[pid] = ("ended", await policy_at(ctx, conn, name, version))
        else:
            out[pid] = (row.status, await policy_at(ctx, conn, row.policy, row.policy_version))
    return out


async def _claim_members(
    conn: AsyncConnection, members: Sequence[AudienceMemberResolved]
) -> set[tuple[str, str]]:
    """The (promotion, user) pairs planned for the first time by this batch."""
    keys = list(dict.fromkeys((m.promotion_id, m.user_id) for m in members))
    if conn.dialect.name == "postgresql":
        result = await conn.execute(
            _CLAIM_PG, {"p": [p for p, _ in keys], "u": [u for _, u in keys]}
        )
        return {(p, u) for p, u in result.all()}
    fresh: set[tuple[str, str]] = set()
    pm = store.plan_members
    for start in range(0, len(keys), _KEY_CHUNK):
        chunk = keys[start : start + _KEY_CHUNK]
        result = await conn.execute(
            insert_ignore(pm)
            .values([{"promotion_id": p, "user_id": u} for p, u in chunk])
            .returning(pm.c.promotion_id, pm.c.user_id)
        )
        fresh.update((p, u) for p, u in result.all())
    return fresh


async def _seed_users(
    conn: AsyncConnection, members: Sequence[AudienceMemberResolved], now: datetime
) -> set[str]:
    """Seed timezone and consent from the snapshot (user.updated stays authoritative);
    returns the users already erased."""
    u = store.users
    rows = {
        m.user_id: {
            "user_id": m.user_id,
            "timezone": m.timezone,
            "consent": dict(m.consent),
            "fatigue": "normal",
            "unanswered": 0,
            "first_seen_at": now,
            "updated_at": now,
        }
        for m in members
    }
    ids = list(rows)
    if conn.dialect.name == "postgresql":
        seeds = list(rows.values())
        result = await conn.execute(
            _SEED_PG,
            {
                "u": ids,
                "tz": [r["timezone"] for r in seeds],
                "consent": [orjson.dumps(r["consent"]).decode() for r in seeds],
                "now": now,
            },
        )
        return set(result.scalars())
    erased: set[str] = set()
    for start in range(0, len(ids), _KEY_CHUNK):
        chunk = ids[start : start + _KEY_CHUNK]
        await conn.execute(insert_ignore(u).values([rows[i] for i in chunk]))
        erased.update(
            (
                await conn.execute(
                    select(u.c.user_id).where(u.c.user_id.in_(chunk), u.c.erased_at.is_not(None))
                )
            ).scalars()
        )
    return erased
