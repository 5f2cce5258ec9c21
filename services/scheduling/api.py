"""Scheduling's REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import AwareDatetime, BaseModel, Field

from services.scheduling import handlers
from shared.auth import require_scope
from shared.problems import Problem
from shared.service import Ctx

PromotionId = Annotated[str, Path(min_length=1, max_length=128)]
UserId = Annotated[str, Path(min_length=1, max_length=128)]

router = APIRouter(prefix="/v1", tags=["scheduling"])


class PromotionEnd(BaseModel):
    ended_at: AwareDatetime
    name: str = Field("", max_length=256)
    policy: str = Field("default", min_length=1, max_length=64)


class PromotionEndAccepted(BaseModel):
    promotion_id: str
    accepted: bool
    already_ended: bool


class WavePlan(BaseModel):
    wave: str
    planned: int
    pending: int
    sent: int
    failed: int
    suppressed: dict[str, int]


class PlanPublic(BaseModel):
    promotion_id: str
    policy: str
    policy_version: int
    waves: list[WavePlan]


class TouchPublic(BaseModel):
    id: str
    promotion_id: str
    wave: str
    channel: str | None
    variant: str | None
    due_at: datetime
    status: str
    reason: str | None


class TouchesPublic(BaseModel):
    touches: list[TouchPublic]


@router.post(
    "/promotions/{promotion_id}/end",
    status_code=202,
    dependencies=[Depends(require_scope("scheduling:write"))],
)
async def end_promotion(
    promotion_id: PromotionId, body: PromotionEnd, ctx: Ctx
) -> PromotionEndAccepted:
    """End a promotion and plan its follow-up (idempotent)."""
    created = await handlers.end_promotion(
        ctx, promotion_id, ended_at=body.ended_at, name=body.name, policy=body.policy
    )
    return PromotionEndAccepted(promotion_id=promotion_id, accepted=True, already_ended=not created)


@router.get(
    "/promotions/{promotion_id}/plan",
    dependencies=[Depends(require_scope("scheduling:read"))],
)
async def get_plan(promotion_id: PromotionId, ctx: Ctx) -> PlanPublic:
    """Per wave: planned, pending, sent, failed and suppressed by reason."""
    summary: dict[str, Any] | None = await handlers.plan_summary(ctx, promotion_id)
    if summary is None:
        raise Problem(
            status=404,
            title="Unknown promotion",
            detail=f"promotion {promotion_id!r} has not ended here",
            field="promotion_id",
        )
    return PlanPublic.model_validate(summary)


@router.get(
    "/users/{user_id}/touches",
    dependencies=[Depends(require_scope("scheduling:read"))],
)
async def get_touches(user_id: UserId, ctx: Ctx) -> TouchesPublic:
    """Every touch planned for a user, oldest first."""
    touches = await handlers.user_touches(ctx, user_id)
    return TouchesPublic(touches=[TouchPublic.model_validate(t) for t in touches])
