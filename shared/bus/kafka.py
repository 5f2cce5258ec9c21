"""The Kafka bus: the port of `shared.bus.base` on aiokafka.

Publishing uses one idempotent producer (`acks=all`), so a retried send never
duplicates or reorders a partition's messages; every await is bounded, and a
publish that is not acknowledged in `send_timeout_s` raises `PublishError`. A publish
fills record batches per partition itself (the partition `send` would choose: murmur2 of
the key, computed by the `murmurhash2` extension, which gives aiokafka's pure-Python
`murmur2` bit for bit at a twentieth of its cost) and hands each to the producer whole: a
future per batch, not per message.

Consuming, per consumer:

- One poll task calls `getmany` for the partitions that have no batch in hand
  and are not backing off, and hands each partition's batch to a worker task.
  Partitions therefore run concurrently, a partition never has two batches in
  hand (so its order holds), and the poll task keeps calling `getmany` while
  handlers run, so aiokafka never leaves the group for `max_poll_interval_ms`.
- A worker calls the handler, then commits exactly `last offset + 1` of its
  partition and ends only when that commit completed (a group commit: workers
  finishing while a commit is in flight share the next request). If the
  handler raises, nothing is committed, the partition is rewound to the first
  offset of the batch and is not polled until its back-off is over: the same
  messages are delivered again, nothing is skipped.
- Rebalance (aiokafka's eager protocol revokes every partition): aiokafka
  returns no records while a reassignment is in progress, and the poll task
  hands the records of a `getmany` to workers without awaiting in between, so
  the revoke callback sees every batch in hand. It waits for those workers
  (bounded by `drain_timeout_s`, then cancels them): when it returns, no
  handler of a revoked partition is running and all finished work is
  committed, before the group hands the partition to anybody else. A commit
  refused because the group moved on is logged and ignored; the new owner
  starts from the last committed offset (at-least-once).

Message values hold personal data: they are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerStoppedError,
)
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, for_code
from murmurhash2 import murmurhash2

from shared.bus.base import (
    Backoff,
    BatchHandler,
    Bus,
    BusObserver,
    Consumer,
    ConsumerStats,
    Message,
    OutMessage,
    PublishError,
)

log = logging.getLogger(__name__)

TOPIC_ALREADY_EXISTS = 36
UNKNOWN_TOPIC_OR_PARTITION = 3

_PING_TIMEOUT_S = 2.0
_CLOSE_TIMEOUT_S = 5.0
_MAX_BATCH_BYTES = 256 * 1024
_HEARTBEAT_INTERVAL_MS = 1000
_SESSION_TIMEOUT_MS = 10_000
# How long getmany waits for records: short while a worker may finish any moment (its
# partition is then polled again), longer when nothing is in hand.
_BUSY_POLL_S = 0.02
_IDLE_POLL_S = 0.5
# Poll at least this often even while every partition is busy or backing off, well within
# aiokafka's max_poll_interval_ms (300 s): a long handler must not cost the group membership.
_KEEPALIVE_S = 30.0
_POLL_ERROR_PAUSE_S = 1.0
# The seed of Kafka's default partitioner (Java's Utils.murmur2, aiokafka's murmur2).
KAFKA_MURMUR2_SEED = 0x9747B28C
# Read only, by the record builder: shared by every message without headers.
_NO_HEADERS: list[tuple[str, bytes]] = []


class KafkaUnavailableError(ConnectionError):
    """Kafka did not answer in time: the bus or a consumer could not start."""


class TopicSetupError(RuntimeError):
    """`ensure_topics` could not create a topic, or it did not become ready in time."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    name, text = type(exc).__name__, str(exc).strip()
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


async def _bounded(what: str, awaitable: Awaitable[object], timeout_s: float) -> None:
    """Await a close/stop call, logging instead of raising: used on the way out."""
    try:
        async with asyncio.timeout(timeout_s):
            await awaitable
    except Exception as exc:
        log.warning("closing a Kafka client failed", extra={"what": what, "error": _describe(exc)})


def partition_index(key: bytes, partitions: int) -> int:
    """The index, among a topic's sorted partitions, that Kafka's default partitioner (Java's,
    and aiokafka's `send`) picks for `key`: positive murmur2 modulo the partition count."""
    return (murmurhash2(key, KAFKA_MURMUR2_SEED) & 0x7FFFFFFF) % partitions


def _to_messages(records: Sequence[Any]) -> list[Message]:
    """One partition's records (as `getmany` returns them) as messages. Runs per message, so
    the topic and partition are read once per batch and empty headers cost nothing; aiokafka's
    records hold `bytes` and `int` already (header values may be None)."""
    if not records:
        return []
    topic, partition = str(records[0].topic), int(records[0].partition)
    messages: list[Message] = []
    append = messages.append
    for record in records:
        key: bytes | None = record.key
        value: bytes | None = record.value
        headers = record.headers
        append(
            Message(
                topic,
                partition,
                record.offset,
                key.decode("utf-8", "replace") if key is not None else None,
                value if value is not None else b"",
                tuple((name, data if data is not None else b"") for name, data in headers)
                if headers
                else (),
                record.timestamp,
            )
        )
    return messages


class KafkaBus(Bus):
    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str,
        partitions: int = 4,
        linger_ms: int = 5,
        send_timeout_s: float = 10.0,
        observer: BusObserver | None = None,
        backoff: Backoff | None = None,
        replication_factor: int = 1,
        start_timeout_s: float = 15.0,
        drain_timeout_s: float = 10.0,
    ) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        if send_timeout_s <= 0 or start_timeout_s <= 0 or drain_timeout_s < 0:
            raise ValueError("timeouts must be positive")
        self.bootstrap_servers = bootstrap_servers
        self.client_id = client_id
        self.partitions = partitions
        self.linger_ms = linger_ms
        self.send_timeout_s = send_timeout_s
        self.observer = observer or BusObserver()
        self.backoff = backoff or Backoff()
        self.replication_factor = replication_factor
        # Bounds connecting, joining a group and creating topics.
        self.start_timeout_s = start_timeout_s
        # How long a batch in hand may take to finish when a consumer stops or loses it.
        self.drain_timeout_s = drain_timeout_s
        self._producer: Any = None
        self._admin: Any = None
        self._consumers: set[KafkaConsumer] = set()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=self.linger_ms,
            max_batch_size=_MAX_BATCH_BYTES,
            request_timeout_ms=max(1000, int(min(self.send_timeout_s, 30.0) * 1000)),
        )
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.client_id}-admin",
            request_timeout_ms=max(1000, int(self.start_timeout_s * 1000)),
        )
        try:
            async with asyncio.timeout(self.start_timeout_s):
                await producer.start()
                await admin.start()
        except Exception as exc:
            await _bounded("producer", producer.stop(), _CLOSE_TIMEOUT_S)
            await _bounded("admin", admin.close(), _CLOSE_TIMEOUT_S)
            raise KafkaUnavailableError(
                f"Kafka at {self.bootstrap_servers} did not answer within "
                f"{self.start_timeout_s:g} s ({_describe(exc)})"
            ) from exc
        self._producer = producer
        self._admin = admin
        log.info(
            "kafka bus started",
            extra={"bootstrap_servers": self.bootstrap_servers, "client_id": self.client_id},
        )

    async def stop(self) -> None:
        consumers = list(self._consumers)
        if consumers:
            await asyncio.gather(*(c.stop() for c in consumers), return_exceptions=True)
        producer, admin = self._producer, self._admin
        self._producer = self._admin = None
        if producer is not None:
            # Flushes what is still buffered; bounded, as the broker may be gone.
            await _bounded("producer", producer.stop(), max(_CLOSE_TIMEOUT_S, self.send_timeout_s))
        if admin is not None:
            await _bounded("admin", admin.close(), _CLOSE_TIMEOUT_S)

    async def ping(self) -> bool:
        admin = self._admin
        if admin is None:
            return False
        try:
            async with asyncio.timeout(_PING_TIMEOUT_S):
                await admin.describe_cluster()
        except Exception as exc:
            log.debug("kafka ping failed", extra={"error": _describe(exc)})
            return False
        return True

    def _require_admin(self) -> Any:
        if self._admin is None:
            raise RuntimeError("the Kafka bus is not started (call KafkaBus.start() first)")
        return self._admin

    # -- topics ------------------------------------------------------------

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        names = list(dict.fromkeys(topics))
        if not names:
            return
        admin = self._require_admin()
        try:
            async with asyncio.timeout(self.start_timeout_s):
                response = await admin.create_topics(
                    [NewTopic(name, self.partitions, self.replication_factor) for name in names],
                    timeout_ms=max(1000, int(self.start_timeout_s * 1000)),
                )
                problems = []
                for entry in response.topic_errors:
                    topic, code = str(entry[0]), int(entry[1])
                    if code in (0, TOPIC_ALREADY_EXISTS):
                        continue
                    detail = entry[2] if len(entry) > 2 and entry[2] else for_code(code).__name__
                    problems.append(f"{topic!r}: error {code} ({detail})")
                if problems:
                    raise TopicSetupError("could not create topic(s): " + "; ".join(problems))
                await self._wait_for_topics(admin, names)
        except TimeoutError as exc:
            raise TopicSetupError(
                f"topic(s) {', '.join(names)} not ready within {self.start_timeout_s:g} s"
            ) from exc
        except KafkaError as exc:
            raise TopicSetupError(
                f"could not create topic(s) {', '.join(names)}: {_describe(exc)}"
            ) from exc

    async def _wait_for_topics(self, admin: Any, names: list[str]) -> None:
        """Until the metadata shows every topic with a leader for every partition."""
        warned: set[str] = set()
        while True:
            waiting = []
            for entry in await admin.describe_topics(names):
                topic = str(entry["topic"])
                partitions = entry["partitions"]
                if entry["error_code"] != 0 or not partitions:
                    waiting.append(topic)
                    continue
                if any(p["error_code"] != 0 or p["leader"] < 0 for p in partitions):
                    waiting.append(topic)
                    continue
                if len(partitions) != self.partitions and topic not in warned:
                    warned.add(topic)
                    log.warning(
                        "topic exists with another partition count",
                        extra={
                            "topic": topic,
                            "partitions": len(partitions),
                            "configured": self.partitions,
                        },
                    )
            if not waiting:
                return
            await asyncio.sleep(0.1)

    async def _missing_topics(self, topics: Sequence[str]) -> list[str]:
        admin = self._require_admin()
        async with asyncio.timeout(self.start_timeout_s):
            described = await admin.describe_topics(list(topics))
        return sorted(
            str(e["topic"]) for e in described if e["error_code"] == UNKNOWN_TOPIC_OR_PARTITION
        )

    # -- publishing --------------------------------------------------------

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        if not messages:
            return
        producer = self._producer
        if producer is None:
            raise PublishError(
                f"the Kafka bus is not started; nothing published to {_topic_list(messages)}"
            )
        sent: list[tuple[str, asyncio.Future[Any]]] = []
        batches: dict[tuple[str, int], list[Any]] | None = None
        handed: set[tuple[str, int]] = set()
        current = messages[0].topic
        try:
            async with asyncio.timeout(self.send_timeout_s):
                batches = await self._batches(producer, messages)
                # Round robin: a partition's next batch waits until its previous one left, so
                # the first batch of every partition goes out in one round, and so on.
                for rank in range(max(len(b) for b in batches.values())):
                    for (topic, partition), builders in batches.items():
                        if rank < len(builders):
                            current = topic
                            builder = builders[rank]
                            future = await producer.send_batch(builder, topic, partition=partition)
                            sent.append((topic, future))
                        if rank == len(builders) - 1:
                            handed.add((topic, partition))
                results = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        except TimeoutError as exc:
            if batches is None:
                unacked = {m.topic for m in messages}
            else:
                unacked = {
                    topic for topic, partition in batches if (topic, partition) not in handed
                }
            unacked.update(topic for topic, f in sent if not f.done() or f.cancelled())
            raise PublishError(
                f"publish to {_topic_list(unacked or messages)} not acknowledged within "
                f"{self.send_timeout_s:g} s{self._hint(producer, unacked)}"
            ) from exc
        except Exception as exc:
            raise PublishError(f"publish to topic {current!r} failed: {_describe(exc)}") from exc
        for (topic, _), result in zip(sent, results, strict=True):
            if isinstance(result, BaseException):
                raise PublishError(
                    f"publish to topic {topic!r} failed: {_describe(result)}"
                ) from result
        counts: dict[str, int] = {}
        for out in messages:
            counts[out.topic] = counts.get(out.topic, 0) + 1
        for topic, count in counts.items():
            self.observer.produced(topic, count)

    @staticmethod
    async def _batches(
        producer: Any, messages: Sequence[OutMessage]
    ) -> dict[tuple[str, int], list[Any]]:
        """The messages in record batches per partition, in order, partitioned as `send` does
        (murmur2 of the key): one future per batch instead of one send per message."""
        batches: dict[tuple[str, int], list[Any]] = {}
        # Per topic: its partition ids (sorted, as `send` indexes them) and the batch being
        # filled for each; the topic of the previous message is kept at hand, as a publish
        # rarely mixes topics. The hash is `partition_index`, inlined: it runs per message.
        topics: dict[str, tuple[list[int], list[Any]]] = {}
        last_topic: str | None = None
        known: list[int] = []
        filling: list[Any] = []
        count = 0
        stamp = int(time.time() * 1000)
        for out in messages:
            topic = out.topic
            if topic != last_topic:
                entry = topics.get(topic)
                if entry is None:
                    ids = sorted(await producer.partitions_for(topic))
                    entry = topics[topic] = (ids, [None] * len(ids))
                known, filling = entry
                count = len(known)
                last_topic = topic
            key = out.key.encode()
            value = out.value
            headers = list(out.headers) if out.headers else _NO_HEADERS
            if len(value) > _MAX_BATCH_BYTES:
                # aiokafka's own check: past max_request_size, MessageSizeTooLargeError.
                producer._serialize(key, value, headers)
            index = (murmurhash2(key, KAFKA_MURMUR2_SEED) & 0x7FFFFFFF) % count
            builder = filling[index]
            if builder is None:
                builder = filling[index] = producer.create_batch()
                batches[(topic, known[index])] = [builder]
            if builder.append(timestamp=stamp, key=key, value=value, headers=headers) is None:
                # Full: closed, so sent at once; a batch takes its first message whatever its size.
                builder = filling[index] = producer.create_batch()
                batches[(topic, known[index])].append(builder)
                builder.append(timestamp=stamp, key=key, value=value, headers=headers)
        for builders in batches.values():
            builders[-1].close()
        return batches

    @staticmethod
    def _hint(producer: Any, topics: set[str]) -> str:
        try:
            known = set(producer.client.cluster.topics())
        except Exception:
            return ""
        unknown = sorted(t for t in topics if t not in known)
        if unknown:
            return f" (unknown to the cluster: {', '.join(unknown)}; not created, or broker down)"
        return ""

    # -- consuming ---------------------------------------------------------

    def consumer(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        max_batch: int = 500,
    ) -> Consumer:
        return KafkaConsumer(self, group, list(topics), handler, max_batch)


def _tp_names(partitions: Iterable[Any]) -> list[str]:
    return sorted(f"{tp.topic}:{tp.partition}" for tp in partitions)


def _topic_list(items: Iterable[OutMessage] | Iterable[str]) -> str:
    names = sorted({i if isinstance(i, str) else i.topic for i in items})
    return ", ".join(repr(n) for n in names)


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: KafkaConsumer) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        await self._owner._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        self._owner._on_assigned(set(assigned))


class KafkaConsumer(Consumer):
    def __init__(
        self,
        bus: KafkaBus,
        group: str,
        topics: list[str],
        handler: BatchHandler,
        max_batch: int,
    ) -> None:
        if not topics:
            raise ValueError("a consumer needs at least one topic")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.bus = bus
        self.group = group
        self.topics = topics
        self.handler = handler
        self.max_batch = max_batch
        self.stats = ConsumerStats()
        self._consumer: Any = None
        self._poller: asyncio.Task[None] | None = None
        # The batch in hand of each busy partition (at most one per partition).
        self._workers: dict[Any, asyncio.Task[None]] = {}
        # Failed attempts in a row, and when a backing-off partition may be polled again.
        self._attempts: dict[Any, int] = {}
        self._retry_at: dict[Any, float] = {}
        # Offsets of finished batches waiting for the next commit request (see _commit).
        self._pending: dict[Any, int] = {}
        self._commit_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_poll = time.monotonic()

    def _extra(self, tp: Any = None, **more: object) -> dict[str, object]:
        extra: dict[str, object] = {"group": self.group}
        if tp is not None:
            extra["topic"] = tp.topic
            extra["partition"] = tp.partition
        extra.update(more)
        return extra

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if self._consumer is not None:
            return
        try:
            missing = await self.bus._missing_topics(self.topics)
        except (KafkaError, TimeoutError) as exc:
            raise KafkaUnavailableError(
                f"Kafka at {self.bus.bootstrap_servers} did not describe topics "
                f"{', '.join(self.topics)} ({_describe(exc)})"
            ) from exc
        if missing:
            raise ValueError(f"unknown topic(s): {', '.join(missing)}")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bus.bootstrap_servers,
            client_id=self.bus.client_id,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_batch,
            partition_assignment_strategy=(RoundRobinPartitionAssignor,),
            heartbeat_interval_ms=_HEARTBEAT_INTERVAL_MS,
            session_timeout_ms=_SESSION_TIMEOUT_MS,
            # The group waits this long for members to rejoin; ours first drain their batches.
            rebalance_timeout_ms=int((self.bus.drain_timeout_s + 10.0) * 1000),
            request_timeout_ms=max(
                _SESSION_TIMEOUT_MS + 5000, int(self.bus.start_timeout_s * 1000)
            ),
        )
        consumer.subscribe(self.topics, listener=_RebalanceListener(self))
        self._stopping = False
        try:
            async with asyncio.timeout(self.bus.start_timeout_s):
                # Joins the group and waits for the first assignment.
                await consumer.start()
        except Exception as exc:
            await _bounded("consumer", consumer.stop(), _CLOSE_TIMEOUT_S)
            raise KafkaUnavailableError(
                f"consumer group {self.group!r} could not join Kafka at "
                f"{self.bus.bootstrap_servers} within {self.bus.start_timeout_s:g} s "
                f"({_describe(exc)})"
            ) from exc
        self._consumer = consumer
        self._last_poll = time.monotonic()
        self._poller = asyncio.create_task(self._poll_loop(), name=f"kafka-poll:{self.group}")
        self.bus._consumers.add(self)
        log.info("kafka consumer started", extra=self._extra(topics=list(self.topics)))

    async def stop(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + self.bus.drain_timeout_s
        try:
            poller = self._poller
            if poller is not None:
                # It leaves at its next check; getmany may wait for a rebalance, so bounded.
                done, _ = await asyncio.wait({poller}, timeout=2 * _IDLE_POLL_S)
                if not done:
                    poller.cancel()
                    await asyncio.wait({poller}, timeout=1.0)
            workers = list(self._workers.values())
            if workers:
                remaining = max(0.0, deadline - time.monotonic())
                _, pending = await asyncio.wait(workers, timeout=remaining)
                if pending:
                    log.warning(
                        "batches still in hand after the drain timeout: cancelled, not committed",
                        extra=self._extra(batches=len(pending)),
                    )
                    for task in pending:
                        task.cancel()
                    await asyncio.wait(pending, timeout=1.0)
        finally:
            self._consumer = None
            self._poller = None
            self.bus._consumers.discard(self)
            # Leaves the group, so the partitions move to the other members at once.
            await _bounded("consumer", consumer.stop(), _CLOSE_TIMEOUT_S)
            self.stats.assigned = set()
            log.info("kafka consumer stopped", extra=self._extra())

    # -- rebalance ---------------------------------------------------------

    async def _on_revoked(self, revoked: set[Any]) -> None:
        # See the module docstring: every batch of a revoked partition that getmany returned
        # is a worker in self._workers by now, and getmany returns nothing more until the new
        # assignment. Waiting for those workers means each batch is either finished and
        # committed (the member still belongs to the old generation, so the commit is
        # accepted) or, after the drain timeout, cancelled and left uncommitted for the next
        # owner. Either way no handler of a revoked partition runs once we return.
        tasks = [task for tp, task in self._workers.items() if tp in revoked]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.bus.drain_timeout_s)
            if pending:
                log.warning(
                    "handlers of revoked partitions did not finish in time: cancelled",
                    extra=self._extra(batches=len(pending)),
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        for tp in revoked:
            self._attempts.pop(tp, None)
            self._retry_at.pop(tp, None)
            self._pending.pop(tp, None)
        self.stats.assigned -= {(tp.topic, tp.partition) for tp in revoked}
        if revoked:
            log.info("partitions revoked", extra=self._extra(partitions=len(revoked)))

    def _on_assigned(self, assigned: set[Any]) -> None:
        for state in (self._attempts, self._retry_at):
            for tp in [tp for tp in state if tp not in assigned]:
                del state[tp]
        self.stats.assigned = {(tp.topic, tp.partition) for tp in assigned}
        log.info("partitions assigned", extra=self._extra(partitions=_tp_names(assigned)))

    # -- polling -----------------------------------------------------------

    async def _poll_loop(self) -> None:
        try:
            await self._poll(self._consumer)
        except Exception:
            # A bug, not a Kafka error (those are retried below): say so loudly. Nothing is
            # lost, since nothing uncommitted is ever skipped, but this consumer stands still.
            log.exception(
                "the consumer's poll loop failed; it consumes no more", extra=self._extra()
            )

    async def _poll(self, consumer: Any) -> None:
        while not self._stopping:
            # Cleared before looking at the state, so a worker finishing from here on wakes us.
            self._wake.clear()
            now = time.monotonic()
            for tp in [tp for tp, due in self._retry_at.items() if due <= now]:
                del self._retry_at[tp]
            ready = [
                tp
                for tp in consumer.assignment()
                if tp not in self._workers and tp not in self._retry_at
            ]
            timeout = _BUSY_POLL_S if self._workers else _IDLE_POLL_S
            if self._retry_at:
                timeout = max(0.0, min(timeout, min(self._retry_at.values()) - now))
            if not ready:
                if now - self._last_poll >= _KEEPALIVE_S:
                    await self._keepalive(consumer)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(timeout, 0.001)):
                        await self._wake.wait()
                continue
            try:
                batches = await consumer.getmany(
                    *ready, timeout_ms=int(timeout * 1000), max_records=self.max_batch
                )
            except ConsumerStoppedError:
                return
            except Exception as exc:
                log.warning("polling Kafka failed", extra=self._extra(error=_describe(exc)))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL_ERROR_PAUSE_S):
                        await self._wake.wait()
                continue
            self._last_poll = time.monotonic()
            if self._stopping:
                return  # not handed out, not committed: fetched again by the next owner
            # No await from getmany to here: see _on_revoked.
            for tp, records in batches.items():
                if records:
                    self._workers[tp] = asyncio.create_task(
                        self._work(tp, records), name=f"kafka-batch:{self.group}:{tp}"
                    )

    async def _keepalive(self, consumer: Any) -> None:
        """Poll with every partition paused: proves liveness while all partitions are busy."""
        assigned = consumer.assignment()
        try:
            consumer.pause(*assigned)
            try:
                await consumer.getmany(timeout_ms=0)
            finally:
                current = consumer.assignment()
                consumer.resume(*[tp for tp in assigned if tp in current])
        except ConsumerStoppedError:
            return
        except Exception as exc:
            log.warning("keep-alive poll failed", extra=self._extra(error=_describe(exc)))
        self._last_poll = time.monotonic()

    # -- one batch ---------------------------------------------------------

    async def _work(self, tp: Any, records: list[Any]) -> None:
        first_offset = int(records[0].offset)
        settled = False
        try:
            settled = await self._deliver(tp, records)
        except Exception:
            log.exception("unexpected error while delivering a batch", extra=self._extra(tp))
        finally:
            if not settled:
                # Not committed and not rewound yet (cancelled, or a bug): rewind, so the
                # next batch of this partition cannot commit past these messages.
                self._rewind(tp, first_offset)
                if not self._stopping:
                    attempt = self._attempts.get(tp, 0) + 1
                    self._attempts[tp] = attempt
                    self._retry_at[tp] = time.monotonic() + self.bus.backoff.delay(attempt)
            if self._workers.get(tp) is asyncio.current_task():
                del self._workers[tp]
            self._wake.set()

    def _rewind(self, tp: Any, offset: int) -> bool:
        consumer = self._consumer
        if consumer is None or tp not in consumer.assignment():
            return False  # the next owner starts from the committed offset anyway
        try:
            consumer.seek(tp, offset)
        except (IllegalStateError, ValueError, AssertionError) as exc:
            log.warning("could not rewind a partition", extra=self._extra(tp, error=str(exc)))
            return False
        return True

    async def _deliver(self, tp: Any, records: list[Any]) -> bool:
        """Hand one partition's batch to the handler; True once it is committed or rewound."""
        messages = _to_messages(records)
        topic = messages[0].topic
        observer = self.bus.observer
        started = time.perf_counter()
        try:
            await self.handler(messages)
        except Exception:
            attempt = self._attempts.get(tp, 0) + 1
            self._attempts[tp] = attempt
            self.stats.redeliveries += 1
            observer.handler_failed(topic, self.group)
            delay = self.bus.backoff.delay(attempt)
            log.warning(
                "handler failed; the batch will be delivered again",
                extra=self._extra(tp, offset=messages[0].offset, attempt=attempt, retry_in_s=delay),
                exc_info=True,
            )
            self._rewind(tp, messages[0].offset)
            self._retry_at[tp] = time.monotonic() + delay
            return True
        self._attempts.pop(tp, None)
        next_offset = messages[-1].offset + 1
        await self._commit(tp, next_offset)
        observer.handler_seconds(topic, self.group, time.perf_counter() - started)
        self.stats.batches += 1
        self.stats.messages += len(messages)
        observer.consumed(topic, self.group, len(messages))
        self._report_lag(tp, next_offset)
        return True

    async def _commit(self, tp: Any, offset: int) -> None:
        """Commit `offset` for `tp`; returns once a commit request carrying it has completed.

        A group commit: partitions whose handlers return while a commit is in flight are
        committed together by the next request, one round trip for all of them.
        """
        self._pending[tp] = offset
        async with self._commit_lock:
            if tp not in self._pending:
                return  # carried by the request that just completed
            offsets, self._pending = self._pending, {}
            await self._send_commit(offsets)

    async def _send_commit(self, offsets: dict[Any, int]) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        assigned = consumer.assignment()
        lost = [tp for tp in offsets if tp not in assigned]
        for tp in lost:
            # Revoked meanwhile (only after a drain timeout): the next owner delivers again.
            log.warning("commit dropped: partition no longer assigned", extra=self._extra(tp))
            del offsets[tp]
        if not offsets:
            return
        try:
            async with asyncio.timeout(self.bus.send_timeout_s):
                await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning(
                "commit refused after a rebalance; the partitions' next owners deliver again",
                extra=self._extra(partitions=_tp_names(offsets), error=_describe(exc)),
            )
        except (KafkaError, TimeoutError) as exc:
            # The positions moved on, so the next commit of each partition covers these
            # batches; until then a restart delivers them again (at-least-once).
            log.warning(
                "commit failed",
                extra=self._extra(partitions=_tp_names(offsets), error=_describe(exc)),
            )

    def _report_lag(self, tp: Any, committed: int) -> None:
        consumer = self._consumer
        if consumer is None or tp not in consumer.assignment():
            return
        highwater = consumer.highwater(tp)
        if highwater is not None:
            self.bus.observer.lag(
                tp.topic, self.group, tp.partition, max(0, int(highwater) - committed)
            )
