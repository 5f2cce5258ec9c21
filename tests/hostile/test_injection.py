"""User ids and templates that try injection (SQL, HTML/script, path traversal, CRLF, template
placeholders) are stored and shown back as data, byte for byte, on SQLite and PostgreSQL:
segmentation user ids, scheduling policy templates (through to the touch.due they plan), and
delivery rendering (through to the provider's request).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from datetime import timedelta
from typing import Any

import httpx
import pytest

from services.scheduling.policy import default_policy
from services.segmentation.app import SPEC as SEGMENTATION
from shared.bus import OutMessage
from shared.events import TouchDue, encode
from shared.problems import PROBLEM_MEDIA_TYPE
from tests.hostile.apps import ADMIN_TOKEN, serving, settings_for
from tests.integration import test_delivery_service as delivery_support
from tests.integration import test_scheduling_service as scheduling_support
from tests.integration.scheduling_harness import scheduling
from tests.support.provider_server import ProviderServer

pytestmark = pytest.mark.timeout(120)

HOSTILE_IDS = [
    "u'; DROP TABLE users; --",
    'u"); DELETE FROM segmentation.activities; --',
    "u' OR '1'='1",
    "<svg onload=alert('id')>",
    "<img src=x onerror=alert(1)>",
    "..",
    "..\\..\\windows\\win.ini",
    "%2e%2e%2fetc%2fpasswd",
    "u\r\nSet-Cookie: owned=1",
    "${coupon}{{7*7}}%s",
    "用户-ü-🙂",
]
# Ids that cannot travel in a path segment (they hold "/"): refused as an unknown route there,
# and stored as data where they come in a body.
SLASHED_IDS = ["../../etc/passwd", "/v1/segments", "<script>alert('id')</script>"]
SUBJECT = "Offer\r\nBcc: everyone@evil.example\r\nX-Injected: yes"
TEMPLATE = (
    "Hi ${name} <script>alert('t')</script> '; DROP TABLE touches; -- "
    "../../etc/passwd {{7*7}} %(x)s ${coupon}"
)


def quoted(user_id: str) -> str:
    """One path segment; dots encoded too, or the client would resolve `..` itself."""
    return urllib.parse.quote(user_id, safe="").replace(".", "%2E")


def assert_plain_json(response: httpx.Response) -> None:
    """Data comes back as JSON, never as a page, and no header was injected."""
    assert response.headers["content-type"].startswith(("application/json", PROBLEM_MEDIA_TYPE))
    assert "set-cookie" not in response.headers
    assert "x-injected" not in response.headers


# `database_url` (tests/conftest.py): SQLite and PostgreSQL, each test on a fresh database.


def segmentation(database_url: str) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    app = SEGMENTATION.create_app(settings_for("segmentation", database_url))
    return serving(app, "segmentation", ADMIN_TOKEN)


async def test_hostile_user_ids_are_stored_and_shown_as_data(database_url: str) -> None:
    async with segmentation(database_url) as client:
        for i, user_id in enumerate(HOSTILE_IDS):
            profile = {
                "timezone": "Asia/Shanghai",
                "addresses": {"email": f"<script>{i}</script>@example.com"},
                "consent": {"email": True},
            }
            put = await client.put(f"/v1/users/{quoted(user_id)}", json=profile)
            assert put.status_code == 201, (user_id, put.text)
            assert_plain_json(put)
            assert put.json()["user_id"] == user_id
            got = await client.get(f"/v1/users/{quoted(user_id)}")
            assert got.status_code == 200, (user_id, got.text)
            assert_plain_json(got)
            assert got.json()["user_id"] == user_id
            assert got.json()["addresses"]["email"] == f"<script>{i}</script>@example.com"

        activities = [
            {
                "id": f"a-{i}-'; DROP TABLE activities; --",
                "user_id": user_id,
                "kind": "purchase",
                "occurred_at": "2026-03-01T10:00:00Z",
                "amount": 10.0,
                "item_id": "<b>sku</b>",
                "category": "../../etc",
            }
            for i, user_id in enumerate(HOSTILE_IDS + SLASHED_IDS)
        ]
        recorded = await client.post("/v1/activities", json={"activities": activities})
        assert recorded.status_code == 202, recorded.text
        assert recorded.json() == {
            "received": len(activities),
            "recorded": len(activities),
            "duplicates": 0,
        }
        again = await client.post("/v1/activities", json={"activities": activities})
        assert again.json()["duplicates"] == len(activities), "each id was stored as given"

        participants = await client.post(
            f"/v1/promotions/{quoted(HOSTILE_IDS[0])}/participants",
            json={"user_ids": HOSTILE_IDS + SLASHED_IDS},
        )
        assert participants.status_code == 202, participants.text
        assert participants.json()["promotion_id"] == HOSTILE_IDS[0]
        assert participants.json()["added"] == len(HOSTILE_IDS + SLASHED_IDS)

        for user_id in SLASHED_IDS:
            traversal = await client.get(f"/v1/users/{quoted(user_id)}")
            assert traversal.status_code == 404, traversal.text
            assert traversal.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
            assert "no route" in traversal.json()["detail"]

        # The tables are all still there and hold exactly what was sent.
        counts = await client.get("/v1/segments")
        assert counts.status_code == 200, counts.text
        for user_id in HOSTILE_IDS:
            erased = await client.delete(f"/v1/users/{quoted(user_id)}")
            assert erased.status_code == 204, (user_id, erased.text)
        assert (await client.get(f"/v1/users/{quoted(HOSTILE_IDS[1])}")).status_code == 404


def hostile_waves() -> list[dict[str, Any]]:
    waves: list[dict[str, Any]] = default_policy().model_dump(mode="json")["waves"]
    for wave in waves:
        wave["purpose"] = "<h1>purpose</h1>\r\nX-Injected: yes"
        for by_channel in wave["content"].values():
            for content in by_channel.values():
                content["subject"] = SUBJECT
                content["body"] = TEMPLATE
    return waves


async def test_hostile_policy_templates_are_stored_and_planned_as_data(
    database_url: str,
) -> None:
    end = scheduling_support.END
    async with scheduling(database_url, end) as service:
        waves = hostile_waves()
        await scheduling_support.put_policy(service, "hostile", waves=waves)
        got = await service.client.get("/v1/policies/hostile")
        assert got.status_code == 200, got.text
        assert_plain_json(got)
        assert got.json()["policy"]["waves"] == waves

        for name in ("x'; DROP TABLE policies; --", "<script>", "..", "a\r\nb"):
            refused = await service.client.put(f"/v1/policies/{quoted(name)}", json={})
            assert refused.status_code in (404, 422), (name, refused.text)
            assert refused.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)

        user_id = HOSTILE_IDS[0]
        await scheduling_support.end(service, HOSTILE_IDS[3], "hostile")
        await scheduling_support.plan_users(
            service,
            scheduling_support.member(user_id, promotion=HOSTILE_IDS[3], policy="hostile"),
        )
        await service.run_until(end + timedelta(hours=1))

        touches = await service.client.get(f"/v1/users/{quoted(user_id)}/touches")
        assert touches.status_code == 200, touches.text
        assert_plain_json(touches)
        listed = touches.json()["touches"]
        assert listed and {t["promotion_id"] for t in listed} == {HOSTILE_IDS[3]}
        due = service.emitted(TouchDue)
        assert due, "the launch wave was sent"
        for event in due:
            assert event.data.user_id == user_id
            for content in event.data.content.values():
                assert content.body == TEMPLATE
                assert content.subject in (SUBJECT, "")


async def test_rendering_fills_placeholders_once_and_never_puts_data_in_headers(
    database_url: str,
) -> None:
    user_id = "u'; DROP TABLE deliveries; --<script>"
    variables = {"name": "${coupon}\r\nX-Injected: yes <b>bold</b> '; --"}
    async with (
        ProviderServer() as email,
        delivery_support.delivery(
            database_url, delivery_support.channels(email={"base_url": email.url})
        ) as stack,
    ):
        await stack.users(delivery_support.user(user_id, "email"))
        due = delivery_support.touch("t-hostile", user_id, "email", body=TEMPLATE)
        content = {"email": due.content["email"].model_copy(update={"subject": SUBJECT})}
        await stack.publish(due.model_copy(update={"variables": variables, "content": content}))
        (outcome,) = await stack.settled(1)
        assert type(outcome).__name__ == "DeliverySent", outcome

        (call,) = email.calls
        assert call.key == "t-hostile"
        assert "x-injected" not in call.headers and "bcc" not in call.headers
        body = call.json()
        assert body["user_id"] == user_id
        assert body["subject"] == SUBJECT
        listed = await stack.client.get("/v1/deliveries", params={"user_id": user_id})
        assert listed.status_code == 200, listed.text
        (row,) = listed.json()["deliveries"]
        coupon = row["coupon_code"]
        assert coupon
        expected = TEMPLATE.replace("${coupon}", coupon).replace("${name}", variables["name"])
        assert body["body"] == expected, "placeholders filled once, the value's own ${...} kept"
        assert "${coupon}\r\nX-Injected: yes <b>bold</b>" in body["body"]


async def test_a_touch_id_with_a_line_break_is_dead_lettered_and_the_next_is_sent_once(
    database_url: str,
) -> None:
    """The touch id travels as the Idempotency-Key header: a touch.due whose id would split
    that header never reaches a provider (nor holds back the touches after it)."""
    async with (
        ProviderServer() as email,
        delivery_support.delivery(
            database_url, delivery_support.channels(email={"base_url": email.url})
        ) as stack,
    ):
        await stack.users(delivery_support.user("u-1", "email"))
        topic = stack.settings.topic("touches")
        evil = encode(
            delivery_support.touch("t-evil", "u-1", "email"),
            source="test",
            time=delivery_support.START,
        ).replace(b'"t-evil"', b'"t-evil\\r\\nX-Injected: yes"')
        good = delivery_support.touch("t-good", "u-1", "email")
        await stack.bus.publish([OutMessage(topic, "u-1", evil)])
        await stack.publish(good)

        (outcome,) = await stack.settled(1)
        assert outcome.touch_id == "t-good"
        assert [c.key for c in email.calls] == ["t-good"], "called once, and never for t-evil"
        (dead,) = stack.bus.messages(f"{topic}.dlq")
        assert dead.header("dlq.reason") == b"invalid_data"
        assert b"touch_id" in (dead.header("dlq.detail") or b"")


async def test_a_nul_character_is_refused_naming_where_it_is(database_url: str) -> None:
    """PostgreSQL text cannot hold U+0000: it is a 422 naming the field, never a 500."""
    async with segmentation(database_url) as client:
        in_path = await client.put("/v1/users/u%00x", json={"timezone": "UTC"})
        in_query = await client.get("/v1/segments", params={"x": "a\x00b"})
        activity = {
            "id": "a-1",
            "user_id": "u-1",
            "kind": "visit",
            "occurred_at": "2026-03-01T10:00:00Z",
            "item_id": "sku\x00-1",
        }
        in_body = await client.post("/v1/activities", json={"activities": [activity]})
        for response, where in ((in_path, "path"), (in_query, "query"), (in_body, "body")):
            assert response.status_code == 422, (where, response.text)
            problem = response.json()
            assert problem["detail"].startswith(where), problem
            assert "NUL" in problem["detail"]
        assert in_body.json()["field"] == "activities[0].item_id"
        assert (await client.get("/v1/users/u-1")).status_code == 404, "nothing was stored"
