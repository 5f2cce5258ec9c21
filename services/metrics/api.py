"""Metrics' REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from services.metrics import domain, queries
from shared.auth import require_scope
from shared.problems import Problem
from shared.service import Ctx

router = APIRouter(prefix="/v1", tags=["metrics"])


class FunnelPublic(BaseModel):
    promotion_id: str
    group_by: list[str]
    rows: list[dict[str, Any]]


def parse_group_by(raw: str) -> list[str]:
    names = [part.strip() for part in raw.split(",") if part.strip()]
    bad = [n for n in names if n not in domain.GROUPS]
    if bad or not names or len(set(names)) != len(names):
        raise Problem(
            status=422,
            title="Invalid group_by",
            detail=f"group_by: a comma-separated list of distinct {', '.join(domain.GROUPS)}",
        )
    return names


@router.get("/funnel", dependencies=[Depends(require_scope("metrics:read"))])
async def get_funnel(
    ctx: Ctx,
    promotion_id: str = Query(min_length=1, max_length=128),
    group_by: str = Query("wave", max_length=64),
    wave: str | None = Query(None, max_length=16),
    channel: str | None = Query(None, max_length=16),
    segment: str | None = Query(None, max_length=64),
    variant: str | None = Query(None, max_length=64),
    since: datetime | None = None,
    until: datetime | None = None,
) -> FunnelPublic:
    """The funnel of a promotion: counts, money, rates and health per group."""
    groups = parse_group_by(group_by)
    filters = {
        name: value
        for name, value in (
            ("wave", wave),
            ("channel", channel),
            ("segment", segment),
            ("variant", variant),
        )
        if value is not None
    }
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise Problem(status=422, title="Invalid time", detail=f"{name}: needs a UTC offset")
    async with ctx.db.connect() as conn:
        rows = await queries.funnel(conn, promotion_id, groups, filters, since, until)
    return FunnelPublic(promotion_id=promotion_id, group_by=groups, rows=rows)
