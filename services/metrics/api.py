"""Metrics' REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from services.metrics import handlers
from shared.auth import require_scope
from shared.service import Ctx

router = APIRouter(prefix="/v1", tags=["metrics"])


class FunnelPublic(BaseModel):
    promotion_id: str
    group_by: list[str]
    rows: list[dict[str, Any]]


@router.get("/funnel", dependencies=[Depends(require_scope("metrics:read"))])
async def get_funnel(
    ctx: Ctx,
    promotion_id: str = Query(min_length=1, max_length=128),
    group_by: Literal["wave"] = "wave",
) -> FunnelPublic:
    """The funnel of a promotion: counts and rates per wave."""
    rows = await handlers.funnel_by_wave(ctx, promotion_id)
    return FunnelPublic(promotion_id=promotion_id, group_by=[group_by], rows=rows)
