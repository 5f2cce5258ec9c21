"""Scheduling's REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path
from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from services.scheduling import handlers, views
from services.scheduling.policy import Policy, PolicyError
from services.scheduling.state import UnknownPolicy
from shared.auth import require_scope
from shared.problems import Problem, field_path
from shared.service import Ctx

PromotionId = Annotated[str, Path(min_length=1, max_length=128)]
UserId = Annotated[str, Path(min_length=1, max_length=128)]
PolicyName = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]

router = APIRouter(prefix="/v1", tags=["scheduling"])
READ = [Depends(require_scope("scheduling:read"))]
WRITE = [Depends(require_scope("scheduling:write"))]


class PromotionEnd(BaseModel):
    ended_at: AwareDatetime
    name: str = Field("", max_length=256)
    policy: str = Field("default", min_length=1, max_length=64)


class PromotionEndAccepted(BaseModel):
    promotion_id: str
    accepted: bool
    already_ended: bool


class PromotionCancelAccepted(BaseModel):
    promotion_id: str
    cancelled_touches: int


class WavePlan(BaseModel):
    wave: str
    planned: int
    pending: int
    dispatched: int
    sent: int
    failed: int
    cancelled: int
    suppressed: dict[str, int]
    deferred: int
    deferred_hours_total: float
    deferred_hours_max: float


class PlanPublic(BaseModel):
    promotion_id: str
    name: str
    status: str
    ended_at: datetime
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
    status: Literal["planned", "sent", "suppressed", "failed", "cancelled"]
    reason: str | None
    planned_due_at: datetime | None
    deadline: datetime | None
    deferrals: int
    dispatched_at: datetime | None


class TouchesPublic(BaseModel):
    touches: list[TouchPublic]


class FatigueChangePublic(BaseModel):
    at: datetime
    signal: str
    channel: str | None
    from_: str = Field(alias="from")
    to: str

    model_config = {"populate_by_name": True}


class FatiguePublic(BaseModel):
    user_id: str
    state: str
    paused_channels: list[str]
    ignored_in_a_row: int
    last_engaged_at: datetime | None
    history: list[dict[str, Any]]


class PolicyPublic(BaseModel):
    name: str
    version: int
    policy: Policy


def _unknown_policy(exc: UnknownPolicy, field: str) -> Problem:
    return Problem(422, f"{field}: {exc}", title="Unknown policy", field=field)


@router.post("/promotions/{promotion_id}/end", status_code=202, dependencies=WRITE)
async def end_promotion(
    promotion_id: PromotionId, body: PromotionEnd, ctx: Ctx
) -> PromotionEndAccepted:
    """End a promotion and plan its follow-up (idempotent: ending twice plans once)."""
    try:
        created = await handlers.end_promotion(
            ctx, promotion_id, ended_at=body.ended_at, name=body.name, policy=body.policy
        )
    except UnknownPolicy as exc:
        raise _unknown_policy(exc, "policy") from exc
    return PromotionEndAccepted(promotion_id=promotion_id, accepted=True, already_ended=not created)


@router.post("/promotions/{promotion_id}/cancel", status_code=202, dependencies=WRITE)
async def cancel_promotion(promotion_id: PromotionId, ctx: Ctx) -> PromotionCancelAccepted:
    """Cancel a promotion's follow-up: every pending touch stops (idempotent)."""
    cancelled = await handlers.cancel_promotion(ctx, promotion_id)
    if cancelled is None:
        raise Problem(404, f"promotion {promotion_id!r} has not ended here", field="promotion_id")
    return PromotionCancelAccepted(promotion_id=promotion_id, cancelled_touches=cancelled)


@router.get("/promotions/{promotion_id}/plan", dependencies=READ)
async def get_plan(promotion_id: PromotionId, ctx: Ctx) -> PlanPublic:
    """Per wave: planned, pending, sent, failed, suppressed by reason, deferred and by how long."""
    summary = await views.plan_summary(ctx, promotion_id)
    if summary is None:
        raise Problem(
            status=404,
            title="Unknown promotion",
            detail=f"promotion {promotion_id!r} has not ended here",
            field="promotion_id",
        )
    return PlanPublic.model_validate(summary)


@router.get("/users/{user_id}/touches", dependencies=READ)
async def get_touches(user_id: UserId, ctx: Ctx) -> TouchesPublic:
    """Every touch planned for a user, oldest first."""
    touches = await views.user_touches(ctx, user_id)
    return TouchesPublic(touches=[TouchPublic.model_validate(t) for t in touches])


@router.get("/users/{user_id}/fatigue", dependencies=READ)
async def get_fatigue(user_id: UserId, ctx: Ctx) -> FatiguePublic:
    """A user's fatigue state (per channel pauses included) and how it got there."""
    return FatiguePublic.model_validate(await views.user_fatigue(ctx, user_id))


@router.get("/policies/{name}", dependencies=READ)
async def get_policy(name: PolicyName, ctx: Ctx) -> PolicyPublic:
    """The newest version of a policy (`default` ships with DOMAIN.md's figures)."""
    try:
        version, policy = await handlers.get_policy(ctx, name)
    except UnknownPolicy as exc:
        raise Problem(404, str(exc), title="Unknown policy", field="name") from exc
    return PolicyPublic(name=name, version=version, policy=policy)


@router.put("/policies/{name}", dependencies=WRITE)
async def put_policy(
    name: PolicyName, ctx: Ctx, body: Annotated[dict[str, Any], Body()]
) -> PolicyPublic:
    """Store a new version of a policy; promotions keep the version they were planned with."""
    try:
        policy = Policy.model_validate(body)
    except ValidationError as exc:
        raise policy_problem(exc) from exc
    version, _ = await handlers.put_policy(ctx, name, policy)
    return PolicyPublic(name=name, version=version, policy=policy)


def policy_problem(exc: ValidationError) -> Problem:
    """A refused policy as a 422 naming the field (e.g. `caps.per_7d`)."""
    errors: list[dict[str, Any]] = []
    for error in exc.errors():
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, PolicyError):
            errors.append({"field": cause.field, "location": "body", "message": cause.message})
        else:
            path = field_path(list(error.get("loc") or ()))
            errors.append({"field": path or None, "location": "body", "message": error["msg"]})
    first = errors[0]
    return Problem(
        422, f"body.{first['field']}: {first['message']}", field=first["field"], errors=errors
    )
