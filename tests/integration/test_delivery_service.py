"""The delivery service against real providers on loopback, on SQLite and PostgreSQL.

The service runs with its lifespan on the in-process bus; providers are
`tests.support.provider_server.ProviderServer` instances (real HTTP servers),
never a patched client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from services.delivery import handlers, store
from services.delivery.app import make_spec
from services.delivery.config import ChannelConfig, DeliveryConfig
from services.delivery.domain import sign
from shared.bus import OutMessage
from shared.bus.memory import InProcessBus
from shared.clock import ManualClock
from shared.events import (
    EventData,
    MessageContent,
    TouchDue,
    UserErased,
    UserUpdated,
    default_registry,
    encode,
)
from shared.service import ServiceContext
from shared.settings import Settings
from tests.support.provider_server import Answer, ProviderServer

TOKEN = "delivery-token"
SECRET = "receipt-secret"
START = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 2.0}
ADDRESSES = {
    "sms": "+8613800000000",
    "email": "a@example.com",
    "push": "device-token",
    "in_app": "u",
    "social": "open-id",
}


@dataclasses.dataclass
class Stack:
    ctx: ServiceContext
    client: httpx.AsyncClient
    bus: InProcessBus
    settings: Settings

    async def publish(self, *events: EventData) -> None:
        await self.bus.publish(
            [
                OutMessage(
                    self.settings.topic(e.topic),
                    e.partition_key(),
                    encode(e, source="test", time=START),
                )
                for e in events
            ]
        )

    def events(self, topic: str, kind: type[EventData] | None = None) -> list[Any]:
        registry = default_registry()
        found = [registry.decode(m.value).data for m in self.bus.messages(topic)]
        return [e for e in found if kind is None or isinstance(e, kind)]

    def outcomes(self) -> list[Any]:
        return self.events("deliveries")

    async def settled(self, count: int, timeout_s: float = 20.0) -> list[Any]:
        await eventually(lambda: _ready(len(self.outcomes()) >= count), timeout_s)
        return self.outcomes()

    async def contacts(self) -> dict[str, Any]:
        async with self.ctx.db.connect() as conn:
            rows = (await conn.execute(select(store.contacts))).all()
        return {r.user_id: r for r in rows}

    async def users(self, *updates: UserUpdated) -> None:
        await self.publish(*updates)
        wanted = {u.user_id for u in updates}

        async def stored() -> bool:
            return wanted <= set(await self.contacts())

        await eventually(stored)

    async def post_receipt(self, body: bytes, signature: str | None = None) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        headers["X-Afterglow-Signature"] = signature or sign(SECRET.encode(), body)
        return await self.client.post("/v1/receipts", content=body, headers=headers)


async def _ready(value: bool) -> bool:
    return value


async def eventually(probe: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def delivery(database_url: str, config: DeliveryConfig) -> AsyncIterator[Stack]:
    bus = InProcessBus(partitions=2)
    await bus.start()
    settings = Settings(
        database_url=database_url,
        api_tokens={TOKEN: frozenset({"*"})},
        outbox_poll_s=0.02,
        receipt_secret=SECRET,  # type: ignore[arg-type]
        log_level="WARNING",
    )
    app = make_spec(config).create_app(settings, bus=bus, clock=ManualClock(START))
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://delivery",
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as client,
        ):
            yield Stack(app.state.ctx, client, bus, settings)
    finally:
        await bus.stop()


def channels(consent_wait_s: float = 0.2, **per_channel: dict[str, Any]) -> DeliveryConfig:
    return DeliveryConfig(
        channels={
            name: ChannelConfig(**{**FAST, **values}) for name, values in per_channel.items()
        },
        consent_wait_s=consent_wait_s,
    )


def user(user_id: str, *consented: str) -> UserUpdated:
    return UserUpdated(
        user_id=user_id,
        addresses={c: ADDRESSES[c] for c in consented},  # type: ignore[misc]
        consent={c: True for c in consented},  # type: ignore[misc]
    )


def touch(
    touch_id: str,
    user_id: str,
    *chs: str,
    promotion: str = "p-1",
    body: str = "Hello ${name}, code ${coupon}",
    coupon: bool = True,
) -> TouchDue:
    return TouchDue(
        touch_id=touch_id,
        user_id=user_id,
        promotion_id=promotion,
        wave="day3",
        variant="A",
        due_at=START,
        channels=list(chs),  # type: ignore[arg-type]
        coupon=coupon,
        content={c: MessageContent(subject="Thanks", body=body) for c in chs},  # type: ignore[misc]
        variables={"name": "Ann"},
    )


async def test_each_touch_is_sent_once_with_its_key_and_the_contract_body(
    database_url: str,
) -> None:
    async with (
        ProviderServer() as sms,
        delivery(database_url, channels(sms={"base_url": sms.url})) as stack,
    ):
        await stack.users(*(user(f"u-{i}", "sms") for i in range(20)))
        dues = [touch(f"t-{i}", f"u-{i}", "sms") for i in range(20)]
        await stack.publish(*dues)
        sent = await stack.settled(20)
        assert sorted(e.touch_id for e in sent) == sorted(d.touch_id for d in dues)
        assert {type(e).__name__ for e in sent} == {"DeliverySent"}
        assert len(sms.calls) == 20 and sms.duplicates() == 0
        call = sms.calls_to("t-3")[0]
        body = call.json()
        assert body["id"] == "t-3" and body["to"] == ADDRESSES["sms"]
        assert set(body) == {
            "id",
            "channel",
            "to",
            "user_id",
            "promotion_id",
            "wave",
            "variant",
            "subject",
            "body",
        }
        assert body["body"].startswith("Hello Ann, code ") and "${" not in body["body"]

        # Redelivered touch.due events never call again.
        await stack.publish(*dues)
        await asyncio.sleep(0.5)
        assert len(sms.calls) == 20 and len(stack.outcomes()) == 20

        listed = (await stack.client.get("/v1/deliveries", params={"user_id": "u-3"})).json()
        (row,) = listed["deliveries"]
        assert row["status"] == "sent" and row["channel"] == "sms" and row["attempts"] == 1
        assert row["coupon_code"] and row["coupon_code"] in body["body"]
        codes = {(await _coupon(stack, f"u-{i}")) for i in range(20)}
        assert len(codes) == 20, "every touch has its own coupon code"

        report = (await stack.client.get("/v1/channels", params={"promotion_id": "p-1"})).json()
        sms_row = next(c for c in report["channels"] if c["channel"] == "sms")
        assert sms_row["sent"] == 20 and sms_row["success_rate"] == 1.0
        assert sms_row["spend"] == pytest.approx(20 * 0.05)
        assert sms_row["circuit"] == "closed"


async def _coupon(stack: Stack, user_id: str) -> str:
    listed = (await stack.client.get("/v1/deliveries", params={"user_id": user_id})).json()
    return str(listed["deliveries"][0]["coupon_code"])


async def test_429_with_retry_after_500_timeout_and_drop_are_retried_with_one_key(
    database_url: str,
) -> None:
    config = channels(sms={"timeout_s": 0.3, "max_attempts": 5})
    async with ProviderServer() as sms:
        config = channels(sms={"base_url": sms.url, "timeout_s": 0.3, "max_attempts": 5})
        async with delivery(database_url, config) as stack:
            await stack.users(user("u-1", "sms"))
            sms.script(
                Answer.throttle(retry_after=0.3), Answer.error(500), Answer.hang(2), Answer.drop()
            )
            await stack.publish(touch("t-1", "u-1", "sms"))
            (sent,) = await stack.settled(1)
            assert type(sent).__name__ == "DeliverySent" and sent.attempts == 5
            assert [c.answered for c in sms.calls] == ["429", "500", "hang", "drop", "200"]
            assert {c.key for c in sms.calls} == {"t-1"}
            assert sms.calls[1].at - sms.calls[0].at >= 0.29, "Retry-After was not honoured"
            assert sms.duplicates() == 0


async def test_fallback_follows_the_consented_channels_in_order(database_url: str) -> None:
    async with (
        ProviderServer() as sms,
        ProviderServer() as email,
        ProviderServer() as push,
        ProviderServer() as social,
    ):
        sms.default = Answer.error(503)
        email.default = Answer.status_code(400)
        config = channels(
            sms={"base_url": sms.url, "max_attempts": 3},
            email={"base_url": email.url},
            push={"base_url": push.url},
            social={"base_url": social.url},
        )
        async with delivery(database_url, config) as stack:
            # No consent for social: it is skipped without a call.
            await stack.users(user("u-1", "sms", "email", "push"))
            await stack.publish(touch("t-1", "u-1", "social", "sms", "email", "push"))
            (sent,) = await stack.settled(1)
            assert type(sent).__name__ == "DeliverySent" and sent.channel == "push"
            assert (len(social.calls), len(sms.calls), len(email.calls), len(push.calls)) == (
                0,
                3,
                1,
                1,
            )
            listed = (await stack.client.get("/v1/deliveries", params={"user_id": "u-1"})).json()
            assert listed["deliveries"][0]["tried"] == ["sms", "email"]

            # Nothing left: delivery.failed with provider_failed.
            await stack.users(user("u-2", "sms", "email"))
            await stack.publish(touch("t-2", "u-2", "sms", "email"))
            outcomes = await stack.settled(2)
            failed = next(e for e in outcomes if e.touch_id == "t-2")
            assert type(failed).__name__ == "DeliveryFailed"
            assert failed.reason == "provider_failed"


async def test_reasons_no_consent_erased_and_template(database_url: str) -> None:
    async with (
        ProviderServer() as sms,
        delivery(database_url, channels(sms={"base_url": sms.url})) as stack,
    ):
        await stack.users(user("u-1"), user("u-2", "sms"), user("u-3", "sms"))
        await stack.publish(UserErased(user_id="u-2", erased_at=START))
        await eventually(lambda: _erased(stack, "u-2"))
        await stack.publish(
            touch("t-1", "u-1", "sms"),
            touch("t-2", "u-2", "sms"),
            touch("t-3", "u-3", "sms", body="Hi ${missing}"),
            touch("t-4", "u-3", "sms", body="fine"),
            touch("t-5", "u-unknown", "sms"),
        )
        outcomes = {e.touch_id: e for e in await stack.settled(5)}
        assert outcomes["t-1"].reason == "no_consent"
        assert outcomes["t-2"].reason == "erased"
        assert outcomes["t-3"].reason == "template"
        assert type(outcomes["t-4"]).__name__ == "DeliverySent"
        assert outcomes["t-5"].reason == "no_consent"
        assert [c.key for c in sms.calls] == ["t-4"]
        listed = (await stack.client.get("/v1/deliveries", params={"user_id": "u-3"})).json()
        assert {d["touch_id"]: d["reason"] for d in listed["deliveries"]}["t-3"] == "template"


async def _erased(stack: Stack, user_id: str) -> bool:
    row = (await stack.contacts()).get(user_id)
    return bool(row is not None and row.erased)


async def test_erasure_removes_addresses_and_stops_pending_sends(database_url: str) -> None:
    async with ProviderServer() as sms:
        sms.default = Answer.error(500)
        config = channels(
            sms={
                "base_url": sms.url,
                "max_attempts": 20,
                "backoff_base_s": 0.2,
                "backoff_max_s": 0.2,
                "circuit_failures": 100,
            }
        )
        async with delivery(database_url, config) as stack:
            await stack.users(user("u-1", "sms"))
            await stack.publish(touch("t-1", "u-1", "sms"))
            await sms.wait_for_calls(2)
            await stack.publish(UserErased(user_id="u-1", erased_at=START))
            (failed,) = await stack.settled(1)
            assert failed.reason == "erased"
            calls = len(sms.calls)
            assert calls < 20
            contact = (await stack.contacts())["u-1"]
            assert contact.erased and contact.addresses == {} and contact.consent == {}
            # A late update does not bring the addresses back; later touches are not sent.
            await stack.publish(user("u-1", "sms"), touch("t-2", "u-1", "sms"))
            outcomes = await stack.settled(2)
            assert outcomes[1].reason == "erased"
            assert (await stack.contacts())["u-1"].addresses == {}
            await asyncio.sleep(0.3)
            assert len(sms.calls) == calls


async def test_circuit_opens_after_failures_and_closes_after_a_good_probe(
    database_url: str,
) -> None:
    async with ProviderServer() as sms, ProviderServer() as email:
        sms.default = Answer.error(500)
        config = channels(
            sms={
                "base_url": sms.url,
                "max_attempts": 1,
                "circuit_failures": 3,
                # Long enough that a loaded machine settles the six touches before it ends.
                "circuit_reset_s": 2.0,
            },
            email={"base_url": email.url},
        )
        async with delivery(database_url, config) as stack:
            await stack.users(*(user(f"u-{i}", "sms", "email") for i in range(8)))
            for i in range(6):
                await stack.publish(touch(f"t-{i}", f"u-{i}", "sms", "email"))
                await stack.settled(i + 1)
            assert len(sms.calls) == 3, "the open circuit let calls through"
            assert len(email.calls) == 6, "every touch fell back to email"
            report = (await stack.client.get("/v1/channels")).json()["channels"]
            assert next(c for c in report if c["channel"] == "sms")["circuit"] == "open"

            sms.default = Answer.ok()
            await asyncio.sleep(2.1)
            await stack.publish(touch("t-6", "u-6", "sms", "email"))
            outcomes = await stack.settled(7)
            assert outcomes[-1].channel == "sms"
            report = (await stack.client.get("/v1/channels")).json()["channels"]
            assert next(c for c in report if c["channel"] == "sms")["circuit"] == "closed"


async def test_rate_limit_is_held(database_url: str) -> None:
    async with ProviderServer() as push:
        config = channels(push={"base_url": push.url, "rate_per_s": 20, "burst": 1})
        async with delivery(database_url, config) as stack:
            await stack.users(*(user(f"u-{i}", "push") for i in range(12)))
            await stack.publish(*(touch(f"t-{i}", f"u-{i}", "push") for i in range(12)))
            await stack.settled(12)
            times = sorted(c.at for c in push.calls)
            for i in range(1, len(times)):
                assert times[i] - times[0] >= i / 20 - 0.02, f"call {i} came too early"


async def test_budget_is_held_with_its_reserve_and_cheaper_fallback(database_url: str) -> None:
    async with ProviderServer() as sms, ProviderServer() as email:
        config = channels(
            sms={
                "base_url": sms.url,
                "cost": 1.0,
                "budget_per_promotion": 10.0,
                "reserve_share": 0.2,
            },
            email={"base_url": email.url, "cost": 0.1},
        )
        async with delivery(database_url, config) as stack:
            await stack.users(*(user(f"u-{i}", "sms", "email") for i in range(24)))
            await stack.publish(*(touch(f"a-{i}", f"u-{i}", "sms", "email") for i in range(12)))
            outcomes = await stack.settled(12)
            by_channel = [e.channel for e in outcomes]
            assert by_channel.count("sms") == 8 and by_channel.count("email") == 4
            await stack.publish(
                *(touch(f"b-{i}", f"u-{12 + i}", "sms", promotion="p-2") for i in range(12))
            )
            outcomes = [e for e in await stack.settled(24) if e.promotion_id == "p-2"]
            assert sum(type(e).__name__ == "DeliverySent" for e in outcomes) == 8
            assert {e.reason for e in outcomes if type(e).__name__ == "DeliveryFailed"} == {
                "budget"
            }
            report = (
                await stack.client.get("/v1/channels", params={"promotion_id": "p-1"})
            ).json()["channels"]
            sms_row = next(c for c in report if c["channel"] == "sms")
            assert sms_row["spend"] == pytest.approx(8.0) and sms_row["remaining"] == 2.0


async def test_receipts_become_engagements_once(database_url: str) -> None:
    async with (
        ProviderServer() as email,
        delivery(database_url, channels(email={"base_url": email.url})) as stack,
    ):
        await stack.users(user("u-1", "email"))
        await stack.publish(touch("t-1", "u-1", "email"))
        await stack.settled(1)
        at = "2026-03-08T12:05:00+00:00"
        for event in ("delivered", "opened", "clicked", "bounced"):
            body = f'{{"id": "t-1", "event": "{event}", "at": "{at}"}}'.encode()
            response = await stack.post_receipt(body)
            assert response.status_code == 202, response.text
        again = await stack.post_receipt(
            b'{"id": "t-1", "event": "opened", "at": "' + at.encode() + b'"}'
        )
        assert again.status_code == 200 and again.json()["recorded"] is False

        async def engagements() -> bool:
            return len(stack.events("engagements")) == 4

        await eventually(engagements)
        kinds = [e.kind for e in stack.events("engagements")]
        assert kinds == ["delivered", "opened", "clicked", "bounced"]
        assert all(
            e.channel == "email" and e.touch_id == "t-1" for e in stack.events("engagements")
        )
        await eventually(lambda: _ready(len(stack.outcomes()) == 2))
        assert type(stack.outcomes()[1]).__name__ == "DeliveryBounced"

        # unsubscribed stops the channel at once
        body = f'{{"id": "t-1", "event": "unsubscribed", "at": "{at}"}}'.encode()
        assert (await stack.post_receipt(body)).status_code == 202
        await stack.publish(touch("t-2", "u-1", "email"))
        outcomes = await stack.settled(3)
        assert outcomes[-1].reason == "no_consent"

        good = b'{"id": "t-1", "event": "opened", "at": "2026-03-08T12:05:00+00:00"}'
        bad = await stack.post_receipt(good, signature="sha256=" + "0" * 64)
        assert bad.status_code == 401
        assert bad.headers["content-type"].startswith("application/problem+json")
        unknown = await stack.post_receipt(
            b'{"id": "nope", "event": "opened", "at": "2026-03-08T12:05:00+00:00"}'
        )
        assert unknown.status_code == 404
        malformed = await stack.post_receipt(b'{"id": "t-1", "event": "read", "at": "x"}')
        assert malformed.status_code == 422
        assert malformed.json()["field"] == "event"
        no_time = await stack.post_receipt(b'{"id": "t-1", "event": "opened"}')
        assert no_time.status_code == 422 and no_time.json()["field"] == "at"
        not_json = await stack.post_receipt(b"{nope")
        assert not_json.status_code == 422


class CrashingOutbox:
    """Fails the commit that would settle a sent touch: the crash after the provider call."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.crashed = 0

    async def add(self, conn: Any, events: Any, *, now: datetime) -> None:
        if any(type(e).__name__ == "DeliverySent" for e in events):
            self.crashed += 1
            # Not a database outage (whose answers `handlers._keep_answers` keeps and
            # writes later): the process dies here, as far as this batch is concerned.
            raise RuntimeError("simulated crash before the commit")
        await self.real.add(conn, events, now=now)

    def notify(self) -> None:
        self.real.notify()


async def test_a_crash_between_call_and_commit_repeats_the_same_key_once(
    database_url: str,
) -> None:
    async with (
        ProviderServer() as sms,
        delivery(database_url, channels(sms={"base_url": sms.url})) as stack,
    ):
        await stack.users(user("u-1", "sms"))
        due = touch("t-1", "u-1", "sms")
        crashing = dataclasses.replace(stack.ctx, outbox=CrashingOutbox(stack.ctx.outbox))
        rt = stack.ctx.extras["delivery"]
        event = default_registry().decode(encode(due, source="test", time=START))
        with pytest.raises(RuntimeError):
            await handlers.on_touches_due(crashing, rt, [event])
        assert len(sms.calls) == 1
        listed = (await stack.client.get("/v1/deliveries", params={"user_id": "u-1"})).json()
        assert listed["deliveries"][0]["status"] == "sending"

        # The message is delivered again (the consumer never committed it).
        await stack.publish(due, due)
        (sent,) = await stack.settled(1)
        assert type(sent).__name__ == "DeliverySent"
        assert [c.key for c in sms.calls] == ["t-1", "t-1"]
        await asyncio.sleep(0.3)
        assert len(stack.outcomes()) == 1 and len(sms.calls) == 2
        first, second = (c.json() for c in sms.calls)
        assert first == second, "the repeated call must carry the same message and coupon"


async def test_a_touch_that_arrives_before_the_consent_waits_for_it(database_url: str) -> None:
    async with (
        ProviderServer() as sms,
        delivery(database_url, channels(consent_wait_s=1.5, sms={"base_url": sms.url})) as stack,
    ):
        # touch.due (topic touches) overtakes the user.updated (topic users) it was planned on.
        await stack.publish(touch("t-1", "u-late", "sms"), touch("t-2", "u-never", "sms"))
        await asyncio.sleep(0.2)
        assert sms.calls == [] and stack.outcomes() == []
        await stack.users(user("u-late", "sms"))
        outcomes = {e.touch_id: e for e in await stack.settled(2)}
        assert type(outcomes["t-1"]).__name__ == "DeliverySent"
        assert [c.key for c in sms.calls] == ["t-1"]
        # Nobody gave consent within the wait: no_consent, nothing sent.
        assert type(outcomes["t-2"]).__name__ == "DeliveryFailed"
        assert outcomes["t-2"].reason == "no_consent"
