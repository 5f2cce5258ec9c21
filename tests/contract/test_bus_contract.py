"""The bus contract (shared/bus/base.py), run against the in-process bus and real Kafka.

Every test uses its own topics and groups, waits with deadlines (never a bare
sleep as an assertion) and stops what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import pytest

from shared.bus import BatchHandler, Bus, Message, OutMessage, PublishError
from tests.support.ports import free_port

from .conftest import PARTITIONS, TEST_BACKOFF, BusFactory

pytestmark = pytest.mark.timeout(60)

WAIT_S = 25.0


async def wait_until(predicate: Callable[[], bool], what: str, within_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within_s:g} s waiting for {what}", pytrace=False)
        await asyncio.sleep(0.02)


async def new_topic(bus: Bus, name: str) -> str:
    await bus.ensure_topics([name])
    return name


def messages(topic: str, keys: Sequence[str], per_key: int) -> list[OutMessage]:
    """`per_key` messages for each key, interleaved: k0:0, k1:0, k2:0, k0:1, ..."""
    return [OutMessage(topic, key, f"{key}:{i}".encode()) for i in range(per_key) for key in keys]


def values(batch: Sequence[Message]) -> list[bytes]:
    return [m.value for m in batch]


async def test_order_per_key(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory()
    topic = await new_topic(bus, f"contract-order-{unique}")
    keys = ["alpha", "bravo", "charlie"]
    out = messages(topic, keys, 50)
    seen: list[Message] = []

    async def handler(batch: Sequence[Message]) -> None:
        seen.extend(batch)

    # Some published before the consumer starts, the rest while it runs, in several calls.
    await bus.publish(out[:60])
    consumer = bus.consumer(f"contract-order-{unique}", [topic], handler, max_batch=7)
    await consumer.start()
    for start in range(60, len(out), 30):
        await bus.publish(out[start : start + 30])
    await wait_until(lambda: len(seen) >= len(out), f"{len(out)} messages")
    await consumer.stop()

    assert len(seen) == len(out)
    for key in keys:
        mine = [m for m in seen if m.key == key]
        assert values(mine) == [f"{key}:{i}".encode() for i in range(50)]
        assert len({m.partition for m in mine}) == 1, f"{key} spread over partitions"
        offsets = [m.offset for m in mine]
        assert offsets == sorted(offsets)
    assert {m.topic for m in seen} == {topic}


async def test_redelivery_after_handler_raises(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory()
    topic = await new_topic(bus, f"contract-redeliver-{unique}")
    out = messages(topic, ["k"], 20) + messages(topic, [f"other{i}" for i in range(5)], 4)
    target = b"k:5"
    failures = 3
    deliveries: list[bytes] = []
    handled: list[bytes] = []
    target_at: list[float] = []  # when each batch holding the target was delivered
    after_first_failure = 0  # len(deliveries) once the first failing batch was delivered

    async def handler(batch: Sequence[Message]) -> None:
        nonlocal after_first_failure
        deliveries.extend(values(batch))
        if target in values(batch):
            target_at.append(time.monotonic())
            if len(target_at) <= failures:
                after_first_failure = after_first_failure or len(deliveries)
                raise RuntimeError("simulated handler failure")
        handled.extend(values(batch))

    await bus.publish(out)
    consumer = bus.consumer(f"contract-redeliver-{unique}", [topic], handler)
    await consumer.start()
    wanted = {m.value for m in out}
    await wait_until(lambda: wanted <= set(handled), "every message handled")
    await consumer.stop()

    assert len(target_at) == failures + 1, "the failed message was not delivered again"
    assert consumer.stats.redeliveries == failures
    # Each message is in exactly one successful batch, and the key's order survived the retries:
    # nothing after the failed message was handled before it.
    assert sorted(handled) == sorted(wanted)
    assert [v for v in handled if v.startswith(b"k:")] == [f"k:{i}".encode() for i in range(20)]
    # A retry starts again at (or before) the failed message, never after it.
    retried = [v for v in deliveries[after_first_failure:] if v.startswith(b"k:")]
    assert retried and int(retried[0].split(b":")[1]) <= 5
    # ... and only after the back-off, which doubles with each attempt.
    for attempt in range(1, failures + 1):
        waited = target_at[attempt] - target_at[attempt - 1]
        assert waited >= 0.8 * TEST_BACKOFF.delay(attempt), f"attempt {attempt}: {waited:.3f} s"


async def test_no_loss_across_consumer_restart(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory()
    topic = await new_topic(bus, f"contract-restart-{unique}")
    group = f"contract-restart-{unique}"
    out = messages(topic, [f"key{i}" for i in range(20)], 10)
    wanted = {m.value for m in out}
    a_done: list[bytes] = []
    a_batches = {"started": 0, "finished": 0}

    async def slow_a(batch: Sequence[Message]) -> None:
        a_batches["started"] += 1
        await asyncio.sleep(0.05)
        a_done.extend(values(batch))
        a_batches["finished"] += 1

    await bus.publish(out)
    a = bus.consumer(group, [topic], slow_a, max_batch=5)
    await a.start()
    await wait_until(lambda: len(a_done) >= 40, "consumer A to handle some messages")
    await a.stop()
    assert a_batches["started"] == a_batches["finished"], "stop() did not finish the batch in hand"
    a_final = set(a_done)
    assert len(a_done) == len(a_final)
    assert a_final < wanted, "A handled everything: the test did not stop it mid-stream"

    b_seen: list[bytes] = []

    async def record_b(batch: Sequence[Message]) -> None:
        b_seen.extend(values(batch))

    b = bus.consumer(group, [topic], record_b)
    await b.start()
    await wait_until(lambda: wanted <= a_final | set(b_seen), "B to handle the rest")
    await b.stop()

    assert set(a_done) == a_final, "A handled messages after it stopped"
    assert not a_final & set(b_seen), "B got messages that A had committed"
    assert len(b_seen) == len(set(b_seen))
    assert a_final | set(b_seen) == wanted


async def test_no_loss_when_stopped_with_a_blocked_batch(
    bus_factory: BusFactory, unique: str
) -> None:
    # Kafka: a short drain timeout, after which stop() cancels the batch in hand.
    bus = await bus_factory(drain_timeout_s=1.0)
    topic = await new_topic(bus, f"contract-blocked-{unique}")
    group = f"contract-blocked-{unique}"
    out = messages(topic, [f"key{i}" for i in range(20)], 10)
    wanted = {m.value for m in out}
    target = b"key3:4"
    a_done: list[bytes] = []
    blocked = asyncio.Event()
    never = asyncio.Event()

    async def hanging_a(batch: Sequence[Message]) -> None:
        for message in batch:
            if message.value == target:
                blocked.set()
                await never.wait()  # hangs mid-batch until the consumer gives up on it
        a_done.extend(values(batch))

    await bus.publish(out)
    a = bus.consumer(group, [topic], hanging_a, max_batch=5)
    await a.start()
    await wait_until(blocked.is_set, "A to block on its batch")
    # KafkaBus bounds stop() itself (drain_timeout_s); the in-process bus waits for the
    # handler forever, so there the timeout cancels stop(), like a crash of the consumer.
    try:
        await asyncio.wait_for(a.stop(), timeout=6.0 if bus_factory.is_kafka else 0.5)
    except TimeoutError:
        if bus_factory.is_kafka:
            raise
    a_final = set(a_done)
    assert target not in a_final

    b_seen: list[bytes] = []

    async def record_b(batch: Sequence[Message]) -> None:
        b_seen.extend(values(batch))

    b = bus.consumer(group, [topic], record_b)
    await b.start()
    await wait_until(lambda: wanted <= a_final | set(b_seen), "B to handle the rest")
    await b.stop()

    assert target in b_seen, "the batch A never finished was not delivered again"
    assert not a_final & set(b_seen), "B got messages that A had committed"
    assert set(a_done) == a_final, "A handled messages after it stopped"
    assert a_final | set(b_seen) == wanted


async def test_two_consumers_share_the_partitions(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory()
    topic = await new_topic(bus, f"contract-share-{unique}")
    group = f"contract-share-{unique}"
    seen: dict[str, list[Message]] = {"a": [], "b": []}

    def recorder(name: str) -> BatchHandler:
        async def handler(batch: Sequence[Message]) -> None:
            seen[name].extend(batch)

        return handler

    a = bus.consumer(group, [topic], recorder("a"))
    b = bus.consumer(group, [topic], recorder("b"))
    await a.start()
    await b.start()
    everything = {(topic, p) for p in range(PARTITIONS)}

    def shared() -> bool:
        sa, sb = a.stats.assigned, b.stats.assigned
        return bool(sa) and bool(sb) and not sa & sb and sa | sb == everything

    await wait_until(shared, "both consumers to own a disjoint share of all partitions")
    a_parts = {p for _, p in a.stats.assigned}
    b_parts = {p for _, p in b.stats.assigned}

    out = messages(topic, [f"key{i}" for i in range(40)], 5)
    await bus.publish(out)
    await wait_until(lambda: len(seen["a"]) + len(seen["b"]) >= len(out), "every message")
    await a.stop()
    await b.stop()

    both = values(seen["a"]) + values(seen["b"])
    assert sorted(both) == sorted(m.value for m in out), "not exactly once"
    assert seen["a"] and seen["b"]
    assert {m.partition for m in seen["a"]} <= a_parts
    assert {m.partition for m in seen["b"]} <= b_parts


async def test_rebalance_while_handling_loses_and_repeats_nothing(
    bus_factory: BusFactory, unique: str
) -> None:
    """B joins while A is in the middle of batches: A finishes and commits them first."""
    bus = await bus_factory()
    topic = await new_topic(bus, f"contract-rebalance-{unique}")
    group = f"contract-rebalance-{unique}"
    out = messages(topic, [f"key{i}" for i in range(40)], 10)
    wanted = sorted(m.value for m in out)
    seen: dict[str, list[Message]] = {"a": [], "b": []}
    busy: dict[tuple[str, int], int] = {}
    overlaps: list[tuple[str, int]] = []

    def slow(name: str) -> BatchHandler:
        async def handler(batch: Sequence[Message]) -> None:
            tp = (batch[0].topic, batch[0].partition)
            busy[tp] = busy.get(tp, 0) + 1
            if busy[tp] > 1:
                overlaps.append(tp)  # two handlers on one partition at once
            try:
                await asyncio.sleep(0.07)
                seen[name].extend(batch)
            finally:
                busy[tp] -= 1

        return handler

    await bus.publish(out)
    a = bus.consumer(group, [topic], slow("a"), max_batch=2)
    await a.start()
    await wait_until(lambda: len(seen["a"]) >= 24, "A to be under way")
    b = bus.consumer(group, [topic], slow("b"), max_batch=2)
    await b.start()
    assert len(seen["a"]) < len(out), "A finished before B joined: no rebalance mid-stream"
    await wait_until(lambda: len(seen["a"]) + len(seen["b"]) >= len(out), "every message")
    await a.stop()
    await b.stop()

    assert not overlaps, f"partitions handled by two handlers at once: {set(overlaps)}"
    assert seen["b"], "B never got a partition"
    assert sorted(values(seen["a"]) + values(seen["b"])) == wanted, "lost or repeated"


async def test_publish_to_a_missing_topic_raises(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory(send_timeout_s=3.0)
    missing = f"contract-missing-{unique}"
    started = time.monotonic()
    with pytest.raises(PublishError) as raised:
        await bus.publish([OutMessage(missing, "k", b"v")])
    assert time.monotonic() - started < 3.0 + 2.0
    assert missing in str(raised.value)

    # The bus still works afterwards.
    topic = await new_topic(bus, f"contract-present-{unique}")
    await bus.publish([OutMessage(topic, "k", b"v")])


async def test_ensure_topics_is_idempotent(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory()
    first, second = f"contract-idem1-{unique}", f"contract-idem2-{unique}"
    await bus.ensure_topics([first])
    await bus.ensure_topics([first])
    await bus.ensure_topics([first, second, first])
    await bus.ensure_topics([])

    out = messages(first, ["a", "b"], 3) + messages(second, ["a", "b"], 3)
    await bus.publish(out)
    seen: list[Message] = []

    async def handler(batch: Sequence[Message]) -> None:
        seen.extend(batch)

    consumer = bus.consumer(f"contract-idem-{unique}", [first, second], handler)
    await consumer.start()
    await wait_until(lambda: len(seen) >= len(out), "every message")
    everything = {(t, p) for t in (first, second) for p in range(PARTITIONS)}
    await wait_until(lambda: consumer.stats.assigned == everything, "all partitions assigned")
    await consumer.stop()
    assert sorted(values(seen)) == sorted(m.value for m in out)


async def test_ping_and_unknown_topic_consumer(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory()
    assert await bus.ping() is True

    async def handler(batch: Sequence[Message]) -> None:
        return None

    consumer = bus.consumer(f"contract-nope-{unique}", [f"contract-nope-{unique}"], handler)
    with pytest.raises(ValueError, match="unknown topic"):
        await consumer.start()


async def test_kafka_bus_with_an_unreachable_broker_fails_fast(unique: str) -> None:
    # Needs no broker: it is about the one that is not there.
    from shared.bus.kafka import KafkaBus, KafkaUnavailableError

    async def assert_unavailable(bootstrap: str) -> None:
        bus = KafkaBus(
            bootstrap, client_id=f"contract-{unique}", send_timeout_s=2.0, start_timeout_s=3.0
        )
        started = time.monotonic()
        with pytest.raises(KafkaUnavailableError, match="did not answer"):
            await bus.start()
        assert time.monotonic() - started < 3.0 + 2.0
        assert await bus.ping() is False
        with pytest.raises(PublishError, match="not started"):
            await bus.publish([OutMessage(f"contract-any-{unique}", "k", b"v")])
        await bus.stop()

    # Nothing listens: refused at once.
    await assert_unavailable(f"127.0.0.1:{free_port()}")

    # Something accepts connections and never answers: the start timeout bounds it.
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await assert_unavailable(f"127.0.0.1:{port}")
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


@pytest.mark.kafka
async def test_kafka_keys_land_where_kafkas_own_producer_puts_them(
    kafka_bootstrap: str, unique: str
) -> None:
    # Another producer (aiokafka's send, Java's default partitioner) must put a key on the
    # partition the bus uses, or that key's messages would lose their order.
    from aiokafka import AIOKafkaProducer

    factory = BusFactory("kafka", kafka_bootstrap, unique)
    try:
        bus = await factory()
        topic = await new_topic(bus, f"contract-partitioner-{unique}")
        keys = [
            "",
            "a",
            "user-1",
            "user-00042",
            "é",
            "用户-7",
            "👩‍👩‍👧",
            *(f"k{i}" for i in range(40)),
        ]
        await bus.publish([OutMessage(topic, key, b"bus") for key in keys])
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            theirs = {
                key: (await producer.send_and_wait(topic, b"send", key=key.encode())).partition
                for key in keys
            }
        finally:
            await producer.stop()
        ours: dict[str | None, int] = {}

        async def handler(batch: Sequence[Message]) -> None:
            ours.update((m.key, m.partition) for m in batch if m.value == b"bus")

        consumer = bus.consumer(f"contract-partitioner-{unique}", [topic], handler)
        await consumer.start()
        await wait_until(lambda: len(ours) == len(keys), "every key published by the bus")
        await consumer.stop()
        assert ours == theirs
        assert len(set(theirs.values())) > 1, "every key on one partition proves little"
    finally:
        await factory.close()
