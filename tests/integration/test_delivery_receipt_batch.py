"""`POST /v1/receipts` with a JSON array: a provider's batch of receipts under one signature,
each recorded as if posted alone (the demo sends its users' reactions this way)."""

from __future__ import annotations

import orjson

from tests.integration.test_delivery_service import (
    _ready,
    channels,
    delivery,
    eventually,
    touch,
    user,
)
from tests.support.provider_server import ProviderServer

AT = "2026-03-08T12:05:00+00:00"


async def test_a_batch_of_receipts_is_recorded_once_each_and_names_unknown_touches(
    database_url: str,
) -> None:
    async with (
        ProviderServer() as email,
        delivery(database_url, channels(email={"base_url": email.url})) as stack,
    ):
        await stack.users(user("u-1", "email"), user("u-2", "email"))
        await stack.publish(touch("t-1", "u-1", "email"), touch("t-2", "u-2", "email"))
        await stack.settled(2)
        batch = [
            {"id": "t-1", "event": "delivered", "at": AT},
            {"id": "t-1", "event": "opened", "at": AT},
            {"id": "nope", "event": "opened", "at": AT},
            {"id": "t-2", "event": "delivered", "at": AT},
            {"id": "t-1", "event": "opened", "at": AT},  # repeated: recorded once
        ]
        answer = await stack.post_receipt(orjson.dumps(batch))
        assert answer.status_code == 202, answer.text
        assert answer.json() == {
            "receipts": [
                {"touch_id": "t-1", "event": "delivered", "recorded": True},
                {"touch_id": "t-1", "event": "opened", "recorded": True},
                {"touch_id": "t-2", "event": "delivered", "recorded": True},
                {"touch_id": "t-1", "event": "opened", "recorded": False},
            ],
            "unknown": ["nope"],
        }
        await eventually(lambda: _ready(len(stack.events("engagements")) == 3))
        kinds = sorted((e.touch_id, e.kind) for e in stack.events("engagements"))
        assert kinds == [("t-1", "delivered"), ("t-1", "opened"), ("t-2", "delivered")]

        again = await stack.post_receipt(orjson.dumps(batch[:2]))
        assert again.status_code == 200 and not any(r["recorded"] for r in again.json()["receipts"])


async def test_a_bad_batch_is_refused_whole_with_the_item_named(database_url: str) -> None:
    async with delivery(database_url, channels()) as stack:
        good = {"id": "t-1", "event": "opened", "at": AT}
        bad = await stack.post_receipt(orjson.dumps([good, {"id": "t-1", "event": "read"}]))
        assert bad.status_code == 422
        problem = bad.json()
        assert problem["field"] == "[1].event" and problem["detail"].startswith("body[1].event")
        empty = await stack.post_receipt(b"[]")
        assert empty.status_code == 422
        too_many = await stack.post_receipt(orjson.dumps([good] * 1001))
        assert too_many.status_code == 422
        unsigned = await stack.post_receipt(orjson.dumps([good]), signature="sha256=" + "0" * 64)
        assert unsigned.status_code == 401
