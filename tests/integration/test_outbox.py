"""The transactional outbox against real databases (a SQLite file and PostgreSQL).

The bus is the in-process transport (a real implementation of the port);
`FlakyBus` wraps it to fail on demand. The database is never faked.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, String, Table, func, literal, select, text
from sqlalchemy.types import BigInteger

from shared.bus.base import OutMessage, PublishError
from shared.bus.memory import InProcessBus
from shared.db import Database
from shared.events import ActivityRecorded, default_registry, encode
from shared.outbox import (
    Outbox,
    lane_for,
    lane_lock_key,
    outbox_table,
    pack,
    pack_sql,
    unpack,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
REGISTRY = default_registry()


class FlakyBus(InProcessBus):
    """The in-process bus, but `fail_next` publishes raise PublishError.

    With `ack_lost`, the failing publish first delivers the messages and then
    raises, like a broker acknowledgement that never arrived.
    """

    def __init__(self) -> None:
        super().__init__(partitions=4)
        self.fail_next = 0
        self.ack_lost = False
        self.calls = 0

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            if self.ack_lost:
                await super().publish(messages)
            raise PublishError("broker unavailable (test)")
        await super().publish(messages)


@dataclass
class Env:
    name: str
    url: str
    schema: str
    databases: list[Database] = field(default_factory=list)
    outboxes: list[Outbox] = field(default_factory=list)

    async def database(self, **kwargs: int) -> Database:
        db = Database(self.url, self.schema, **kwargs)
        self.databases.append(db)
        await db.start()
        return db

    def outbox(self, db: Database, table: Table, bus: InProcessBus, **kwargs: object) -> Outbox:
        outbox = Outbox(db, table, bus, source="/test/outbox", **kwargs)  # type: ignore[arg-type]
        self.outboxes.append(outbox)
        return outbox

    async def close(self) -> None:
        for outbox in self.outboxes:
            await outbox.stop(timeout_s=1.0)
        if self.name == "postgres" and self.databases:
            await self.databases[0].start()
            await self.databases[0].drop_schema()
        for db in self.databases:
            await db.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def env(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> AsyncIterator[Env]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/afterglow.db"
    e = Env(request.param, url, f"ob_{unique}")
    yield e
    await e.close()


def tables(schema: str) -> tuple[MetaData, Table, Table]:
    metadata = MetaData(schema=schema)
    outbox = outbox_table(metadata)
    widgets = Table("widgets", metadata, Column("id", String(64), primary_key=True))
    return metadata, outbox, widgets


async def setup(
    env: Env, bus: InProcessBus | None = None, **kwargs: object
) -> tuple[Database, Table, Table, InProcessBus, Outbox]:
    db = await env.database()
    metadata, outbox_t, widgets = tables(env.schema)
    await db.create_all(metadata)
    bus = bus or InProcessBus(partitions=4)
    await bus.start()
    await bus.ensure_topics(["activities", "x.activities", "users"])
    return db, outbox_t, widgets, bus, env.outbox(db, outbox_t, bus, **kwargs)


def activity(key: str, seq: int) -> ActivityRecorded:
    return ActivityRecorded(user_id=key, id=f"{key}#{seq}", kind="visit", occurred_at=NOW)


def published(bus: InProcessBus, topic: str = "activities") -> list[tuple[str, int]]:
    """(key, seq) of every message on the topic, in per-partition log order."""
    out = []
    for message in bus.messages(topic):
        data = REGISTRY.decode(message.value).data
        assert isinstance(data, ActivityRecorded)
        key, _, seq = data.id.partition("#")
        assert message.key == key == data.user_id
        out.append((key, int(seq)))
    return out


def by_key(pairs: list[tuple[str, int]]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = defaultdict(list)
    for key, seq in pairs:
        grouped[key].append(seq)
    return dict(grouped)


def random_batches(
    *, keys: int, batches: int, most: int, seed: int
) -> tuple[list[list[ActivityRecorded]], dict[str, list[int]]]:
    """`batches` lists of 1 to `most` events of random keys, numbered in order, and each
    key's numbers in that order (what its events must be published in)."""
    rng = random.Random(seed)
    names = [f"user-{i}" for i in range(keys)]
    expected: dict[str, list[int]] = {}
    out: list[list[ActivityRecorded]] = []
    seq = 0
    for _ in range(batches):
        events = []
        for _ in range(rng.randint(1, most)):
            key = rng.choice(names)
            events.append(activity(key, seq))
            expected.setdefault(key, []).append(seq)
            seq += 1
        out.append(events)
    return out, expected


async def add_committed(db: Database, outbox: Outbox, events: Sequence[ActivityRecorded]) -> None:
    async with db.begin() as conn:
        await outbox.add(conn, events, now=NOW)
    outbox.notify()


async def drain(outbox: Outbox) -> int:
    total = 0
    while n := await outbox.relay_once():
        total += n
    return total


# -- atomicity with the caller's transaction ------------------------------------------


async def test_events_of_a_rolled_back_transaction_are_never_published(env: Env) -> None:
    db, _, widgets, bus, outbox = await setup(env)

    with pytest.raises(RuntimeError, match="handler failed"):
        async with db.begin() as conn:
            await conn.execute(widgets.insert().values(id="w1"))
            await outbox.add(conn, [activity("u1", 0), activity("u2", 0)], now=NOW)
            raise RuntimeError("handler failed")

    assert await outbox.pending() == 0
    assert await outbox.relay_once() == 0
    assert bus.messages("activities") == []
    async with db.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(widgets)) == 0


async def test_committed_events_are_published_in_per_key_order(env: Env) -> None:
    db, _, widgets, bus, outbox = await setup(env, lanes=4)
    batches, expected = random_batches(keys=12, batches=40, most=6, seed=7)
    seq = sum(map(len, batches))
    for txn, events in enumerate(batches):
        async with db.begin() as conn:
            await conn.execute(widgets.insert().values(id=f"w{txn}"))
            await outbox.add(conn, events, now=NOW)

    assert await outbox.pending() == seq
    assert await drain(outbox) == seq
    assert await outbox.pending() == 0
    got = published(bus)
    assert len(got) == seq
    assert by_key(got) == expected

    # The envelope: source, time, type and subject as `encode` writes them.
    event = REGISTRY.decode(bus.messages("activities")[0].value)
    assert event.source == "/test/outbox"
    assert event.time == NOW
    assert event.type == "afterglow.activity.recorded.v1"
    assert event.subject == event.data.partition_key()


async def test_topic_name_maps_topics_and_lanes_follow_the_key(env: Env) -> None:
    db, outbox_t, _, bus, outbox = await setup(env, topic_name=lambda t: f"x.{t}", lanes=5)
    await add_committed(db, outbox, [activity("alice", 0), activity("bob", 1)])
    async with db.connect() as conn:
        rows = (await conn.execute(select(outbox_t.c.key, outbox_t.c.lane, outbox_t.c.topic))).all()
    assert {(r.key, r.lane, r.topic) for r in rows} == {
        ("alice", lane_for("alice", 5), "x.activities"),
        ("bob", lane_for("bob", 5), "x.activities"),
    }
    assert await drain(outbox) == 2
    assert bus.messages("activities") == []
    assert sorted(published(bus, "x.activities")) == [("alice", 0), ("bob", 1)]


async def test_add_messages_keeps_headers(env: Env) -> None:
    db, _, _, bus, outbox = await setup(env)
    headers = (("reason", b"cap_7d"), ("bin", bytes(range(256))))
    async with db.begin() as conn:
        await outbox.add_messages(
            conn,
            [
                OutMessage("users", "k1", b'{"a":1}', headers),
                OutMessage("users", "k1", b'{"a":2}'),
            ],
        )
        await outbox.add_messages(conn, [])  # nothing to do, no statement
    assert await drain(outbox) == 2
    first, second = bus.messages("users")
    assert (first.key, first.value, first.headers) == ("k1", b'{"a":1}', headers)
    assert (second.value, second.headers) == (b'{"a":2}', ())


async def test_packed_rows_keep_each_keys_order_among_single_rows(env: Env) -> None:
    """Transactions alternate one row per message and packed rows; every key's events
    leave in the order they were committed, and `pending` counts messages, not rows."""
    db, outbox_t, _, bus, outbox = await setup(env, lanes=3)
    batches, expected = random_batches(keys=9, batches=30, most=12, seed=11)
    seq = sum(map(len, batches))
    for txn, events in enumerate(batches):
        async with db.begin() as conn:
            if txn % 2:
                await outbox.add(conn, events, now=NOW)
            else:
                encoded = [
                    OutMessage("activities", e.user_id, encode(e, source="/test/outbox", time=NOW))
                    for e in events
                ]
                await outbox.add_packed(conn, encoded, now=NOW)
    async with db.connect() as conn:
        rows = await conn.scalar(select(func.count()).select_from(outbox_t))
        # No key nor payload in a packed row: a relay that predates packs fails on it.
        packed = (
            await conn.execute(
                select(outbox_t.c.key, outbox_t.c.payload).where(outbox_t.c.pack.is_not(None))
            )
        ).all()
    assert rows is not None and rows < seq
    assert packed and set(packed) == {(None, None)}
    assert await outbox.pending() == seq
    assert await drain(outbox) == seq
    assert await outbox.pending() == 0
    assert by_key(published(bus)) == expected


async def test_a_round_takes_packed_rows_until_its_batch_is_full(env: Env) -> None:
    """A round stops at the first row that starts beyond `batch` messages a lane: a big
    pack goes whole, and what is left waits for the next round."""
    db, _, _, bus, outbox = await setup(env, lanes=1, batch=10)
    async with db.begin() as conn:
        for start in (0, 6, 12):
            await outbox.add_packed(
                conn,
                [OutMessage("users", "k", b"%d" % i) for i in range(start, start + 6)],
                now=NOW,
            )
        await outbox.add_messages(conn, [OutMessage("users", "k", b"18")], now=NOW)
    assert await outbox.relay_once() == 12
    assert await outbox.pending() == 7
    assert await outbox.relay_once() == 7
    assert [m.value for m in bus.messages("users")] == [b"%d" % i for i in range(19)]


async def test_each_lane_of_a_round_takes_its_own_batch(env: Env) -> None:
    """`batch` counts each lane's messages on its own: a lane of big packs does not
    leave another lane's rows for the next round, nor take more than its share."""
    db, _, _, bus, outbox = await setup(env, lanes=2, batch=10)
    packed_key = "k0"
    single_key = next(f"k{i}" for i in range(1, 50) if lane_for(f"k{i}", 2) != lane_for("k0", 2))
    async with db.begin() as conn:
        for start in (0, 6, 12):
            await outbox.add_packed(
                conn,
                [OutMessage("users", packed_key, b"%d" % i) for i in range(start, start + 6)],
                now=NOW,
            )
        await outbox.add_messages(
            conn, [OutMessage("users", single_key, b"%d" % i) for i in range(15)], now=NOW
        )
    # The packed lane: two packs (the third starts at its 13th message); the other: 10 rows.
    assert await outbox.relay_once() == 12 + 10
    assert await outbox.pending() == 6 + 5
    assert await outbox.relay_once() == 6 + 5
    values: dict[str, list[bytes]] = defaultdict(list)
    for m in bus.messages("users"):
        values[m.key].append(m.value)
    assert values == {
        packed_key: [b"%d" % i for i in range(18)],
        single_key: [b"%d" % i for i in range(15)],
    }


async def test_packed_messages_carry_no_headers(env: Env) -> None:
    db, _, _, _, outbox = await setup(env)
    async with db.begin() as conn:
        with pytest.raises(ValueError, match="cannot carry headers"):
            await outbox.add_packed(conn, [OutMessage("users", "k", b"{}", (("h", b"v"),))])


@pytest.mark.postgres
async def test_postgres_packs_rows_exactly_as_python_does(postgres_url: str, unique: str) -> None:
    """`pack_sql` (the segmentation ingest's INSERT) writes `pack`'s layout, multi-byte
    keys and empty values included, in the order asked for."""
    rows = [("é-user", b'{"a":1}', 2), ("k", b"", 1), ("\u4e2d\u6587", bytes(range(256)), 3)]
    db = Database(postgres_url, f"ob_{unique}")
    await db.start()
    try:
        async with db.connect() as conn:
            got = await conn.scalar(
                text(
                    "SELECT "
                    + pack_sql("k", "v", "n")
                    + " FROM unnest(CAST(:k AS text[]), CAST(:v AS bytea[]), CAST(:n AS int[]))"
                    " AS t(k, v, n)"
                ),
                {"k": [r[0] for r in rows], "v": [r[1] for r in rows], "n": [r[2] for r in rows]},
            )
    finally:
        await db.stop()
    ordered = sorted(rows, key=lambda r: r[2])
    assert got == pack((k, v) for k, v, _ in ordered)
    assert unpack(got) == [(k, v) for k, v, _ in ordered]


# -- crashes and failures -----------------------------------------------------------


async def test_a_failed_publish_loses_nothing_and_a_new_relay_sends_everything(env: Env) -> None:
    flaky = FlakyBus()
    db, outbox_t, _, _, first = await setup(env, bus=flaky, lanes=4)
    keys = [f"k{i}" for i in range(8)]
    for round_ in range(5):
        await add_committed(db, first, [activity(k, round_) for k in keys])

    # The broker is down: the first lane's publish fails, nothing is published or deleted.
    flaky.fail_next = 1
    assert await first.relay_once() == 0
    assert isinstance(first.last_error, PublishError)
    assert await first.pending() == 40
    assert flaky.messages("activities") == []

    # "Crash": the relay object is gone; a new process (new Database, new Outbox) takes over.
    del first
    await db.stop()
    db2 = await env.database()
    second = env.outbox(db2, outbox_t, flaky, lanes=4)
    assert await drain(second) == 40
    assert second.last_error is None
    assert await second.pending() == 0
    assert by_key(published(flaky)) == {k: [0, 1, 2, 3, 4] for k in keys}


async def test_a_crash_after_commit_before_any_relay_loses_nothing(env: Env) -> None:
    db, outbox_t, _, bus, first = await setup(env)
    await add_committed(db, first, [activity("u", i) for i in range(10)])
    # The process dies right after the commit: no relay ever ran.
    del first
    await db.stop()

    db2 = await env.database()
    second = env.outbox(db2, outbox_t, bus)
    assert await second.pending() == 10
    assert await drain(second) == 10
    assert by_key(published(bus)) == {"u": list(range(10))}


async def test_a_failure_midway_keeps_what_was_published_and_the_rest(env: Env) -> None:
    flaky = FlakyBus()
    db, _, _, _, outbox = await setup(env, bus=flaky, lanes=8)
    keys = [f"k{i}" for i in range(40)]  # spread over every lane
    await add_committed(db, outbox, [activity(k, 0) for k in keys])
    lanes_used = len({lane_for(k, 8) for k in keys})

    # Let the first lane through, fail the second.
    original = flaky.publish
    calls = 0

    async def second_fails(messages: Sequence[OutMessage]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise PublishError("second lane fails")
        await original(messages)

    flaky.publish = second_fails  # type: ignore[method-assign]
    first_round = await outbox.relay_once()
    if env.name == "postgres":
        # Every lane in one transaction and one publish call: there is no midway.
        assert (first_round, calls, outbox.last_error) == (40, 1, None)
        return
    assert 0 < first_round < 40
    assert isinstance(outbox.last_error, PublishError)
    assert await outbox.pending() == 40 - first_round
    assert calls == 2 < lanes_used

    flaky.publish = original  # type: ignore[method-assign]
    assert await drain(outbox) == 40 - first_round
    assert sorted(published(flaky)) == sorted((k, 0) for k in keys)


async def test_a_lost_acknowledgement_duplicates_but_never_loses(env: Env) -> None:
    flaky = FlakyBus()
    db, _, _, _, outbox = await setup(env, bus=flaky, lanes=1)
    await add_committed(db, outbox, [activity("u", i) for i in range(5)])
    flaky.fail_next, flaky.ack_lost = 1, True
    assert await outbox.relay_once() == 0
    assert await outbox.pending() == 5
    assert await drain(outbox) == 5
    # At least once: the batch arrives twice, each copy in order.
    assert by_key(published(flaky)) == {"u": [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]}


async def test_small_batches_drain_in_order(env: Env) -> None:
    db, _, _, bus, outbox = await setup(env, lanes=2, batch=3)
    await add_committed(db, outbox, [activity(f"k{i % 3}", i) for i in range(25)])
    first = await outbox.relay_once()
    assert first <= 3 * 2  # one batch per lane per round
    await drain(outbox)
    assert by_key(published(bus)) == {f"k{j}": list(range(j, 25, 3)) for j in range(3)}


async def test_rows_of_lanes_beyond_a_reduced_lane_count_are_still_relayed(env: Env) -> None:
    db, outbox_t, _, bus, wide = await setup(env, lanes=16)
    keys = [f"k{i}" for i in range(30)]
    await add_committed(db, wide, [activity(k, 0) for k in keys])
    assert any(lane_for(k, 16) >= 3 for k in keys)
    narrow = env.outbox(db, outbox_t, bus, lanes=3)
    assert await drain(narrow) == 30
    assert sorted(published(bus)) == sorted((k, 0) for k in keys)


# -- the relay loop ---------------------------------------------------------------------


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        # Polling a condition that no event announces.
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_the_loop_publishes_on_notify_survives_failures_and_drains_at_stop(
    env: Env,
) -> None:
    flaky = FlakyBus()
    db, _, _, _, outbox = await setup(env, bus=flaky, poll_s=60.0, max_backoff_s=0.05)
    await outbox.start()
    assert outbox.running

    # notify() wakes the relay long before poll_s.
    await add_committed(db, outbox, [activity("u", 0), activity("u", 1)])

    async def two_published() -> bool:
        return len(flaky.messages("activities")) == 2

    await wait_for(two_published, timeout_s=5.0)

    # The broker fails three times: the loop logs, backs off and goes on.
    flaky.fail_next = 3
    await add_committed(db, outbox, [activity("u", 2)])

    async def three_published() -> bool:
        return len(flaky.messages("activities")) == 3

    await wait_for(three_published, timeout_s=5.0)
    assert flaky.fail_next == 0
    assert outbox.running

    # Events committed without notify() (poll_s is 60 s) are relayed by stop(). First
    # let the loop finish the extra round it runs after publishing and go to sleep.
    await asyncio.sleep(0.3)
    async with db.begin() as conn:
        await outbox.add(conn, [activity("u", 3), activity("u", 4)], now=NOW)
    await asyncio.sleep(0.05)
    assert len(flaky.messages("activities")) == 3
    await outbox.stop()
    assert not outbox.running
    assert by_key(published(flaky)) == {"u": [0, 1, 2, 3, 4]}
    assert await outbox.pending() == 0


async def test_the_loop_survives_a_missing_table(env: Env) -> None:
    """A database error (here: the table is not there yet) is retried, not fatal."""
    db = await env.database()
    metadata, outbox_t, _ = tables(env.schema)
    bus = InProcessBus()
    await bus.start()
    await bus.ensure_topics(["activities"])
    outbox = env.outbox(db, outbox_t, bus, poll_s=0.01, max_backoff_s=0.02)
    await outbox.start()

    async def failed_once() -> bool:
        return outbox.errors_total > 0

    await wait_for(failed_once)
    assert outbox.running

    await db.create_all(metadata)
    await add_committed(db, outbox, [activity("u", 0)])

    async def published_one() -> bool:
        return len(bus.messages("activities")) == 1

    await wait_for(published_one)
    await outbox.stop()


# -- several replicas (PostgreSQL) -------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("env", ["postgres"], indirect=True)
async def test_a_lane_held_by_another_replica_is_skipped(env: Env) -> None:
    db, outbox_t, _, bus, outbox = await setup(env, lanes=2)
    keys = [f"k{i}" for i in range(10)]
    await add_committed(db, outbox, [activity(k, 0) for k in keys])
    held = lane_for(keys[0], 2)
    other = await env.database()
    async with other.begin() as conn:
        key = literal(lane_lock_key(outbox_t.schema, outbox_t.name, held), BigInteger)
        assert await conn.scalar(select(func.pg_try_advisory_xact_lock(key))) is True
        n = await drain(outbox)
        assert n == sum(1 for k in keys if lane_for(k, 2) != held)
        assert await outbox.pending() == 10 - n
    # The other replica committed: the lane is free again.
    assert await drain(outbox) == 10 - n
    assert sorted(published(bus)) == sorted((k, 0) for k in keys)


@pytest.mark.postgres
@pytest.mark.parametrize("env", ["postgres"], indirect=True)
async def test_two_replicas_relay_every_event_once_in_per_key_order(env: Env) -> None:
    producer_db, outbox_t, _, bus, producer = await setup(env, lanes=8)
    # Two replicas: their own pools and relays, the same table and broker.
    replicas = []
    for _ in range(2):
        db = await env.database(pool_size=3)
        replicas.append(env.outbox(db, outbox_t, bus, lanes=8, batch=7, poll_s=0.02))
    for replica in replicas:
        await replica.start()

    keys = [f"user-{i}" for i in range(24)]
    per_key = 40

    async def produce(key: str) -> None:
        # One writer per key: its transactions commit in sequence order.
        rng = random.Random(key)
        seq = 0
        while seq < per_key:
            n = min(per_key - seq, rng.randint(1, 4))
            await add_committed(
                producer_db, producer, [activity(key, s) for s in range(seq, seq + n)]
            )
            for replica in replicas:
                replica.notify()
            seq += n
            await asyncio.sleep(rng.random() * 0.005)

    await asyncio.gather(*(produce(k) for k in keys))
    total = len(keys) * per_key

    async def all_published() -> bool:
        return len(bus.messages("activities")) >= total and await producer.pending() == 0

    await wait_for(all_published, timeout_s=60.0)
    for replica in replicas:
        await replica.stop()

    got = published(bus)
    assert len(got) == total, "no duplicates"
    assert by_key(got) == {k: list(range(per_key)) for k in keys}
    shares = [r.published_total for r in replicas]
    assert sum(shares) == total
    assert all(share > 0 for share in shares), shares


# -- vacuuming (PostgreSQL) -----------------------------------------------------------


@pytest.mark.postgres
async def test_the_relay_vacuums_what_it_deleted_so_its_reads_stay_short(
    postgres_url: str, unique: str
) -> None:
    """A deleted row stays in the (lane, id) index until the table is vacuumed, and every
    round reads each lane from its oldest entry: without vacuuming, past every row relayed
    before. Autovacuum is off for this table, so only the relay's own vacuum can help."""
    env = Env("postgres", postgres_url, f"ob_{unique}")
    try:
        db, outbox_t, _, bus, _ = await setup(env)
        async with db.begin() as conn:
            await conn.execute(
                text(f"ALTER TABLE {outbox_t.fullname} SET (autovacuum_enabled = false)")
            )
        messages = [OutMessage("activities", f"k{i % 97}", b'{"n": %d}' % i) for i in range(40_000)]

        async def relay_all(outbox: Outbox) -> int:
            for start in range(0, len(messages), 5000):
                async with db.begin() as conn:
                    await outbox.add_messages(conn, messages[start : start + 5000], now=NOW)
            total = 0
            while n := await outbox.relay_once():
                total += n
                await outbox.vacuumed()
            return total

        async def oldest_read_blocks() -> int:
            async with db.connect() as conn:
                plan = await conn.scalar(
                    text(
                        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)"
                        f" SELECT id FROM {outbox_t.fullname} WHERE lane = 0 ORDER BY id LIMIT 1"
                    )
                )
            top = (plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]
            return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])

        manual = env.outbox(db, outbox_t, bus, lanes=1, batch=2000, vacuum_rows=0)
        assert await relay_all(manual) == 40_000
        assert manual.vacuums_total == 0
        behind_dead_rows = await oldest_read_blocks()

        relay = env.outbox(db, outbox_t, bus, lanes=1, batch=2000, vacuum_rows=1000)
        assert await relay_all(relay) == 40_000
        assert relay.vacuums_total >= 20
        assert await relay.pending() == 0
        vacuumed = await oldest_read_blocks()
    finally:
        await env.close()
    assert behind_dead_rows > 100, behind_dead_rows
    assert vacuumed < 10, vacuumed
