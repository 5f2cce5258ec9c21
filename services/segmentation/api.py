"""Segmentation's REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Literal, NotRequired

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from typing_extensions import TypedDict

from services.segmentation import handlers
from shared.auth import require_scope
from shared.events import Channel
from shared.problems import Problem
from shared.service import Ctx

UserId = Annotated[str, StringConstraints(min_length=1, max_length=128, strip_whitespace=True)]
PromotionId = Annotated[str, Path(min_length=1, max_length=128)]
UserIdPath = Annotated[str, Path(min_length=1, max_length=128)]
Address = Annotated[str, StringConstraints(min_length=1, max_length=512, strip_whitespace=True)]
Ref = Annotated[str, StringConstraints(min_length=1, max_length=128)]

router = APIRouter(prefix="/v1", tags=["segmentation"])
READ = [Depends(require_scope("segmentation:read"))]
WRITE = [Depends(require_scope("segmentation:write"))]
MAX_ACTIVITIES = 1000
AMOUNT_KINDS = ("purchase", "refund")


# -- users -----------------------------------------------------------------------------------


class UserUpdate(BaseModel):
    """A profile; fields left out keep their current value."""

    model_config = ConfigDict(extra="forbid")
    birth_year: int | None = Field(None, ge=1900, le=2100)
    timezone: str = Field("UTC", min_length=1, max_length=64)
    locale: str | None = Field(None, min_length=2, max_length=35)
    addresses: dict[Channel, Address] = Field(default_factory=dict)
    consent: dict[Channel, bool] = Field(default_factory=dict)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r}") from None
        return value


class UserPublic(BaseModel):
    user_id: str
    birth_year: int | None
    timezone: str
    locale: str | None
    addresses: dict[str, str]
    consent: dict[str, bool]
    created_at: datetime
    updated_at: datetime


def _public(profile: handlers.Profile) -> UserPublic:
    return UserPublic(**profile.__dict__)


@router.put("/users/{user_id}", dependencies=WRITE)
async def put_user(
    user_id: UserIdPath, body: UserUpdate, ctx: Ctx, response: Response
) -> UserPublic:
    """Create or update a user's profile, addresses and consent."""
    changes = body.model_dump(include=body.model_fields_set)
    profile, created = await handlers.put_user(ctx, user_id, changes)
    response.status_code = 201 if created else 200
    return _public(profile)


@router.get("/users/{user_id}", dependencies=READ)
async def get_user(user_id: UserIdPath, ctx: Ctx) -> UserPublic:
    """A user's profile, addresses and consent."""
    profile = await handlers.get_user(ctx, user_id)
    if profile is None:
        raise Problem(404, f"no user {user_id!r}", field="user_id")
    return _public(profile)


@router.delete("/users/{user_id}", status_code=204, dependencies=WRITE)
async def erase_user(user_id: UserIdPath, ctx: Ctx) -> Response:
    """Erase a user's personal data here and tell every other service to do the same."""
    await handlers.erase_user(ctx, user_id)
    return Response(status_code=204)


# -- activities --------------------------------------------------------------------------------


class ActivityCreate(TypedDict):
    """One purchase or interaction; left-out optional fields are null."""

    id: Ref
    user_id: UserId
    kind: Literal["purchase", "visit", "click", "open", "refund"]
    occurred_at: AwareDatetime
    amount: NotRequired[Annotated[float | None, Field(ge=0, allow_inf_nan=False)]]
    currency: NotRequired[Annotated[str | None, Field(pattern=r"^[A-Z]{3}$")]]
    item_id: NotRequired[Ref | None]
    category: NotRequired[Ref | None]
    promotion_id: NotRequired[Ref | None]


class ActivitiesCreate(TypedDict):
    activities: Annotated[list[ActivityCreate], Field(min_length=1, max_length=MAX_ACTIVITIES)]


# Validated straight from the request bytes into dicts (no model per item): a batch of
# 1,000 costs about a millisecond instead of the ten a model per item costs.
ACTIVITIES = TypeAdapter(ActivitiesCreate)


def _inline_refs(schema: Any, defs: dict[str, Any]) -> Any:
    """The JSON schema with its local `$defs` references replaced by what they name."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline_refs(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline_refs(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline_refs(v, defs) for v in schema]
    return schema


def _activities_schema() -> dict[str, Any]:
    schema = ACTIVITIES.json_schema()
    inlined: dict[str, Any] = _inline_refs(schema, schema.get("$defs", {}))
    return inlined


ACTIVITIES_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": _activities_schema()}},
    }
}


class ActivitiesAccepted(BaseModel):
    received: int
    recorded: int
    duplicates: int


def _parse_activities(raw: bytes) -> list[dict[str, Any]]:
    """The batch, validated; errors name the item index and the field (FastAPI's 422 shape)."""
    try:
        body = ACTIVITIES.validate_json(raw)
    except ValidationError as exc:
        errors = []
        for error in exc.errors(include_url=False):
            entry = dict(error)
            entry["loc"] = ("body", *error["loc"])
            errors.append(entry)
        raise RequestValidationError(errors) from None
    items: list[dict[str, Any]] = body["activities"]  # type: ignore[assignment]
    _require_amounts(items)
    return items


def _require_amounts(activities: list[dict[str, Any]]) -> None:
    errors = [
        {
            "field": f"activities[{index}].amount",
            "location": "body",
            "message": f"an amount is required for a {item['kind']}",
        }
        for index, item in enumerate(activities)
        if item["kind"] in AMOUNT_KINDS and item.get("amount") is None
    ]
    if errors:
        detail = f"body.{errors[0]['field']}: {errors[0]['message']}"
        if len(errors) > 1:
            detail += f" (and {len(errors) - 1} more)"
        raise Problem(422, detail, field=errors[0]["field"], errors=errors)


@router.post("/activities", status_code=202, dependencies=WRITE, openapi_extra=ACTIVITIES_BODY)
async def record_activities(request: Request, ctx: Ctx) -> ActivitiesAccepted:
    """Record a batch of up to 1,000 purchases and interactions (idempotent by activity id)."""
    items = _parse_activities(await request.body())
    recorded = await handlers.record_activity_items(ctx, items)
    received = len(items)
    return ActivitiesAccepted(received=received, recorded=recorded, duplicates=received - recorded)


# -- participants ------------------------------------------------------------------------------


class ParticipantsCreate(BaseModel):
    user_ids: list[UserId] = Field(min_length=1, max_length=10_000)


class ParticipantsAccepted(BaseModel):
    promotion_id: str
    received: int
    added: int


@router.post("/promotions/{promotion_id}/participants", status_code=202, dependencies=WRITE)
async def add_participants(
    promotion_id: PromotionId, body: ParticipantsCreate, ctx: Ctx
) -> ParticipantsAccepted:
    """Add participants to a promotion (idempotent)."""
    added = await handlers.add_participants(ctx, promotion_id, body.user_ids)
    return ParticipantsAccepted(promotion_id=promotion_id, received=len(body.user_ids), added=added)


# -- segments ----------------------------------------------------------------------------------


class Rfm(BaseModel):
    r: int | None
    f: int | None
    m: int | None
    tier: str | None


class SegmentPublic(BaseModel):
    user_id: str
    rfm: Rfm
    ltv: float
    ltv_tier: str
    age_band: str
    value_layer: str | None
    silent: bool
    tags: list[str]
    channel_order: list[Channel]
    abuse_review: bool
    scored_at: datetime | None


@router.get("/users/{user_id}/segment", dependencies=READ)
async def get_segment(user_id: UserIdPath, ctx: Ctx) -> SegmentPublic:
    """A user's RFM scores and tier, LTV tier, age band, value layer, tags and channel order."""
    seg = await handlers.segment(ctx, user_id)
    if seg is None:
        raise Problem(404, f"nothing is known about user {user_id!r}", field="user_id")
    scores = seg.scores
    return SegmentPublic(
        user_id=seg.user_id,
        rfm=Rfm(
            r=scores.r if scores else None,
            f=scores.f if scores else None,
            m=scores.m if scores else None,
            tier=seg.rfm_tier,
        ),
        ltv=seg.ltv,
        ltv_tier=seg.ltv_tier,
        age_band=seg.age_band,
        value_layer=seg.value_layer,
        silent=seg.silent,
        tags=seg.tags,
        channel_order=seg.channel_order,
        abuse_review=seg.abuse_review,
        scored_at=seg.scored_at,
    )


class SegmentCounts(BaseModel):
    scored_at: datetime | None
    users: int
    rfm: dict[str, int]
    ltv_tier: dict[str, int]
    value_layer: dict[str, int]
    age_band: dict[str, int]
    silent: int
    abuse_review: int


@router.get("/segments", dependencies=READ)
async def get_segments(ctx: Ctx) -> SegmentCounts:
    """Users per RFM tier, LTV tier, value layer and age band (as of the last ranking)."""
    counts: dict[str, Any] = await handlers.segment_counts(ctx)
    return SegmentCounts(**counts)
