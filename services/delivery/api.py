"""Delivery's REST routes: parse, call a handler, shape the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, RootModel, ValidationError

from services.delivery import domain, handlers
from services.delivery.runtime import DeliveryRuntime
from shared.auth import require_scope
from shared.events import Channel
from shared.problems import Problem, field_path
from shared.service import Ctx, ServiceContext

router = APIRouter(prefix="/v1", tags=["delivery"])

SIGNATURE_HEADER = "X-Afterglow-Signature"


def runtime(ctx: ServiceContext) -> DeliveryRuntime:
    rt: DeliveryRuntime | None = ctx.extras.get("delivery")
    if rt is None:
        raise Problem(503, "the delivery runtime is not running")
    return rt


class DeliveryPublic(BaseModel):
    touch_id: str
    # 0 for a touch's first channel; 1.. for the other channels of a parallel touch.
    lane: int = 0
    promotion_id: str
    wave: str
    channel: str | None
    variant: str | None
    status: str
    reason: str | None
    attempts: int
    cost: float
    provider_message_id: str | None
    coupon_code: str | None
    tried: list[str]
    at: datetime


class DeliveriesPublic(BaseModel):
    deliveries: list[DeliveryPublic]


class ChannelPublic(BaseModel):
    channel: str
    adapter: str
    configured: bool
    cost: float
    budget_per_promotion: float | None
    reserve_share: float
    spend: float
    sent: int
    remaining: float | None
    success_rate: float | None
    circuit: str
    rate_per_s: float


class ChannelsPublic(BaseModel):
    promotion_id: str | None
    channels: list[ChannelPublic]


class ReceiptIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # The touch id, or a parallel lane's Idempotency-Key `<touch id>:<channel>`.
    id: str = Field(min_length=1, max_length=81)
    event: Literal["delivered", "opened", "clicked", "bounced", "complained", "unsubscribed"]
    at: AwareDatetime
    # Which channel's send the receipt is about (a parallel touch has several).
    channel: Channel | None = None


class ReceiptAck(BaseModel):
    touch_id: str
    event: str
    recorded: bool


# A batch: a JSON array of receipts, as webhook providers send them (one signature for all).
MAX_RECEIPTS = 1000


class ReceiptBatch(RootModel[list[ReceiptIn]]):
    root: list[ReceiptIn] = Field(min_length=1, max_length=MAX_RECEIPTS)


class ReceiptsAck(BaseModel):
    receipts: list[ReceiptAck]  # the receipts of known touches, in order
    unknown: list[str]  # ids of the receipts that name no delivery


@router.get("/deliveries", dependencies=[Depends(require_scope("delivery:read"))])
async def list_deliveries(
    ctx: Ctx, user_id: str = Query(min_length=1, max_length=128)
) -> DeliveriesPublic:
    """Deliveries of one user, oldest first."""
    rows = await handlers.user_deliveries(ctx, user_id)
    return DeliveriesPublic(deliveries=[DeliveryPublic.model_validate(r) for r in rows])


@router.get("/channels", dependencies=[Depends(require_scope("delivery:read"))])
async def list_channels(
    ctx: Ctx, promotion_id: str | None = Query(None, min_length=1, max_length=128)
) -> ChannelsPublic:
    """Each channel's provider, cost, budget, spend, success rate and circuit state."""
    rows = await handlers.channel_report(ctx, runtime(ctx), promotion_id)
    return ChannelsPublic(
        promotion_id=promotion_id, channels=[ChannelPublic.model_validate(r) for r in rows]
    )


_RECEIPT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        ReceiptIn.model_json_schema(),
                        {
                            "type": "array",
                            "items": ReceiptIn.model_json_schema(),
                            "minItems": 1,
                            "maxItems": MAX_RECEIPTS,
                        },
                    ]
                }
            }
        },
    }
}


@router.post(
    "/receipts",
    status_code=202,
    openapi_extra=_RECEIPT_BODY,
    responses={200: {"description": "already recorded"}},
)
async def post_receipt(request: Request, ctx: Ctx) -> JSONResponse:
    """A provider receipt, signed with HMAC-SHA256 of the raw body; recorded once.

    A JSON array of receipts (at most 1000) is a batch: each is recorded as if posted
    alone; the answer lists the acks of known touches and the ids of unknown ones."""
    secret = ctx.settings.receipt_secret
    if secret is None:
        raise Problem(503, "receipts are refused: AFTERGLOW_RECEIPT_SECRET is not set")
    raw = await request.body()
    if not domain.signature_valid(
        secret.get_secret_value().encode(), raw, request.headers.get(SIGNATURE_HEADER)
    ):
        raise Problem(401, f"{SIGNATURE_HEADER} is missing or is not sha256=<HMAC of the raw body>")
    if raw.lstrip()[:1] == b"[":
        return await _post_receipts(ctx, raw)
    try:
        receipt = ReceiptIn.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        recorded = await handlers.record_receipt(
            ctx, receipt.id, receipt.event, receipt.at, receipt.channel
        )
    except handlers.UnknownTouch:
        raise Problem(404, f"no delivery for touch {receipt.id!r}", field="id") from None
    ack = ReceiptAck(touch_id=receipt.id, event=receipt.event, recorded=recorded)
    return JSONResponse(ack.model_dump(), status_code=202 if recorded else 200)


async def _post_receipts(ctx: ServiceContext, raw: bytes) -> JSONResponse:
    try:
        receipts = ReceiptBatch.model_validate_json(raw).root
    except ValidationError as exc:
        raise _invalid(exc) from None
    outcomes = await handlers.record_receipts(
        ctx, [(r.id, r.event, r.at, r.channel) for r in receipts]
    )
    acks: list[ReceiptAck] = []
    unknown: list[str] = []
    for receipt, recorded in zip(receipts, outcomes, strict=True):
        if recorded is None:
            unknown.append(receipt.id)
        else:
            acks.append(ReceiptAck(touch_id=receipt.id, event=receipt.event, recorded=recorded))
    return JSONResponse(
        ReceiptsAck(receipts=acks, unknown=unknown).model_dump(),
        status_code=202 if any(ack.recorded for ack in acks) else 200,
    )


def _invalid(exc: ValidationError) -> Problem:
    errors = []
    for error in exc.errors():
        path = "" if error["type"] == "json_invalid" else field_path(error["loc"])
        errors.append({"field": path or None, "location": "body", "message": error["msg"]})
    first = errors[0]
    field = first["field"] or ""
    where = f"body{'' if field.startswith('[') or not field else '.'}{field}"
    return Problem(422, f"{where}: {first['message']}", field=first["field"], errors=errors)
