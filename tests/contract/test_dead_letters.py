"""The dead-letter policy of shared/consumer.py, on the in-process bus and on real Kafka.

A message that is not a known, valid event (not JSON, not a CloudEvent, a bad envelope, an
unknown type or schema version, invalid data, too large) lands on `<topic>.dlq` with the
reason in its headers while the consumer goes on; one far over Kafka's limit never enters
Kafka (the publisher gets a clear error); a handler failing for good
is dead-lettered after its attempts; a transient failure is retried, not
dead-lettered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from shared.bus import Bus, Message, OutMessage, PublishError
from shared.consumer import DLQ_KEEP_BYTES, MAX_EVENT_BYTES, EventConsumer
from shared.events import Event, PromotionCancelled, PromotionEnded, default_registry, encode

from .conftest import TEST_BACKOFF, BusFactory

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)


def ended(promotion_id: str) -> bytes:
    return encode(PromotionEnded(promotion_id=promotion_id, ended_at=NOW), source="t", time=NOW)


def with_type(event_type: str) -> bytes:
    body = orjson.loads(ended("p-x"))
    body["type"] = event_type
    return orjson.dumps(body)


async def eventually(predicate: Callable[[], bool], what: str, within_s: float = 25.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        await asyncio.sleep(0.02)


class Counting:
    def __init__(self) -> None:
        self.dead: list[tuple[str, str]] = []

    def dlq(self, topic: str, reason: str) -> None:
        self.dead.append((topic, reason))


async def collect(bus: Bus, topic: str, group: str) -> list[Message]:
    seen: list[Message] = []

    async def keep(batch: Any) -> None:
        seen.extend(batch)

    consumer = bus.consumer(group, [topic], keep)
    await consumer.start()
    collect.consumers.append(consumer)  # type: ignore[attr-defined]
    return seen


collect.consumers = []  # type: ignore[attr-defined]


async def start_consumer(
    bus: Bus, topic: str, group: str, handler: Any, sink: Counting, max_attempts: int = 3
) -> None:
    runner = EventConsumer(
        service="test",
        group=group,
        bus=bus,
        registry=default_registry(),
        handlers={PromotionEnded: handler},
        topic_name=lambda _: topic,
        sink=sink,
        max_attempts=max_attempts,
        backoff=TEST_BACKOFF,
    )
    consumer = bus.consumer(group, runner.topics, runner)
    await consumer.start()
    collect.consumers.append(consumer)  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
async def _stop_consumers() -> Any:
    yield
    while collect.consumers:  # type: ignore[attr-defined]
        await collect.consumers.pop().stop()  # type: ignore[attr-defined]


async def watched_topic(
    bus: Bus, topic: str, unique: str
) -> tuple[str, list[str], Counting, list[Message]]:
    """A topic with a consumer recording the promotion ids it handled and a dlq reader."""
    await bus.ensure_topics([topic, f"{topic}.dlq"])
    handled: list[str] = []

    async def handle(event: Event[Any]) -> None:
        handled.append(event.data.promotion_id)

    sink = Counting()
    await start_consumer(bus, topic, f"g-{unique}", handle, sink)
    dead = await collect(bus, f"{topic}.dlq", f"dlq-reader-{unique}")
    return topic, handled, sink, dead


async def test_malformed_messages_go_to_the_dlq_and_the_consumer_goes_on(
    bus_factory: BusFactory, unique: str
) -> None:
    bus = await bus_factory()
    topic, handled, sink, dead = await watched_topic(bus, f"dlq-malformed-{unique}", unique)

    bad = {
        "not_json": b"{not json",
        "not_cloudevent": b'["a", "list"]',
        "invalid_envelope": orjson.dumps({**orjson.loads(ended("p-x")), "specversion": "0.3"}),
        "unknown_version": with_type("afterglow.promotion.ended.v99"),
        "unknown_type": with_type("afterglow.promotion.exploded.v1"),
        "invalid_data": orjson.dumps({**orjson.loads(ended("p-x")), "data": {"name": "x"}}),
        "too_large": b"{" + b" " * (MAX_EVENT_BYTES + 10) + b"}",
    }
    # All on one key: one partition, so the good message after them proves the consumer went on.
    await bus.publish([OutMessage(topic, "k", value) for value in bad.values()])
    await bus.publish([OutMessage(topic, "k", ended("p-good"))])

    await eventually(lambda: handled == ["p-good"], "the valid message after the bad ones")
    await eventually(lambda: len(dead) == len(bad), "every bad message on the dlq")
    reasons = [m.header("dlq.reason") for m in dead]
    assert reasons == [reason.encode() for reason in bad]
    for message in dead:
        assert message.header("dlq.topic") == topic.encode()
        assert message.header("dlq.offset") is not None
        assert message.header("dlq.detail")
    assert dead[0].value == bad["not_json"], "the original message is kept for inspection"
    assert dead[-1].header("dlq.truncated") == b"true"
    assert sorted(sink.dead) == sorted((topic, reason) for reason in bad)


FIVE_MB = 5 * 1024 * 1024


async def test_a_5_mb_message_is_refused_by_kafka_and_dead_lettered_in_process(
    bus_factory: BusFactory, unique: str
) -> None:
    """What the system does with a message far over the limit.

    Kafka never carries it: our publisher refuses it before sending (the producer's
    max_request_size, 1 MiB) with a PublishError naming the topic and the size, and a foreign
    producer configured for bigger requests is refused by the broker (message.max.bytes,
    1 MiB by default). The in-process bus has no limit, so there it reaches the consumer and
    is dead-lettered as `too_large`, truncated. Either way the next good message is handled.
    """
    bus = await bus_factory()
    topic, handled, sink, dead = await watched_topic(bus, f"dlq-huge-{unique}", unique)
    huge = b'{"padding": "' + b"x" * FIVE_MB + b'"}'

    if bus_factory.is_kafka:
        with pytest.raises(
            PublishError, match=rf"{topic}.*MessageSizeTooLarge.*larger than the maximum request"
        ):
            await bus.publish([OutMessage(topic, "k", huge)])
        from aiokafka import AIOKafkaProducer
        from aiokafka.errors import MessageSizeTooLargeError

        foreign = AIOKafkaProducer(
            bootstrap_servers=bus_factory.bootstrap, max_request_size=2 * FIVE_MB
        )
        await foreign.start()
        try:
            with pytest.raises(MessageSizeTooLargeError):
                await foreign.send_and_wait(topic, huge, key=b"k")
        finally:
            await foreign.stop()
    else:
        await bus.publish([OutMessage(topic, "k", huge)])
    await bus.publish([OutMessage(topic, "k", ended("p-after-huge"))])

    await eventually(lambda: handled == ["p-after-huge"], "the good message after the huge one")
    if bus_factory.is_kafka:
        assert sink.dead == [], "nothing reached the consumer, so nothing was dead-lettered"
        return
    await eventually(lambda: len(dead) == 1, "the huge message on the dlq")
    assert dead[0].header("dlq.reason") == b"too_large"
    assert str(len(huge)).encode() in (dead[0].header("dlq.detail") or b"")
    assert dead[0].header("dlq.truncated") == b"true"
    assert dead[0].value == huge[:DLQ_KEEP_BYTES], "the head is kept for inspection"
    assert sink.dead == [(topic, "too_large")]


async def test_a_handler_failing_for_good_is_dead_lettered_after_its_attempts(
    bus_factory: BusFactory, unique: str
) -> None:
    bus = await bus_factory()
    topic = f"dlq-failing-{unique}"
    await bus.ensure_topics([topic, f"{topic}.dlq"])
    attempts: dict[str, int] = {}

    async def handle(event: Event[Any]) -> None:
        pid = event.data.promotion_id
        attempts[pid] = attempts.get(pid, 0) + 1
        if pid == "p-poison":
            raise ValueError("this promotion cannot be handled")
        if pid == "p-flaky" and attempts[pid] < 6:
            raise ConnectionError("database unreachable")

    sink = Counting()
    await start_consumer(bus, topic, f"g-{unique}", handle, sink, max_attempts=3)
    dead = await collect(bus, f"{topic}.dlq", f"dlq-reader-{unique}")
    await bus.publish([OutMessage(topic, "k", ended(p)) for p in ("p-poison", "p-flaky", "p-ok")])

    await eventually(lambda: attempts.get("p-ok") == 1, "the message after the failing ones")
    await eventually(lambda: len(dead) == 1, "the poison message on the dlq")
    assert attempts["p-poison"] == 3
    assert attempts["p-flaky"] == 6, "a transient failure is retried past max_attempts"
    assert dead[0].header("dlq.reason") == b"handler_failed"
    assert b"ValueError" in (dead[0].header("dlq.detail") or b"")
    assert sink.dead == [(topic, "handler_failed")]


async def test_event_types_without_a_handler_pass_by(bus_factory: BusFactory, unique: str) -> None:
    bus = await bus_factory()
    topic = f"dlq-other-{unique}"
    await bus.ensure_topics([topic, f"{topic}.dlq"])
    handled: list[str] = []

    async def handle(event: Event[Any]) -> None:
        handled.append(event.data.promotion_id)

    sink = Counting()
    await start_consumer(bus, topic, f"g-{unique}", handle, sink)
    other = encode(PromotionCancelled(promotion_id="p-c", cancelled_at=NOW), source="t", time=NOW)
    await bus.publish([OutMessage(topic, "k", other), OutMessage(topic, "k", ended("p-after"))])
    await eventually(lambda: handled == ["p-after"], "the message after the unhandled type")
    assert sink.dead == []


async def test_a_batch_handler_gets_runs_of_one_type_and_a_poison_event_is_isolated(
    bus_factory: BusFactory, unique: str
) -> None:
    bus = await bus_factory()
    topic = f"dlq-batch-{unique}"
    await bus.ensure_topics([topic, f"{topic}.dlq"])
    calls: list[list[str]] = []
    handled: list[str] = []
    cancelled: list[str] = []

    async def handle_many(events: list[Event[Any]]) -> None:
        ids = [e.data.promotion_id for e in events]
        calls.append(ids)
        if "p-poison" in ids:
            raise ValueError("cannot handle p-poison")
        handled.extend(ids)

    async def handle_cancel(event: Event[Any]) -> None:
        cancelled.append(event.data.promotion_id)

    runner = EventConsumer(
        service="test",
        group=f"g-{unique}",
        bus=bus,
        registry=default_registry(),
        handlers={PromotionCancelled: handle_cancel},
        batch_handlers={PromotionEnded: handle_many},
        topic_name=lambda _: topic,
        max_attempts=2,
        backoff=TEST_BACKOFF,
    )
    dead = await collect(bus, f"{topic}.dlq", f"dlq-reader-{unique}")
    cancel = encode(PromotionCancelled(promotion_id="p-c", cancelled_at=NOW), source="t", time=NOW)
    await bus.publish(
        [OutMessage(topic, "k", ended(p)) for p in ("p-1", "p-2", "p-poison", "p-3")]
        + [OutMessage(topic, "k", cancel), OutMessage(topic, "k", ended("p-4"))]
    )
    consumer = bus.consumer(runner.group, runner.topics, runner)
    await consumer.start()
    collect.consumers.append(consumer)  # type: ignore[attr-defined]

    await eventually(lambda: "p-4" in handled, "the events after the poison one")
    await eventually(lambda: len(dead) == 1, "the poison event on the dlq")
    assert handled == ["p-1", "p-2", "p-3", "p-4"], "order kept, poison left out"
    assert cancelled == ["p-c"]
    assert ["p-1", "p-2", "p-poison", "p-3"] in calls, "consecutive events came as one batch"
    assert dead[0].header("dlq.reason") == b"handler_failed"
    assert orjson.loads(dead[0].value)["data"]["promotion_id"] == "p-poison"
