"""Exactness: a known event stream, with duplicates and out-of-order events, against
hand-computed funnel figures, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from services.metrics import handlers, queries, store
from shared.db import Database
from shared.events import (
    ActivityRecorded,
    AudienceMemberResolved,
    DeliveryFailed,
    DeliverySent,
    EngagementRecorded,
    Event,
    EventData,
    SegmentSnapshot,
    TouchPlanned,
    TouchSuppressed,
)
from tests.conftest import fresh_database

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
WINDOW = timedelta(days=7)
P = "p-x"


def ev(event_id: str, data: EventData, at: datetime = T0) -> Event[Any]:
    return Event[Any](id=event_id, source="test", type=data.event_type(), time=at, data=data)


def touch(tid: str, user: str, wave: str = "launch", **kw: Any) -> dict[str, Any]:
    return {"touch_id": tid, "user_id": user, "promotion_id": P, "wave": wave, **kw}


def planned(
    tid: str, user: str, segment: str, variant: str, wave: str = "launch", at: datetime = T0
) -> Event[Any]:
    data = TouchPlanned(**touch(tid, user, wave, variant=variant), due_at=at, segment=segment)
    return ev(f"{tid}.planned", data, at)


def purchase(aid: str, user: str, at: datetime, amount: float) -> Event[Any]:
    data = ActivityRecorded(user_id=user, id=aid, kind="purchase", occurred_at=at, amount=amount)
    return ev(f"act-{aid}", data, at)


def stream() -> list[Event[Any]]:
    m = timedelta(minutes=1)
    sent_t1 = ev(
        "t1.sent",
        DeliverySent(**touch("t1", "u1", variant="A"), channel="email", at=T0 + m, cost=0.01),
        T0 + m,
    )
    buy_u1 = purchase("a1", "u1", T0 + timedelta(hours=1), 100.0)
    return [
        planned("t1", "u1", "high", "A"),
        sent_t1,
        ev(
            "t1.delivered",
            EngagementRecorded(
                **touch("t1", "u1", variant="A"), channel="email", kind="delivered", at=T0 + 2 * m
            ),
        ),
        ev(
            "t1.opened",
            EngagementRecorded(
                **touch("t1", "u1", variant="A"), channel="email", kind="opened", at=T0 + 3 * m
            ),
        ),
        ev(
            "t1.clicked",
            EngagementRecorded(
                **touch("t1", "u1", variant="A"), channel="email", kind="clicked", at=T0 + 4 * m
            ),
        ),
        buy_u1,
        sent_t1,  # duplicate
        buy_u1,  # duplicate
        # u2: the purchase, then the send, then the plan (all out of order)
        purchase("a2", "u2", T0 + timedelta(hours=2), 50.0),
        ev(
            "t2.sent",
            DeliverySent(**touch("t2", "u2", variant="B"), channel="sms", at=T0 + m, cost=0.05),
            T0 + m,
        ),
        planned("t2", "u2", "core", "B"),
        # u7: a parallel touch (email and sms, same touch_id): the sms send is recorded
        # first, before the plan; the purchase comes before the email send; the sms is redelivered.
        ev(
            "t7.sent.sms",
            DeliverySent(**touch("t7", "u7", variant="A"), channel="sms", at=T0 + m, cost=0.05),
            T0 + m,
        ),
        purchase("a7", "u7", T0 + timedelta(hours=3), 40.0),
        planned("t7", "u7", "high", "A"),
        ev(
            "t7.sent.email",
            DeliverySent(**touch("t7", "u7", variant="A"), channel="email", at=T0 + m, cost=0.01),
            T0 + m,
        ),
        ev(
            "t7.sent.sms",
            DeliverySent(**touch("t7", "u7", variant="A"), channel="sms", at=T0 + m, cost=0.05),
            T0 + m,
        ),  # duplicate
        # u3: holdout, buys the next day
        planned("t3", "u3", "high", "A"),
        ev("t3.held", TouchSuppressed(**touch("t3", "u3", variant="A"), reason="holdout", at=T0)),
        purchase("a3", "u3", T0 + timedelta(days=1), 30.0),
        # u4: capped
        planned("t4", "u4", "core", "B"),
        ev("t4.capped", TouchSuppressed(**touch("t4", "u4", variant="B"), reason="cap_7d", at=T0)),
        # day 3: u1 again (takes the later purchase), u2 fails
        planned("t5", "u1", "high", "A", "day3", T0 + timedelta(days=3)),
        purchase("a4", "u1", T0 + timedelta(days=3, hours=1), 20.0),
        ev(
            "t5.sent",
            DeliverySent(
                **touch("t5", "u1", "day3", variant="A"),
                channel="email",
                at=T0 + timedelta(days=3),
                cost=0.01,
            ),
        ),
        purchase("a5", "u1", T0 + timedelta(days=20), 10.0),  # outside every window
        planned("t6", "u2", "core", "B", "day3", T0 + timedelta(days=3)),
        ev(
            "t6.failed",
            DeliveryFailed(
                **touch("t6", "u2", "day3", variant="B"),
                channel="sms",
                at=T0 + timedelta(days=3),
                reason="provider_failed",
            ),
        ),
        ev(
            "t5.sent",
            DeliverySent(
                **touch("t5", "u1", "day3", variant="A"),
                channel="email",
                at=T0 + timedelta(days=3),
                cost=0.01,
            ),
        ),  # duplicate
    ]


# The parallel touch t7 counts once in "sent" (3 touches sent: t1, t2, t7), twice in "sends"
# (t1 email, t2 sms, t7 sms and email) and in cost (0.01 + 0.05 + 0.05 + 0.01).
LAUNCH = {
    "planned": 5,
    "suppressed": 2,
    "sent": 3,
    "sends": 4,
    "failed": 0,
    "delivered": 1,
    "opened": 1,
    "clicked": 1,
    "converted": 3,
    "orders": 3,
    "holdout": 1,
    "holdout_converted": 1,
    "holdout_orders": 1,
    "revenue": 190.0,
    "cost": 0.12,
    "holdout_revenue": 30.0,
    "suppressed_by_reason": {"cap_7d": 1, "holdout": 1},
    "reach_rate": 0.6,
    "open_rate": 1 / 3,
    "click_rate": 1 / 3,
    "conversion_rate": 1.0,
    "aov": 190 / 3,
    "revenue_per_touch": 190 / 3,
    "cost_per_conversion": 0.04,
    "roi": (190 - 0.12) / 0.12,
    "holdout_conversion_rate": 1.0,
}
DAY3 = {
    "planned": 2,
    "suppressed": 0,
    "sent": 1,
    "sends": 1,
    "failed": 1,
    "delivered": 0,
    "opened": 0,
    "clicked": 0,
    "converted": 1,
    "orders": 1,
    "holdout": 0,
    "holdout_converted": 0,
    "revenue": 20.0,
    "cost": 0.01,
    "suppressed_by_reason": {},
    "reach_rate": 0.5,
    "open_rate": 0.0,
    "click_rate": 0.0,
    "conversion_rate": 1.0,
    "aov": 20.0,
    "revenue_per_touch": 20.0,
    "cost_per_conversion": 0.01,
    "roi": (20 - 0.01) / 0.01,
    "holdout_conversion_rate": None,
}


def check(row: dict[str, Any], expected: dict[str, Any]) -> None:
    for name, value in expected.items():
        if isinstance(value, float):
            assert row[name] == pytest.approx(value), name
        else:
            assert row[name] == value, name


@pytest.fixture(params=["sqlite", "postgres"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
        else:
            server = request.getfixturevalue("postgres_url")
            name = f"t_{uuid.uuid4().hex[:10]}"
            url = await stack.enter_async_context(fresh_database(server, name))
        database = Database(url, store.SCHEMA)
        await database.start()
        stack.push_async_callback(database.stop)
        await database.create_all(store.metadata)
        yield database


async def feed(db: Database, events: list[Event[Any]], size: int) -> None:
    for i in range(0, len(events), size):
        async with db.begin() as conn:
            await handlers.apply(conn, events[i : i + size], WINDOW)


async def funnel(db: Database, group_by: tuple[str, ...], **filters: str) -> list[dict[str, Any]]:
    async with db.connect() as conn:
        return await queries.funnel(conn, P, group_by, filters)


@pytest.mark.parametrize("size", [1, 4, 100])
async def test_every_figure_by_hand(db: Database, size: int) -> None:
    events = stream()
    await feed(db, events, size)
    await feed(db, events, 7)  # a whole replay changes nothing
    await check_every_figure(db)


async def test_every_figure_by_hand_counted_in_two_lanes_at_once(db: Database) -> None:
    """As the service counts on PostgreSQL: batches handed in at once (as by the consumer's
    partitions), each event counted in its user's lane, the lanes' transactions at once."""

    async def run(batch: list[Event[Any]]) -> None:
        async with db.begin() as conn:
            await handlers.apply(conn, batch, WINDOW)

    lane_of = handlers.lane_by_user(2)
    events = stream()
    assert {lane_of(e) for e in events} == {0, 1}  # both lanes have users of the stream
    combiner = handlers.Combiner(run, lanes=2, lane_of=lane_of)
    for size in (5, 3):  # then a whole replay, which changes nothing
        await asyncio.gather(
            *(combiner.submit(events[i : i + size]) for i in range(0, len(events), size))
        )
    await check_every_figure(db)


async def check_every_figure(db: Database) -> None:
    rows = {r["wave"]: r for r in await funnel(db, ("wave",))}
    assert set(rows) == {"launch", "day3"}
    check(rows["launch"], LAUNCH)
    check(rows["day3"], DAY3)
    assert rows["launch"]["health_index"] is not None

    by_segment = {r["segment"]: r for r in await funnel(db, ("segment",))}
    assert set(by_segment) == {"high", "core"}  # nothing left under the unknown segment
    check(
        by_segment["high"],
        {
            "planned": 4,
            "sent": 3,
            "sends": 4,
            "converted": 3,
            "revenue": 160.0,
            "cost": 0.08,
            "holdout": 1,
            "holdout_revenue": 30.0,
        },
    )
    check(
        by_segment["core"],
        {
            "planned": 3,
            "sent": 1,
            "failed": 1,
            "converted": 1,
            "revenue": 50.0,
            "cost": 0.05,
            "suppressed": 1,
        },
    )

    by_wc = {(r["wave"], r["channel"]): r for r in await funnel(db, ("wave", "channel"))}
    # t7 counts as sent under sms (its first send recorded), and as a send on both channels;
    # its conversion goes with the touch-level send (sms).
    check(
        by_wc[("launch", "email")],
        {"sent": 1, "sends": 2, "opened": 1, "converted": 1, "revenue": 100.0, "cost": 0.02},
    )
    check(
        by_wc[("launch", "sms")],
        {"sent": 2, "sends": 2, "converted": 2, "revenue": 90.0, "cost": 0.1},
    )
    launch_channels = [r for (wave, _), r in by_wc.items() if wave == "launch"]
    assert sum(r["sent"] for r in launch_channels) == LAUNCH["sent"]
    assert all(r["reach_rate"] is None or r["reach_rate"] <= 1 for r in by_wc.values())
    check(by_wc[("day3", "sms")], {"failed": 1, "sent": 0, "conversion_rate": None})
    # Planned before any channel is chosen: under no channel, whatever the arrival order.
    assert {k for k, r in by_wc.items() if r["planned"]} == {("launch", ""), ("day3", "")}

    only_b = await funnel(db, ("variant",), variant="B", wave="launch")
    assert [r["variant"] for r in only_b] == ["B"]
    check(only_b[0], {"planned": 2, "sent": 1, "suppressed": 1, "revenue": 50.0})

    async with db.connect() as conn:
        # Every count made before its touch's segment was known has been moved to it.
        t = store.touches
        waiting = select(func.count()).where(t.c.pending.is_not(None))
        assert (await conn.execute(waiting)).scalar() == 0
        attributed = dict(
            (
                await conn.execute(
                    select(store.purchases.c.activity_id, store.purchases.c.touch_id)
                )
            ).all()
        )
    assert attributed == {
        "a1": "t1",
        "a2": "t2",
        "a3": "t3",
        "a4": "t5",
        "a5": None,
        "a7": "t7",
    }
    async with db.connect() as conn:
        sends = (
            await conn.execute(
                select(store.touches.c.sends).where(store.touches.c.touch_id == "t7")
            )
        ).scalar()
    assert sends == 2


async def test_reversed_stream_gives_the_same_funnel(db: Database) -> None:
    events = stream()
    await feed(db, list(reversed(events)), 3)
    rows = {r["wave"]: r for r in await funnel(db, ("wave",))}
    check(rows["launch"], LAUNCH)
    check(rows["day3"], DAY3)
    by_wc = {(r["wave"], r["channel"]): r for r in await funnel(db, ("wave", "channel"))}
    assert {k for k, r in by_wc.items() if r["planned"]} == {("launch", ""), ("day3", "")}


async def test_each_channel_of_a_parallel_touch_counts_its_own_receipts(db: Database) -> None:
    """Day 7 on SMS and push at once: each channel's receipts count for that channel."""
    at = T0 + timedelta(days=7)
    t = touch("t9", "u9", "day7", variant="A")

    def receipt(channel: str, kind: Any, minutes: int) -> Event[Any]:
        when = at + timedelta(minutes=minutes)
        data = EngagementRecorded(**t, channel=channel, kind=kind, at=when)
        return ev(f"t9.{channel}.{kind}", data, when)

    events = [
        planned("t9", "u9", "core", "A", "day7", at),
        ev("t9.sent.sms", DeliverySent(**t, channel="sms", at=at, cost=0.05), at),
        ev("t9.sent.push", DeliverySent(**t, channel="push", at=at, cost=0.001), at),
        receipt("sms", "delivered", 1),
        receipt("push", "delivered", 1),
        receipt("push", "opened", 2),
        receipt("push", "clicked", 3),
        receipt("sms", "clicked", 4),
    ]
    await feed(db, events, 3)
    await feed(db, events, 100)  # replayed: nothing doubles
    by_channel = {r["channel"]: r for r in await funnel(db, ("channel",), wave="day7")}
    check(by_channel["sms"], {"sent": 1, "sends": 1, "delivered": 1, "opened": 0, "clicked": 1})
    check(by_channel["push"], {"sent": 0, "sends": 1, "delivered": 1, "opened": 1, "clicked": 1})
    (whole,) = await funnel(db, ("wave",), wave="day7")
    check(whole, {"sent": 1, "sends": 2, "delivered": 2, "opened": 1, "clicked": 2})


def member(user: str, ltv: float, event_id: str) -> Event[Any]:
    data = AudienceMemberResolved(
        user_id=user, promotion_id=P, ended_at=T0, segment=SegmentSnapshot(ltv=ltv)
    )
    return ev(event_id, data, T0)


@pytest.mark.parametrize("order", ["as is", "reversed"])
async def test_the_participants_ltv_counts_once_per_planned_touch(db: Database, order: str) -> None:
    """The audience event (LTV) may come before or after the touch; a second one for the same
    participant is ignored; the funnel's `ltv` is the mean over planned touches."""
    events = [
        planned("t1", "u1", "high", "A"),
        member("u1", 600.0, "m-u1"),
        member("u2", 200.0, "m-u2"),
        planned("t2", "u2", "core", "A"),
        member("u1", 600.0, "m-u1-again"),  # the same participant again, another event id
        planned("t3", "u1", "high", "A", "day3", T0 + timedelta(days=3)),
        member("u4", 50.0, "m-u4"),  # a participant without a touch
    ]
    if order == "reversed":
        events.reverse()
    for size in (1, 2, 100):
        await feed(db, events, size)
    rows = {r["wave"]: r for r in await funnel(db, ("wave",))}
    check(rows["launch"], {"planned": 2, "ltv_touches": 2, "ltv": 400.0})
    check(rows["day3"], {"planned": 1, "ltv_touches": 1, "ltv": 600.0})
    segments = {r["segment"]: r for r in await funnel(db, ("segment",))}
    assert segments["high"]["ltv"] == 600.0 and segments["core"]["ltv"] == 200.0
    assert rows["launch"]["health_index"] is not None
