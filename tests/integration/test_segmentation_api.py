"""Segmentation's REST contract, through the ASGI app, on SQLite and on PostgreSQL.

The bus is the in-process transport: tests read what the service published
from its topics. The database is never faked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from services.segmentation import handlers, store
from services.segmentation.app import SPEC
from shared.bus.base import Message, OutMessage
from shared.bus.memory import InProcessBus
from shared.clock import ManualClock
from shared.consumer import EventConsumer
from shared.events import (
    ActivityRecorded,
    AudienceMemberResolved,
    EngagementRecorded,
    PromotionEnded,
    UserErased,
    UserUpdated,
    default_registry,
    encode,
)
from shared.service import ServiceContext
from shared.settings import ClockKind, Settings
from tests.conftest import fresh_database

TOKEN = "seg-token"
READER = "seg-reader"
NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
REGISTRY = default_registry()


@dataclass
class Service:
    client: httpx.AsyncClient
    app: FastAPI
    bus: InProcessBus
    clock: ManualClock

    @property
    def ctx(self) -> ServiceContext:
        ctx: ServiceContext = self.app.state.ctx
        return ctx

    def published(self, topic: str) -> list[Any]:
        return [REGISTRY.decode(m.value).data for m in self.bus.messages(topic)]

    async def drained(self) -> None:
        """Until the outbox is empty (the background relay may hold a lane meanwhile)."""

        async def empty() -> bool:
            await self.ctx.outbox.relay_once()
            return await self.ctx.outbox.pending() == 0

        assert await eventually(empty), "the outbox never drained"


@pytest.fixture(params=["sqlite", "postgres"])
async def service(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Service]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'seg.db'}"
        else:
            postgres = request.getfixturevalue("postgres_url")
            url = await stack.enter_async_context(fresh_database(postgres, f"t_{unique}"))
        settings = Settings(
            database_url=url,
            clock=ClockKind.MANUAL,
            api_tokens={TOKEN: frozenset({"*"}), READER: frozenset({"segmentation:read"})},
            outbox_poll_s=0.05,
            log_level="WARNING",
        )
        bus = InProcessBus()
        await bus.start()
        stack.push_async_callback(bus.stop)
        clock = ManualClock(NOW)
        app = SPEC.create_app(settings, bus=bus, clock=clock)
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://segmentation",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        )
        yield Service(client, app, bus, clock)


async def eventually(probe: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def purchase(i: int, user: str, amount: float, at: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"a-{i}",
        "user_id": user,
        "kind": "purchase",
        "occurred_at": at.isoformat(),
        "amount": amount,
        "currency": "CNY",
        **extra,
    }


PROFILE = {
    "birth_year": 2004,
    "timezone": "Asia/Shanghai",
    "locale": "zh-CN",
    "addresses": {"sms": "+8613800000000", "email": "a@b.cn", "social": "open-id"},
    "consent": {"sms": True, "email": False, "push": False, "in_app": True, "social": True},
}


# -- users -----------------------------------------------------------------------------------


async def test_put_user_creates_updates_and_announces_contact_changes(service: Service) -> None:
    created = await service.client.put("/v1/users/u-1", json=PROFILE)
    assert created.status_code == 201, created.text
    assert created.json()["consent"]["sms"] is True
    same = await service.client.put("/v1/users/u-1", json=PROFILE)
    assert same.status_code == 200
    changed = await service.client.put("/v1/users/u-1", json={"consent": {"sms": False}})
    assert changed.status_code == 200
    body = changed.json()
    assert body["consent"] == {"sms": False}
    assert body["addresses"] == PROFILE["addresses"], "fields left out keep their value"
    assert body["timezone"] == "Asia/Shanghai"
    await service.drained()
    updates = service.published("users")
    assert [type(e) for e in updates] == [UserUpdated, UserUpdated], "unchanged PUT is silent"
    assert updates[-1].consent == {"sms": False}
    assert updates[0].addresses["sms"] == "+8613800000000"
    got = await service.client.get("/v1/users/u-1")
    assert got.json()["locale"] == "zh-CN"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"birth_year": 1800}, "birth_year"),
        ({"addresses": {"fax": "123"}}, "addresses.fax.[key]"),
        ({"consent": {"sms": "perhaps"}}, "consent.sms"),
        ({"nickname": "x"}, "nickname"),
    ],
)
async def test_bad_profiles_are_refused_naming_the_field(
    service: Service, body: dict[str, Any], field: str
) -> None:
    response = await service.client.put("/v1/users/u-1", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["field"] == field


async def test_delete_erases_personal_data_and_announces_it(service: Service) -> None:
    await service.client.put("/v1/users/u-9", json=PROFILE)
    await service.client.post(
        "/v1/activities", json={"activities": [purchase(1, "u-9", 50, NOW - timedelta(days=1))]}
    )
    await service.client.post("/v1/promotions/p-1/participants", json={"user_ids": ["u-9", "u-8"]})
    erased = await service.client.delete("/v1/users/u-9")
    assert erased.status_code == 204
    assert (await service.client.get("/v1/users/u-9")).status_code == 404
    assert (await service.client.get("/v1/users/u-9/segment")).status_code == 404
    async with service.ctx.db.connect() as conn:
        for table in (store.users, store.activities, store.aggregates, store.participants):
            rows = await conn.execute(select(table).where(table.c.user_id == "u-9"))
            assert rows.all() == [], table.name
    await service.drained()
    assert [e.user_id for e in service.published("users") if isinstance(e, UserErased)] == ["u-9"]
    # A late copy of an activity from before the erasure does not bring the user back.
    late = await service.client.post(
        "/v1/activities", json={"activities": [purchase(2, "u-9", 50, NOW - timedelta(days=1))]}
    )
    assert late.json()["recorded"] == 0
    assert (await service.client.get("/v1/users/u-9/segment")).status_code == 404


async def test_auth_is_required_with_the_right_scope(service: Service) -> None:
    anonymous = await service.client.get("/v1/segments", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    reader = {"Authorization": f"Bearer {READER}"}
    assert (await service.client.get("/v1/segments", headers=reader)).status_code == 200
    refused = await service.client.put("/v1/users/u-1", json=PROFILE, headers=reader)
    assert refused.status_code == 403


# -- activities --------------------------------------------------------------------------------


async def test_activities_are_idempotent_by_id(service: Service) -> None:
    batch = [purchase(i, f"u-{i % 3}", 10.0 * i, NOW - timedelta(hours=i)) for i in range(1, 10)]
    first = await service.client.post("/v1/activities", json={"activities": batch})
    assert first.status_code == 202, first.text
    assert first.json() == {"received": 9, "recorded": 9, "duplicates": 0}
    again = await service.client.post("/v1/activities", json={"activities": batch + batch[:1]})
    assert again.json() == {"received": 10, "recorded": 0, "duplicates": 10}
    async with service.ctx.db.connect() as conn:
        agg = (
            await conn.execute(select(store.aggregates).where(store.aggregates.c.user_id == "u-1"))
        ).one()
    assert agg.purchases == 3
    assert agg.monetary == pytest.approx(10 + 40 + 70)


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"amount": -1}, "activities[3].amount"),
        ({"amount": None}, "activities[3].amount"),
        ({"kind": "teleport"}, "activities[3].kind"),
        ({"occurred_at": "2026-03-08T12:00:00"}, "activities[3].occurred_at"),
        ({"occurred_at": "yesterday"}, "activities[3].occurred_at"),
        ({"currency": "yuan"}, "activities[3].currency"),
        ({"user_id": ""}, "activities[3].user_id"),
    ],
)
async def test_a_bad_activity_is_named_by_index_and_field(
    service: Service, item: dict[str, Any], field: str
) -> None:
    batch = [purchase(i, "u-1", 5, NOW) for i in range(5)]
    batch[3] = {**batch[3], **item}
    response = await service.client.post("/v1/activities", json={"activities": batch})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["field"] == field
    assert field in problem["detail"]
    async with service.ctx.db.connect() as conn:
        assert (await conn.execute(select(store.activities))).all() == [], "nothing was stored"


async def test_batches_are_bounded(service: Service) -> None:
    too_many = [purchase(i, "u-1", 1, NOW) for i in range(1001)]
    response = await service.client.post("/v1/activities", json={"activities": too_many})
    assert response.status_code == 422
    assert response.json()["field"] == "activities"
    empty = await service.client.post("/v1/activities", json={"activities": []})
    assert empty.status_code == 422


async def test_activities_from_the_topic_take_the_same_path(service: Service) -> None:
    events = [
        ActivityRecorded(id=f"t-{i}", user_id="u-t", kind="purchase", occurred_at=NOW, amount=100.0)
        for i in range(3)
    ]
    messages = [
        OutMessage("activities", e.user_id, encode(e, source="test", time=NOW)) for e in events
    ]
    await service.bus.publish(messages + messages[:1])

    async def folded() -> bool:
        async with service.ctx.db.connect() as conn:
            row = (
                await conn.execute(
                    select(store.aggregates).where(store.aggregates.c.user_id == "u-t")
                )
            ).one_or_none()
        return row is not None and row.purchases == 3

    assert await eventually(folded)
    await asyncio.sleep(0.2)
    async with service.ctx.db.connect() as conn:
        row = (
            await conn.execute(select(store.aggregates).where(store.aggregates.c.user_id == "u-t"))
        ).one()
    assert row.purchases == 3 and row.monetary == pytest.approx(300.0)


async def test_rest_activities_are_published_once_and_not_folded_again(service: Service) -> None:
    """REST-ingested activities reach the `activities` topic (metrics attribution reads it):
    each new one once, duplicates never; segmentation's own consumer skips them."""
    batch = [purchase(i, "u-r", 25.0, NOW - timedelta(hours=i)) for i in range(1, 4)]
    first = await service.client.post("/v1/activities", json={"activities": batch})
    assert first.json()["recorded"] == 3
    again = await service.client.post(
        "/v1/activities",
        json={"activities": [*batch[:2], purchase(9, "u-r", 5.0, NOW)]},
    )
    assert again.json() == {"received": 3, "recorded": 1, "duplicates": 2}
    await service.drained()
    messages = service.bus.messages("activities")
    events = [REGISTRY.decode(m.value) for m in messages]
    assert sorted(e.data.id for e in events) == ["a-1", "a-2", "a-3", "a-9"]
    # Told apart as this service's own: segmentation's consumer passes them by undecoded.
    own_message = handlers.own_activities(service.ctx)
    assert all(own_message(m) for m in messages)
    elsewhere = encode(events[0].data, source="afterglow/metrics", time=NOW)
    assert not own_message(dataclasses.replace(messages[0], value=elsewhere))
    assert {e.source for e in events} == {service.ctx.outbox.source}
    assert {e.type for e in events} == {ActivityRecorded.event_type()}
    by_id = {e.data.id: e.data for e in events}
    assert by_id["a-1"].user_id == "u-r"
    assert by_id["a-1"].amount == pytest.approx(25.0)
    assert by_id["a-1"].currency == "CNY"
    assert by_id["a-1"].occurred_at == NOW - timedelta(hours=1)

    async def aggregate() -> Any:
        async with service.ctx.db.connect() as conn:
            return (
                await conn.execute(
                    select(store.aggregates).where(store.aggregates.c.user_id == "u-r")
                )
            ).one()

    # The events came back to segmentation's own consumer: nothing is folded twice.
    await asyncio.sleep(0.3)
    row = await aggregate()
    assert row.purchases == 4 and row.monetary == pytest.approx(80.0)
    # Even an own event whose activity is unknown here (erased since, say) is not applied:
    # it was applied when it was accepted.
    own = ActivityRecorded(id="own-1", user_id="u-r", kind="purchase", occurred_at=NOW, amount=1.0)
    await handlers.on_activities(
        service.ctx,
        [REGISTRY.decode(encode(own, source=service.ctx.outbox.source, time=NOW))],
    )
    row = await aggregate()
    assert row.purchases == 4 and row.monetary == pytest.approx(80.0)
    # Activities from the topic are not republished (they are on the topic already).
    foreign = ActivityRecorded(
        id="f-1", user_id="u-r", kind="purchase", occurred_at=NOW, amount=2.0
    )
    await handlers.on_activities(service.ctx, [_event(foreign)])
    await service.drained()
    assert (await aggregate()).purchases == 5
    assert len(service.bus.messages("activities")) == 4


async def test_the_consumer_passes_marked_messages_by_undecoded(service: Service) -> None:
    """An activity this service published never reaches a handler; the others do."""
    seen: list[str] = []

    async def record(events: list[Any]) -> None:
        seen.extend(e.data.id for e in events)

    consumer = EventConsumer(
        service="segmentation",
        group="g",
        bus=service.bus,
        registry=REGISTRY,
        batch_handlers={ActivityRecorded: record},
        skip=handlers.own_activities(service.ctx),
    )
    own = ActivityRecorded(id="m-1", user_id="u", kind="visit", occurred_at=NOW)
    foreign = ActivityRecorded(id="f-1", user_id="u", kind="visit", occurred_at=NOW)
    batch = [
        Message("activities", 0, 0, "u", encode(own, source=service.ctx.outbox.source, time=NOW)),
        Message("activities", 0, 1, "u", _event_bytes(foreign)),
    ]
    await consumer(batch)
    assert seen == ["f-1"]


def _event_bytes(data: ActivityRecorded) -> bytes:
    return encode(data, source="afterglow/elsewhere", time=NOW)


async def test_a_rebuild_recounts_what_the_batches_folded(service: Service) -> None:
    """After a restore the aggregates and monthly buckets are rebuilt from the activities:
    the same figures as the batches kept (on PostgreSQL both passes run concurrently)."""
    batch = [
        purchase(i, f"u-{i % 7}", 10.0 + i, NOW - timedelta(days=3 * i), item_id=f"sku-{i}")
        for i in range(150)
    ]
    batch += [
        {"id": f"v-{i}", "user_id": f"u-{i % 9}", "kind": "visit", "occurred_at": NOW.isoformat()}
        for i in range(30)
    ]
    response = await service.client.post("/v1/activities", json={"activities": batch})
    assert response.json()["recorded"] == 180

    async def tables() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        async with service.ctx.db.connect() as conn:
            a = store.aggregates.c
            aggregates = await conn.execute(
                select(
                    a.user_id,
                    a.purchases,
                    a.visits,
                    a.monetary,
                    a.ltv,
                    a.last_purchase_at,
                    a.last_interaction_at,
                ).order_by(a.user_id)
            )
            months = await conn.execute(
                select(store.user_months).order_by(
                    store.user_months.c.user_id, store.user_months.c.month
                )
            )
            return [tuple(r) for r in aggregates], [tuple(r) for r in months]

    kept = await tables()
    async with service.ctx.db.begin() as conn:
        await conn.execute(store.aggregates.delete())
        await conn.execute(store.user_months.delete())
    assert await handlers.rebuild(service.ctx) == 9
    rebuilt = await tables()
    for before, after in zip(kept, rebuilt, strict=True):
        assert len(before) == len(after)
        for x, y in zip(before, after, strict=True):
            assert [pytest.approx(v) if isinstance(v, float) else v for v in x] == list(y)
    # The buckets' key is whole again (PostgreSQL rebuilds it): batches still fold into them.
    more = await service.client.post(
        "/v1/activities", json={"activities": [purchase(999, "u-1", 5.0, NOW)]}
    )
    assert more.json()["recorded"] == 1


# -- segments ------------------------------------------------------------------------------------


async def test_segment_has_the_product_shape(service: Service) -> None:
    await service.client.put("/v1/users/u-1", json=PROFILE)
    activities = [
        purchase(i, f"u-{i % 20}", 30.0 * (i % 20), NOW - timedelta(days=i % 40))
        for i in range(200)
    ]
    response = await service.client.post("/v1/activities", json={"activities": activities})
    assert response.json()["recorded"] == 200
    await handlers.rescore(service.ctx)
    body = (await service.client.get("/v1/users/u-1/segment")).json()
    assert set(body) == {
        "user_id",
        "rfm",
        "ltv",
        "ltv_tier",
        "age_band",
        "value_layer",
        "silent",
        "tags",
        "channel_order",
        "abuse_review",
        "scored_at",
    }
    assert set(body["rfm"]) == {"r", "f", "m", "tier"}
    assert all(1 <= body["rfm"][k] <= 5 for k in "rfm")
    assert body["ltv_tier"] in {"high_potential", "potential_churn", "silent"}
    assert body["age_band"] == "18-24"
    assert body["channel_order"][0] == "social"
    assert body["value_layer"] in {"base", "core", "head"}
    assert body["silent"] is False
    assert body["tags"] == ["social_layer"], "10 purchases in 30 days"
    assert body["ltv"] == pytest.approx(300.0)
    assert body["ltv_tier"] == "potential_churn"
    assert datetime.fromisoformat(body["scored_at"]) == NOW
    # The top spender is in the head layer, the lowest in the base layer.
    assert (await service.client.get("/v1/users/u-19/segment")).json()["value_layer"] == "head"
    assert (await service.client.get("/v1/users/u-0/segment")).json()["value_layer"] == "base"
    assert (await service.client.get("/v1/users/nobody/segment")).status_code == 404

    counts = (await service.client.get("/v1/segments")).json()
    assert counts["users"] == 20
    assert sum(counts["rfm"].values()) == 20
    assert sum(counts["value_layer"].values()) == 20
    assert counts["value_layer"] == {"base": 12, "core": 5, "head": 3}
    assert sum(counts["ltv_tier"].values()) == 20
    assert counts["age_band"]["18-24"] == 1


async def test_silence_ends_with_an_open_that_also_teaches_channel_order(
    service: Service,
) -> None:
    await service.client.put("/v1/users/u-1", json={**PROFILE, "birth_year": 1980})
    await service.client.post(
        "/v1/activities", json={"activities": [purchase(1, "u-1", 10, NOW - timedelta(days=1))]}
    )
    seg = (await service.client.get("/v1/users/u-1/segment")).json()
    assert seg["silent"] is False
    assert seg["age_band"] == "35+"
    assert seg["channel_order"][0] == "sms"
    service.clock.advance(timedelta(days=31))
    assert (await service.client.get("/v1/users/u-1/segment")).json()["silent"] is True

    opened = EngagementRecorded(
        user_id="u-1",
        touch_id="t-1",
        promotion_id="p-1",
        wave="day3",
        channel="push",
        kind="clicked",
        at=service.clock.now(),
    )
    message = OutMessage("engagements", "u-1", encode(opened, source="test", time=NOW))
    await service.bus.publish([message, message])

    async def woke() -> Any:
        seg = (await service.client.get("/v1/users/u-1/segment")).json()
        return seg if not seg["silent"] else None

    seg = await eventually(woke)
    assert seg is not None, "the click never ended the silence"
    assert seg["channel_order"][:2] == ["push", "sms"]
    async with service.ctx.db.connect() as conn:
        row = (await conn.execute(select(store.channel_engagement))).one()
    assert row.clicks == 1, "a redelivered engagement counts once"


async def test_the_same_item_ten_times_in_three_hours_flags_abuse(service: Service) -> None:
    batch = [
        purchase(i, "u-x", 5, NOW - timedelta(minutes=15 * i), item_id="sku-1") for i in range(9)
    ]
    await service.client.post("/v1/activities", json={"activities": batch})
    seg = (await service.client.get("/v1/users/u-x/segment")).json()
    assert seg["abuse_review"] is False
    tenth = purchase(99, "u-x", 5, NOW + timedelta(minutes=10), item_id="sku-1")
    await service.client.post("/v1/activities", json={"activities": [tenth]})
    assert (await service.client.get("/v1/users/u-x/segment")).json()["abuse_review"] is True


async def test_ten_purchases_of_one_item_across_a_month_boundary_flag_abuse(
    service: Service,
) -> None:
    month_start = NOW.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    times = [month_start + timedelta(minutes=10 * i) for i in range(-5, 5)]
    batch = [purchase(i, "u-y", 5, at, item_id="sku-1") for i, at in enumerate(times[:9])]
    await service.client.post("/v1/activities", json={"activities": batch})
    assert (await service.client.get("/v1/users/u-y/segment")).json()["abuse_review"] is False
    tenth = purchase(99, "u-y", 5, times[9], item_id="sku-1")
    await service.client.post("/v1/activities", json={"activities": [tenth]})
    assert (await service.client.get("/v1/users/u-y/segment")).json()["abuse_review"] is True


# -- audiences -----------------------------------------------------------------------------------


async def test_an_ended_promotion_emits_one_snapshot_per_participant(service: Service) -> None:
    await service.client.put("/v1/users/u-0001", json=PROFILE)
    await service.client.post(
        "/v1/activities",
        json={"activities": [purchase(i, f"u-{i:04d}", 100 + i, NOW) for i in range(50)]},
    )
    # Six purchases within 30 days (the default tag `social_layer`), a seventh long before.
    days = [1, 3, 5, 8, 13, 21, 200]
    await service.client.post(
        "/v1/activities",
        json={
            "activities": [
                purchase(100 + i, "u-0002", 20, NOW - timedelta(days=d)) for i, d in enumerate(days)
            ]
        },
    )
    await handlers.rescore(service.ctx)
    users = [f"u-{i:04d}" for i in range(2500)]
    for start in range(0, len(users), 1000):
        added = await service.client.post(
            "/v1/promotions/p-1/participants", json={"user_ids": users[start : start + 1000]}
        )
        assert added.status_code == 202
    again = await service.client.post("/v1/promotions/p-1/participants", json={"user_ids": users})
    assert again.json()["added"] == 0

    ended = PromotionEnded(promotion_id="p-1", ended_at=NOW, name="Spring sale")
    await service.bus.publish(
        [OutMessage("promotions", "p-1", encode(ended, source="test", time=NOW))]
    )

    async def all_out() -> bool:
        return len(service.bus.messages("audience")) >= len(users)

    assert await eventually(all_out, timeout_s=60)
    await asyncio.sleep(0.3)
    audience = [e for e in service.published("audience") if isinstance(e, AudienceMemberResolved)]
    assert sorted(e.user_id for e in audience) == users
    member = next(e for e in audience if e.user_id == "u-0001")
    assert member.timezone == "Asia/Shanghai"
    assert member.locale == "zh-CN"
    assert member.addresses == {"sms": "+8613800000000", "social": "open-id"}, "consented only"
    assert member.consent["email"] is False
    assert member.segment.age_band == "18-24"
    assert member.segment.channel_order[0] == "social"
    assert member.segment.rfm_tier is not None and member.segment.r is not None
    stranger = next(e for e in audience if e.user_id == "u-2000")
    assert stranger.consent == {} and stranger.segment.silent is True
    tagged = {e.user_id for e in audience if "social_layer" in e.segment.tags}
    assert tagged == {"u-0002"}, "the tag counts purchases within its window only"
    for user_id in ("u-0001", "u-0002", "u-0003"):
        snapshot = next(e for e in audience if e.user_id == user_id).segment
        shown = (await service.client.get(f"/v1/users/{user_id}/segment")).json()
        assert (snapshot.tags, snapshot.value_layer, snapshot.rfm_tier, snapshot.ltv) == (
            shown["tags"],
            shown["value_layer"],
            shown["rfm"]["tier"],
            shown["ltv"],
        ), "the audience snapshot is the segment the API shows"


async def test_audience_emission_resumes_from_its_cursor(service: Service) -> None:
    ctx = service.ctx
    # Chunks of 1,000 (the default is 10,000) keep the audience small enough for SQLite.
    ctx.extras[handlers.CONFIG_KEY] = handlers.config_of(ctx).model_copy(
        update={"audience_chunk": 1000}
    )
    users = [f"u-{i:04d}" for i in range(2300)]
    await handlers.add_participants(ctx, "p-2", users)
    ended = PromotionEnded(promotion_id="p-2", ended_at=NOW)
    # A process that committed one chunk and died: the next delivery resumes after it.
    await handlers.start_audience(ctx, ended)
    assert await handlers.emit_audience_chunk(ctx, ended)
    async with ctx.db.connect() as conn:
        cursor = await conn.scalar(
            select(store.audiences.c.cursor).where(store.audiences.c.promotion_id == "p-2")
        )
    assert cursor == users[999]
    await handlers.on_promotion_ended(ctx, _event(ended))
    await handlers.on_promotion_ended(ctx, _event(ended))  # redelivered after completion
    await service.drained()
    audience = [e.user_id for e in service.published("audience") if e.promotion_id == "p-2"]
    assert sorted(audience) == users, "each participant once: nothing skipped, nothing twice"


def _event(data: Any) -> Any:
    return REGISTRY.decode(encode(data, source="test", time=NOW))
