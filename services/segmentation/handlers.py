"""Segmentation's commands and event handlers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update

from services.segmentation import store
from shared.db import insert_ignore
from shared.events import AudienceMemberResolved, Event, PromotionEnded
from shared.service import ServiceContext

AUDIENCE_CHUNK = 1000
PARTICIPANT_CHUNK = 5000


async def add_participants(ctx: ServiceContext, promotion_id: str, user_ids: Sequence[str]) -> int:
    """Record participants idempotently; returns how many were new."""
    now = ctx.clock.now()
    unique = list(dict.fromkeys(user_ids))
    added = 0
    async with ctx.db.begin() as conn:
        # One multi-row statement per chunk: its row count is exact on both dialects
        # and it stays under the driver's limit of bind parameters.
        for start in range(0, len(unique), PARTICIPANT_CHUNK):
            rows = [
                {"promotion_id": promotion_id, "user_id": user_id, "added_at": now}
                for user_id in unique[start : start + PARTICIPANT_CHUNK]
            ]
            result = await conn.execute(insert_ignore(store.participants).values(rows))
            added += result.rowcount
    return added


async def on_promotion_ended(ctx: ServiceContext, event: Event[Any]) -> None:
    """Emit one audience event per participant, a chunk per transaction, in bounded memory."""
    ended: PromotionEnded = event.data
    async with ctx.db.begin() as conn:
        await conn.execute(
            insert_ignore(store.audiences),
            {
                "promotion_id": ended.promotion_id,
                "policy": ended.policy,
                "ended_at": ended.ended_at,
                "cursor": None,
                "completed_at": None,
            },
        )
    while True:
        async with ctx.db.begin() as conn:
            state = (
                await conn.execute(
                    select(store.audiences).where(
                        store.audiences.c.promotion_id == ended.promotion_id
                    )
                )
            ).one()
            if state.completed_at is not None:
                return
            query = (
                select(store.participants.c.user_id)
                .where(store.participants.c.promotion_id == ended.promotion_id)
                .order_by(store.participants.c.user_id)
                .limit(AUDIENCE_CHUNK)
            )
            if state.cursor is not None:
                query = query.where(store.participants.c.user_id > state.cursor)
            user_ids = list((await conn.execute(query)).scalars())
            now = ctx.clock.now()
            if not user_ids:
                await conn.execute(
                    update(store.audiences)
                    .where(store.audiences.c.promotion_id == ended.promotion_id)
                    .values(completed_at=now)
                )
                return
            await ctx.outbox.add(
                conn,
                [
                    AudienceMemberResolved(
                        user_id=user_id,
                        promotion_id=ended.promotion_id,
                        ended_at=ended.ended_at,
                        policy=ended.policy,
                    )
                    for user_id in user_ids
                ],
                now=now,
            )
            await conn.execute(
                update(store.audiences)
                .where(store.audiences.c.promotion_id == ended.promotion_id)
                .values(cursor=user_ids[-1])
            )
        ctx.outbox.notify()
