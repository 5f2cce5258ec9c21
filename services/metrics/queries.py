"""Reads of the aggregates: the funnel, grouped and filtered."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
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
        select(*cols, m.c.measure, func.sum(m.c.value))
        .where(m.c.promotion_id == promotion_id)
        .group_by(*cols, m.c.measure)
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
        measure: str = row[len(group_by)]
        amount = float(row[len(group_by) + 1] or 0.0)
        bucket = groups.setdefault(key, {})
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
