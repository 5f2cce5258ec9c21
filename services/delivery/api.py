"""Delivery's REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel

from services.delivery import handlers
from shared.auth import require_scope
from shared.service import Ctx

router = APIRouter(prefix="/v1", tags=["delivery"])


class DeliveryPublic(BaseModel):
    touch_id: str
    promotion_id: str
    wave: str
    channel: str | None
    status: str
    attempts: int
    at: datetime


class DeliveriesPublic(BaseModel):
    deliveries: list[DeliveryPublic]


@router.get("/deliveries", dependencies=[Depends(require_scope("delivery:read"))])
async def list_deliveries(
    ctx: Ctx, user_id: str = Query(min_length=1, max_length=128)
) -> DeliveriesPublic:
    """Deliveries of one user, oldest first."""
    rows = await handlers.user_deliveries(ctx, user_id)
    return DeliveriesPublic(deliveries=[DeliveryPublic.model_validate(r) for r in rows])
