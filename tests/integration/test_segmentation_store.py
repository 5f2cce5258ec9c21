"""Segmentation's SQL on SQLite and PostgreSQL: the ranking matches the pure rules exactly,
aggregates kept by batched upserts match the raw activities, and the LTV window moves."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select, text

from services.segmentation import domain, encoding, store
from shared.bus.base import OutMessage
from shared.bus.memory import InProcessBus
from shared.db import Database
from shared.migrations import current_async, downgrade_async, upgrade_async
from shared.outbox import Outbox, unpack
from tests.support.tables import storage_options

NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
SHARES = (60, 25, 15)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    await upgrade_async(database_url, "segmentation")
    database = Database(database_url, "segmentation")
    await database.start()
    yield database
    await database.stop()


async def test_the_migrations_go_down_and_up_again(database_url: str) -> None:
    """0003 (room for HOT updates of the aggregates) downgrades and upgrades on both."""
    url = database_url
    postgres = url.startswith("postgresql")

    async def fillfactor() -> str | None:
        return await storage_options(url, "segmentation", "aggregates")

    await upgrade_async(url, "segmentation")
    assert await current_async(url, "segmentation") == "0004"
    if postgres:
        assert await fillfactor() == "fillfactor=85"
    await downgrade_async(url, "segmentation", "0002")
    assert await current_async(url, "segmentation") == "0002"
    if postgres:
        assert await fillfactor() is None
    await upgrade_async(url, "segmentation")
    assert await current_async(url, "segmentation") == "0004"


async def test_packed_events_still_waiting_survive_a_downgrade(database_url: str) -> None:
    """0004 down: a packed outbox row not relayed yet becomes one row per message, in the
    pack's order, so the relay of 0003's code publishes every event."""
    url = database_url
    await upgrade_async(url, "segmentation")
    messages = [OutMessage("activities", f"u{i % 3}", b'{"n":%d}' % i) for i in range(7)]
    database = Database(url, "segmentation")
    await database.start()
    try:
        relay = Outbox(database, store.outbox, InProcessBus(), source="/t", lanes=1)
        async with database.begin() as conn:
            await relay.add_packed(conn, messages, now=NOW)
            await relay.add_messages(conn, [OutMessage("users", "u9", b"{}")], now=NOW)
    finally:
        await database.stop()

    await downgrade_async(url, "segmentation", "0003")
    database = Database(url, "segmentation")
    await database.start()
    try:
        async with database.connect() as conn:
            query = text("SELECT topic, key, payload FROM segmentation.outbox ORDER BY id")
            rows = (await conn.execute(query)).all()
    finally:
        await database.stop()
    assert [(t, k, bytes(p)) for t, k, p in rows] == [("users", "u9", b"{}")] + [
        (m.topic, m.key, m.value) for m in messages
    ]
    await upgrade_async(url, "segmentation")
    assert await current_async(url, "segmentation") == "0004"


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_an_announced_batch_leaves_one_packed_row_per_lane(db: Database) -> None:
    """The ingest's statement packs the new activities' events by lane, in the batch's
    order; ids seen before are not announced again. Key and payload stay NULL (what makes
    a relay of the version before packs fail on the row instead of publishing it empty)."""
    items = [
        {"id": f"a-{i}", "user_id": f"u-{i % 5}", "kind": "visit", "occurred_at": NOW}
        for i in range(12)
    ]
    announce = encoding.Announce(
        lane=lambda user_id: int(user_id[-1]) % 2,
        source="/t",
        time=NOW,
        ids=encoding.EventIds(),
    )
    start = domain.ltv_window_start(NOW, 12)
    lane_of = announce.lane
    expected: dict[int, list[tuple[str, bytes]]] = {}
    for batch, new in ((items[:5], items[:5]), (items[3:], items[5:])):  # a-3, a-4 twice
        rows = encoding.activity_batch(batch, announce)
        assert rows.payloads is not None
        for item, payload in zip(batch, rows.payloads, strict=True):
            if item in new:
                expected.setdefault(lane_of(item["user_id"]), []).append((item["user_id"], payload))
        async with db.begin() as conn:
            await store.record_batch_postgres(
                conn, rows, now=NOW, default_start=start, topic="activities"
            )
    async with db.connect() as conn:
        stored = (
            await conn.execute(
                text(
                    "SELECT lane, topic, key, payload, pack, messages FROM segmentation.outbox"
                    " ORDER BY id"
                )
            )
        ).all()
    by_lane: dict[int, list[tuple[str, bytes]]] = {}
    for lane, topic, key, payload, packed, count in stored:
        assert (topic, key, payload) == ("activities", None, None)
        unpacked = unpack(bytes(packed))
        assert count == len(unpacked)
        by_lane.setdefault(lane, []).extend(unpacked)
    assert len(stored) == 4  # two lanes, two batches
    assert by_lane == expected


def population(n: int, seed: int) -> list[domain.Aggregates]:
    rng = random.Random(seed)
    return [
        domain.Aggregates(
            user_id=f"u-{i:05d}",
            purchases=rng.choice([0, 1, 1, 2, 3, 8, 20]),
            monetary=rng.choice([0.0, 15.5, 99.0, 250.0, rng.uniform(0, 3000)]),
            ltv=rng.choice([0.0, 0.0, 42.0, rng.uniform(0, 2000)]),
            last_purchase_at=None
            if rng.random() < 0.2
            else NOW - timedelta(days=rng.randrange(400), seconds=rng.randrange(3)),
        )
        for i in range(n)
    ]


async def _load(db: Database, users: list[domain.Aggregates]) -> None:
    async with db.begin() as conn:
        await conn.execute(
            store.aggregates.insert(),
            [
                {
                    "user_id": u.user_id,
                    "purchases": u.purchases,
                    "visits": 0,
                    "monetary": u.monetary,
                    "ltv": u.ltv,
                    "last_purchase_at": u.last_purchase_at,
                    "last_interaction_at": u.last_purchase_at,
                    "abuse_review": False,
                    "updated_at": NOW,
                }
                for u in users
            ],
        )


@pytest.mark.parametrize("n", [1, 7, 1000])
async def test_the_sql_ranking_is_the_domain_ranking(db: Database, n: int) -> None:
    users = population(n, seed=n)
    await _load(db, users)
    async with db.begin() as conn:
        cuts = await store.rank_everyone(conn, db.is_postgres, SHARES)
    async with db.connect() as conn:
        rows = (await conn.execute(select(store.user_scores))).all()
    expected = domain.score_population(users, SHARES)
    got = {row.user_id: domain.Scores(row.r, row.f, row.m, row.value_layer) for row in rows}
    assert got == expected
    assert cuts == domain.cuts_of(users, SHARES)


async def test_ranking_again_replaces_the_previous_one(db: Database) -> None:
    await _load(db, population(50, seed=1))
    async with db.begin() as conn:
        await store.rank_everyone(conn, db.is_postgres, SHARES)
    async with db.begin() as conn:
        await conn.execute(store.aggregates.delete().where(store.aggregates.c.user_id < "u-00010"))
        await store.rank_everyone(conn, db.is_postgres, SHARES)
    async with db.connect() as conn:
        assert len((await conn.execute(select(store.user_scores))).all()) == 40


async def test_batched_upserts_match_the_raw_activities(db: Database) -> None:
    rng = random.Random(7)
    acts = [
        domain.Activity(
            id=f"a-{i}",
            user_id=f"u-{rng.randrange(30):02d}",
            kind=rng.choice(["purchase", "purchase", "visit", "refund", "open"]),
            occurred_at=NOW - timedelta(days=rng.randrange(500), minutes=rng.randrange(600)),
            amount=round(rng.uniform(1, 300), 2),
        )
        for i in range(600)
    ]
    start = domain.ltv_window_start(NOW, 12)
    for chunk in range(0, len(acts), 100):
        batch = acts[chunk : chunk + 100]
        async with db.begin() as conn:
            await store.add_to_aggregates(conn, domain.fold_activities(batch, start), NOW)
            await store.add_to_months(conn, domain.month_amounts(batch))
    (expected,) = [d for d in domain.fold_activities(acts, start) if d.user_id == "u-05"]
    async with db.connect() as conn:
        row = (
            await conn.execute(select(store.aggregates).where(store.aggregates.c.user_id == "u-05"))
        ).one()
    assert row.purchases == expected.purchases
    assert row.monetary == pytest.approx(expected.monetary)
    assert row.ltv == pytest.approx(expected.ltv)
    assert row.last_purchase_at == expected.last_purchase_at
    assert row.last_interaction_at == expected.last_interaction_at

    # A rebuild from the raw activities (after a restore) finds the same aggregates.
    async with db.begin() as conn:
        await conn.execute(
            store.activities.insert(),
            [
                {
                    "id": a.id,
                    "user_id": a.user_id,
                    "kind": a.kind,
                    "occurred_at": a.occurred_at,
                    "amount": a.amount,
                    "recorded_at": NOW,
                }
                for a in acts
            ],
        )
        kept = [tuple(r) for r in (await conn.execute(select(store.aggregates))).all()]
        months = sorted(tuple(r) for r in (await conn.execute(select(store.user_months))).all())
        await conn.execute(store.aggregates.delete().where(store.aggregates.c.user_id == "u-05"))
        assert await store.rebuild_from_activities(conn, start, NOW) == 30
        rebuilt = [tuple(r) for r in (await conn.execute(select(store.aggregates))).all()]
        again = sorted(tuple(r) for r in (await conn.execute(select(store.user_months))).all())
    assert _close(rebuilt, kept)
    assert _close(again, months)

    # The window moves a month on: LTV is recounted from the monthly buckets.
    later = domain.ltv_window_start(NOW + timedelta(days=31), 12)
    async with db.begin() as conn:
        await store.recompute_ltv(conn, later)
    kept = sum(
        domain.signed_amount(a)
        for a in acts
        if a.user_id == "u-05" and domain.month_start(a.occurred_at) >= later
    )
    async with db.connect() as conn:
        ltv = await conn.scalar(
            select(store.aggregates.c.ltv).where(store.aggregates.c.user_id == "u-05")
        )
    assert ltv == pytest.approx(kept)
    assert later == date(2025, 5, 1)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_the_set_based_batch_folds_like_the_rules(db: Database) -> None:
    """PostgreSQL records a batch in one statement (SQLite folds in Python): same aggregates
    and monthly buckets as `domain.fold_activities` / `month_amounts`; ids seen before and
    erased users are skipped."""
    rng = random.Random(11)
    acts = [
        domain.Activity(
            id=f"a-{i}",
            user_id=f"u-{rng.randrange(25):02d}",
            kind=rng.choice(["purchase", "purchase", "visit", "refund", "open", "click"]),
            occurred_at=NOW - timedelta(days=rng.randrange(500), minutes=rng.randrange(600)),
            amount=round(rng.uniform(1, 300), 2),
        )
        for i in range(700)
    ]
    start = domain.ltv_window_start(NOW, 12)
    async with db.begin() as conn:
        await conn.execute(store.erasures.insert(), {"user_id": "u-24", "erased_at": NOW})
    new: list[str] = []
    for chunk in range(0, len(acts), 100):
        # Every batch repeats a slice of the previous one: those ids are not new.
        batch = acts[max(0, chunk - 20) : chunk + 100]
        rows = encoding.activity_batch([a.__dict__ for a in batch])
        async with db.begin() as conn:
            recorded = await store.record_batch_postgres(
                conn, rows, now=NOW, default_start=start, topic=None
            )
            new += recorded.new_ids
    kept = [a for a in acts if a.user_id != "u-24"]
    assert sorted(new) == sorted(a.id for a in kept)
    expected = {d.user_id: d for d in domain.fold_activities(kept, start)}
    async with db.connect() as conn:
        rows = (await conn.execute(select(store.aggregates))).all()
        months = (await conn.execute(select(store.user_months))).all()
    assert {r.user_id for r in rows} == set(expected)
    for row in rows:
        d = expected[row.user_id]
        assert (row.purchases, row.visits) == (d.purchases, d.visits)
        assert row.monetary == pytest.approx(d.monetary)
        assert row.ltv == pytest.approx(d.ltv)
        assert row.last_purchase_at == d.last_purchase_at
        assert row.last_interaction_at == d.last_interaction_at
    buckets = domain.month_amounts(kept)
    assert {(r.user_id, r.month) for r in months} == set(buckets)
    for r in months:
        amount, purchases = buckets[(r.user_id, r.month)]
        assert r.amount == pytest.approx(amount) and r.purchases == purchases


def _close(a: list[tuple[object, ...]], b: list[tuple[object, ...]]) -> bool:
    """Row lists equal, floats within rounding (sums in another order)."""
    assert len(a) == len(b)
    for x, y in zip(sorted(a, key=str), sorted(b, key=str), strict=True):
        for p, q in zip(x, y, strict=True):
            if isinstance(p, float):
                assert p == pytest.approx(q)
            else:
                assert p == q
    return True
