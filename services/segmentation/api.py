"""Segmentation's REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field, StringConstraints

from services.segmentation import handlers
from shared.auth import require_scope
from shared.service import Ctx

UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
PromotionId = Annotated[str, Path(min_length=1, max_length=128)]

router = APIRouter(prefix="/v1", tags=["segmentation"])


class ParticipantsCreate(BaseModel):
    user_ids: list[UserId] = Field(min_length=1, max_length=10_000)


class ParticipantsAccepted(BaseModel):
    promotion_id: str
    received: int
    added: int


@router.post(
    "/promotions/{promotion_id}/participants",
    status_code=202,
    dependencies=[Depends(require_scope("segmentation:write"))],
)
async def add_participants(
    promotion_id: PromotionId, body: ParticipantsCreate, ctx: Ctx
) -> ParticipantsAccepted:
    """Add participants to a promotion (idempotent)."""
    added = await handlers.add_participants(ctx, promotion_id, body.user_ids)
    return ParticipantsAccepted(promotion_id=promotion_id, received=len(body.user_ids), added=added)
