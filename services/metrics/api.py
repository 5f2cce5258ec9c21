"""Metrics' REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel

from services.metrics import alerts, domain, queries
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


class ExperimentPublic(BaseModel):
    promotion_id: str
    method: str
    holdout: dict[str, Any]
    variants: list[dict[str, Any]]
    waves: list[dict[str, Any]]


@router.get("/experiments/{promotion_id}", dependencies=[Depends(require_scope("metrics:read"))])
async def get_experiment(
    ctx: Ctx, promotion_id: str = Path(min_length=1, max_length=128)
) -> ExperimentPublic:
    """Each variant against the holdout, and each wave against its own holdout: conversion,
    uplift (difference of proportions) with a 95% Wald interval, and the sample needed."""
    async with ctx.db.connect() as conn:
        found = await queries.experiment(conn, promotion_id)
    if found is None:
        raise Problem(
            status=404, title="Unknown promotion", detail=f"promotion_id {promotion_id!r}: no touch"
        )
    return ExperimentPublic(method=METHOD, **found)


METHOD = (
    "uplift = difference of conversion proportions; 95% Wald interval (normal approximation); "
    "sample per group for 80% power at alpha 0.05 (two-sided) at the observed effect"
)


class AlertsPublic(BaseModel):
    alerts: list[dict[str, Any]]
    next_cursor: str | None


@router.get("/alerts", dependencies=[Depends(require_scope("metrics:read"))])
async def get_alerts(
    ctx: Ctx,
    promotion_id: str | None = Query(None, min_length=1, max_length=128),
    status: Literal["open", "resolved"] | None = None,
    limit: int = Query(100, ge=1, le=500),
    cursor: str | None = Query(None, max_length=256),
) -> AlertsPublic:
    """Business alerts, newest day first; pass `next_cursor` back as `cursor` for more."""
    after = None
    if cursor is not None:
        after = alerts.parse_cursor(cursor)
        if after is None:
            raise Problem(
                status=422, title="Invalid cursor", detail="cursor: use next_cursor as given"
            )
    async with ctx.db.connect() as conn:
        rows, next_cursor = await alerts.list_alerts(
            conn, promotion_id=promotion_id, status=status, limit=limit, after=after
        )
    return AlertsPublic(alerts=rows, next_cursor=next_cursor)


class TrafficLightsPublic(BaseModel):
    traffic_lights: list[dict[str, Any]]


@router.get("/traffic-lights", dependencies=[Depends(require_scope("metrics:read"))])
async def get_traffic_lights(
    ctx: Ctx, promotion_id: str | None = Query(None, min_length=1, max_length=128)
) -> TrafficLightsPublic:
    """Each promotion's traffic light (red: conversion under its baseline 3 days in a row)."""
    async with ctx.db.connect() as conn:
        rows = await alerts.list_lights(conn, promotion_id)
    return TrafficLightsPublic(traffic_lights=rows)
