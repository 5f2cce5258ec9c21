"""Reads of the aggregates: the funnel, grouped and filtered."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, distinct, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from services.metrics import domain, store


async def funnel(
    conn: AsyncConnection,
    promotion_id: str,
    group_by: Sequence[str] = ("wave",),
    filters: dict[str, str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """One row per combination of `group_by` (minute buckets in [since, until))."""
    m = store.minute_counts
    cols = [m.c[g] for g in group_by]
    query = (
        select(*cols, *(func.sum(m.c[store.measure_column(x)]) for x in store.MEASURES))
        .where(m.c.promotion_id == promotion_id)
        .group_by(*cols)
    )
    for name, value in (filters or {}).items():
        query = query.where(m.c[name] == value)
    if since is not None:
        query = query.where(m.c.minute >= since)
    if until is not None:
        query = query.where(m.c.minute < until)
    groups: dict[tuple[str, ...], dict[str, float]] = {}
    overall: dict[str, float] = {}
    for row in (await conn.execute(query)).all():
        key = tuple(row[: len(group_by)])
        bucket = groups.setdefault(key, {})
        for measure, total in zip(store.MEASURES, row[len(group_by) :], strict=True):
            amount = float(total or 0.0)
            if amount:
                bucket[measure] = bucket.get(measure, 0.0) + amount
                overall[measure] = overall.get(measure, 0.0) + amount
    promotion_aov = domain.rate(overall.get("revenue", 0.0), overall.get("orders", 0.0))
    out = []
    for key, measures in sorted(groups.items()):
        if not any(round(v, 9) for v in measures.values()):
            continue
        out.append(
            {
                **dict(zip(group_by, key, strict=True)),
                **domain.funnel_row(measures, promotion_aov),
            }
        )
    return out


async def experiment(conn: AsyncConnection, promotion_id: str) -> dict[str, Any] | None:
    """Variants against the holdout, and each wave against its own holdout (None: unknown).

    Per user (distinct user ids), from the touches and their attributed purchases:
    - a variant's participants: users with a touch of that variant sent; converted: those
      with a purchase attributed to such a touch;
    - the holdout: users held out with no touch of the promotion sent (the promotion's
      holdout); converted: those with a purchase attributed to a held-out touch;
    - a wave: its touches sent against its touches held out of that wave only (users who
      got another wave of the promotion), converted as above.
    """
    t = store.touches
    mine = t.c.promotion_id == promotion_id
    known = (await conn.execute(select(t.c.touch_id).where(mine).limit(1))).first()
    if known is None:
        return None
    got = case((t.c.orders > 0, t.c.user_id))
    sent_users = select(t.c.user_id).where(mine, t.c.exposure == "sent")
    variants = (
        await conn.execute(
            select(t.c.variant, func.count(distinct(t.c.user_id)), func.count(distinct(got)))
            .where(mine, t.c.exposure == "sent")
            .group_by(t.c.variant)
            .order_by(t.c.variant)
        )
    ).all()
    held = (
        await conn.execute(
            select(func.count(distinct(t.c.user_id)), func.count(distinct(got))).where(
                mine, t.c.exposure == "holdout", t.c.user_id.not_in(sent_users)
            )
        )
    ).one()
    waves = (
        await conn.execute(
            select(
                t.c.wave,
                t.c.exposure,
                func.count(distinct(t.c.user_id)),
                func.count(distinct(got)),
            )
            .where(
                mine,
                or_(
                    t.c.exposure == "sent",
                    and_(t.c.exposure == "holdout", t.c.user_id.in_(sent_users)),
                ),
            )
            .group_by(t.c.wave, t.c.exposure)
        )
    ).all()
    h_n, h_x = int(held[0]), int(held[1])
    by_wave: dict[str, dict[str, tuple[int, int]]] = {}
    for wave, exposure, n, x in waves:
        by_wave.setdefault(wave, {})[exposure] = (int(n), int(x))
    return {
        "promotion_id": promotion_id,
        "holdout": domain.group_row("holdout", h_n, h_x),
        "variants": [
            {
                **domain.group_row(v, int(n), int(x)),
                **domain.comparison(int(x), int(n), h_x, h_n),
            }
            for v, n, x in variants
        ],
        "waves": [
            {
                "wave": wave,
                "treated": domain.group_row("treated", *g.get("sent", (0, 0))),
                "held_out": domain.group_row("held_out", *g.get("holdout", (0, 0))),
                **domain.comparison(
                    g.get("sent", (0, 0))[1],
                    g.get("sent", (0, 0))[0],
                    g.get("holdout", (0, 0))[1],
                    g.get("holdout", (0, 0))[0],
                ),
            }
            for wave, g in sorted(by_wave.items())
        ],
    }
