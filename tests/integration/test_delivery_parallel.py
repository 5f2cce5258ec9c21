"""Delivery honours `TouchDue.parallel`: the first n channels at once, the rest as fallback.

Real loopback providers (`ProviderServer`), the real service over the in-process bus,
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select, update

from services.delivery import store
from shared.events import DeliveryFailed, DeliverySent, TouchDue
from tests.integration.test_delivery_service import (
    Stack,
    channels,
    delivery,
    eventually,
    touch,
    user,
)
from tests.support.provider_server import Answer, ProviderServer


def parallel(touch_id: str, user_id: str, *chs: str, n: int = 2) -> TouchDue:
    return touch(touch_id, user_id, *chs).model_copy(update={"parallel": n})


def kinds(stack: Stack, touch_id: str) -> list[tuple[str, str | None]]:
    return sorted((type(e).__name__, e.channel) for e in stack.outcomes() if e.touch_id == touch_id)


async def lanes(stack: Stack, touch_id: str) -> dict[int, Any]:
    async with stack.ctx.db.connect() as conn:
        first = (
            await conn.execute(
                select(store.deliveries).where(store.deliveries.c.touch_id == touch_id)
            )
        ).one()
        rest = (
            await conn.execute(
                select(store.parallel_sends).where(store.parallel_sends.c.touch_id == touch_id)
            )
        ).all()
    return {0: first, **{r.lane: r for r in rest}}


async def test_the_first_two_channels_are_called_together_with_distinct_keys(
    database_url: str,
) -> None:
    async with (
        ProviderServer(latency_s=0.5) as sms,
        ProviderServer(latency_s=0.5) as push,
        ProviderServer() as email,
    ):
        config = channels(
            sms={"base_url": sms.url}, push={"base_url": push.url}, email={"base_url": email.url}
        )
        async with delivery(database_url, config) as stack:
            await stack.users(user("u-1", "sms", "push", "email"))
            await stack.publish(parallel("t-1", "u-1", "sms", "push", "email"))
            await stack.settled(2)
            assert kinds(stack, "t-1") == [("DeliverySent", "push"), ("DeliverySent", "sms")]
            assert [c.key for c in sms.calls] == ["t-1"]
            assert [c.key for c in push.calls] == ["t-1:push"]
            assert email.calls == [], "the rest of the list is only the fallback"
            # Together: each provider answers after 0.5 s; one after the other would be >= 0.5 s.
            assert abs(sms.calls[0].at - push.calls[0].at) < 0.3
            # One touch, one coupon, whichever channels carry it; the body's id is the touch.
            bodies = [sms.calls[0].json(), push.calls[0].json()]
            assert {b["id"] for b in bodies} == {"t-1"}
            assert bodies[0]["body"] == bodies[1]["body"]
            rows = await lanes(stack, "t-1")
            assert {(n, r.channel, r.status) for n, r in rows.items()} == {
                (0, "sms", "sent"),
                (1, "push", "sent"),
            }

            # parallel = 1 (the default) is unchanged: one channel, key = touch id.
            await stack.publish(touch("t-2", "u-1", "sms", "push"))
            await stack.settled(3)
            assert kinds(stack, "t-2") == [("DeliverySent", "sms")]
            assert sms.calls[-1].key == "t-2" and len(push.calls) == 1


async def test_a_failing_parallel_channel_falls_back_along_the_rest(database_url: str) -> None:
    async with (
        ProviderServer() as sms,
        ProviderServer() as push,
        ProviderServer() as email,
        ProviderServer() as social,
    ):
        sms.default = Answer.status_code(400)  # refused: no retry, fall back
        config = channels(
            sms={"base_url": sms.url},
            push={"base_url": push.url},
            email={"base_url": email.url},
            social={"base_url": social.url},
        )
        async with delivery(database_url, config) as stack:
            await stack.users(user("u-1", "sms", "push", "email", "social"))
            await stack.publish(parallel("t-1", "u-1", "sms", "push", "email", "social"))
            await stack.settled(2)
            # sms failed: its lane takes the next of the rest (email), push goes on its own.
            assert kinds(stack, "t-1") == [("DeliverySent", "email"), ("DeliverySent", "push")]
            assert [c.key for c in sms.calls] == ["t-1"]
            assert [c.key for c in push.calls] == ["t-1:push"]
            assert [c.key for c in email.calls] == ["t-1"]
            assert social.calls == []
            rows = await lanes(stack, "t-1")
            assert (rows[0].channel, rows[0].status, rows[0].tried) == ("email", "sent", ["sms"])
            assert (rows[1].channel, rows[1].status) == ("push", "sent")

            # One lane fails for good, the other is accepted: the touch is sent, no failure.
            push.default = Answer.status_code(400)
            await stack.users(user("u-2", "sms", "push", "email"))
            await stack.publish(parallel("t-2", "u-2", "sms", "push", "email"))
            await eventually(lambda: _has(stack, "t-2", "DeliverySent"))
            assert kinds(stack, "t-2") == [("DeliverySent", "email")]

            # Every lane fails: exactly one delivery.failed, by the last lane to end.
            email.default = Answer.status_code(400)
            await stack.users(user("u-3", "sms", "push", "email"))
            await stack.publish(parallel("t-3", "u-3", "sms", "push", "email"))
            await eventually(lambda: _has(stack, "t-3", "DeliveryFailed"))
            await stack.ctx.outbox.relay_once()
            assert kinds(stack, "t-3") == [("DeliveryFailed", "email")]
            (failed,) = [e for e in stack.outcomes() if e.touch_id == "t-3"]
            assert isinstance(failed, DeliveryFailed) and failed.reason == "provider_failed"
            for provider in (sms, push, email):
                assert provider.duplicates() == 0


async def _has(stack: Stack, touch_id: str, kind: str) -> bool:
    return any(type(e).__name__ == kind and e.touch_id == touch_id for e in stack.outcomes())


async def test_a_redelivered_parallel_touch_never_calls_an_accepted_channel_again(
    database_url: str,
) -> None:
    async with ProviderServer() as sms, ProviderServer() as push:
        config = channels(sms={"base_url": sms.url}, push={"base_url": push.url})
        async with delivery(database_url, config) as stack:
            await stack.users(user("u-1", "sms", "push"))
            due = parallel("t-1", "u-1", "sms", "push")
            await stack.publish(due)
            await stack.settled(2)
            # Settled: the same event again makes no call at all.
            await stack.publish(due, due)
            await stack.publish(due)
            await _quiet(stack)
            assert (len(sms.calls), len(push.calls)) == (1, 1)
            assert len(stack.outcomes()) == 2

            # A crash after push's call and before its settlement: push is still `sending`.
            # The redelivery repeats that very call (same key) and only it; sms was accepted.
            async with stack.ctx.db.begin() as conn:
                await conn.execute(
                    update(store.parallel_sends)
                    .where(store.parallel_sends.c.touch_id == "t-1")
                    .values(status="sending", provider_message_id=None)
                )
            await stack.publish(due)
            await push.wait_for_calls(2)
            await eventually(lambda: _count(stack, "t-1", 3))
            await _quiet(stack)
            assert [c.key for c in sms.calls] == ["t-1"]
            assert [c.key for c in push.calls] == ["t-1:push", "t-1:push"]
            sent = [e for e in stack.outcomes() if isinstance(e, DeliverySent)]
            assert sorted(e.channel for e in sent) == ["push", "push", "sms"]
            rows = await lanes(stack, "t-1")
            assert {(n, r.status) for n, r in rows.items()} == {(0, "sent"), (1, "sent")}


async def _count(stack: Stack, touch_id: str, n: int) -> bool:
    return len([e for e in stack.outcomes() if e.touch_id == touch_id]) >= n


async def _quiet(stack: Stack) -> None:
    """Let the consumer take what was published and the outbox relay what it wrote."""
    await asyncio.sleep(0.5)
    await stack.ctx.outbox.relay_once()


async def test_every_lane_is_listed_and_gets_its_own_receipts(database_url: str) -> None:
    async with ProviderServer() as sms, ProviderServer() as push:
        config = channels(sms={"base_url": sms.url}, push={"base_url": push.url})
        async with delivery(database_url, config) as stack:
            await stack.users(user("u-1", "sms", "push"))
            await stack.publish(parallel("t-1", "u-1", "sms", "push"))
            await stack.settled(2)
            listed = (await stack.client.get("/v1/deliveries", params={"user_id": "u-1"})).json()
            assert [
                (d["touch_id"], d["lane"], d["channel"], d["status"]) for d in listed["deliveries"]
            ] == [
                ("t-1", 0, "sms", "sent"),
                ("t-1", 1, "push", "sent"),
            ]
            assert len({d["coupon_code"] for d in listed["deliveries"]}) == 1

            at = '"at": "2026-03-08T12:05:00+00:00"'
            answers = [
                await stack.post_receipt(body.encode())
                for body in (
                    f'{{"id": "t-1", "event": "opened", {at}}}',  # the touch: lane 0 (sms)
                    f'{{"id": "t-1:push", "event": "opened", {at}}}',  # push's key
                    f'{{"id": "t-1", "channel": "push", "event": "opened", {at}}}',  # again
                    f'{{"id": "t-1:email", "event": "opened", {at}}}',  # no such lane
                )
            ]
            assert [a.status_code for a in answers] == [202, 202, 200, 404]

            async def engagements() -> bool:
                return len(stack.events("engagements")) == 2

            await eventually(engagements)
            assert sorted((e.touch_id, e.channel, e.kind) for e in stack.events("engagements")) == [
                ("t-1", "push", "opened"),
                ("t-1", "sms", "opened"),
            ]
