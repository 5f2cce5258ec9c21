"""The in-process bus: Kafka's contract inside one event loop, for the embedded mode and tests."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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


def partition_for(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


@dataclass
class _Partition:
    log: list[Message] = field(default_factory=list)
    # Futures of the workers (of every group) waiting for this partition to grow.
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def append(self, message: Message) -> None:
        self.log.append(message)
        if self.waiters:
            wake(self.waiters)
            self.waiters = []


def wake(waiters: Iterable[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


@dataclass
class _Group:
    name: str
    committed: dict[tuple[str, int], int] = field(default_factory=dict)
    members: list[InProcessConsumer] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class InProcessBus(Bus):
    def __init__(
        self,
        *,
        partitions: int = 4,
        observer: BusObserver | None = None,
        backoff: Backoff | None = None,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self.partitions = partitions
        self.drain_timeout_s = drain_timeout_s
        self.observer = observer or BusObserver()
        self.backoff = backoff or Backoff()
        self._topics: dict[str, list[_Partition]] = {}
        self._groups: dict[str, _Group] = {}
        self._running = False
        # Futures of `drained()` callers, resolved by the commit that empties the backlog.
        self._drained: list[asyncio.Future[None]] = []

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        for group in list(self._groups.values()):
            for member in list(group.members):
                await member.stop()
        self._running = False

    async def ping(self) -> bool:
        return self._running

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        for topic in topics:
            if topic not in self._topics:
                self._topics[topic] = [_Partition() for _ in range(self.partitions)]
                for group in self._groups.values():
                    await self._rebalance(group)

    def topics(self) -> list[str]:
        return sorted(self._topics)

    def messages(self, topic: str) -> list[Message]:
        """Everything ever published to a topic, partition by partition (for tests and reports)."""
        return [m for p in self._topics.get(topic, []) for m in p.log]

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        if not self._running:
            raise PublishError("the in-process bus is not running")
        unknown = sorted({m.topic for m in messages if m.topic not in self._topics})
        if unknown:
            raise PublishError(f"unknown topic(s): {', '.join(unknown)}")
        now_ms = int(time.time() * 1000)
        counts: dict[str, int] = {}
        for out in messages:
            partitions = self._topics[out.topic]
            index = partition_for(out.key, len(partitions))
            part = partitions[index]
            part.append(
                Message(
                    topic=out.topic,
                    partition=index,
                    offset=len(part.log),
                    key=out.key,
                    value=out.value,
                    headers=out.headers,
                    timestamp_ms=now_ms,
                )
            )
            counts[out.topic] = counts.get(out.topic, 0) + 1
        for topic, count in counts.items():
            self.observer.produced(topic, count)
        # Let consumers run, as a network round trip would.
        await asyncio.sleep(0)

    def consumer(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        max_batch: int = 500,
    ) -> Consumer:
        return InProcessConsumer(self, group, list(topics), handler, max_batch)

    # -- group membership -------------------------------------------------

    async def _join(self, member: InProcessConsumer) -> None:
        group = self._groups.setdefault(member.group, _Group(member.group))
        group.members.append(member)
        await self._rebalance(group)

    async def _leave(self, member: InProcessConsumer) -> None:
        group = self._groups.get(member.group)
        if group is None or member not in group.members:
            return
        group.members.remove(member)
        try:
            await member._revoke_all()
        finally:
            await self._rebalance(group)

    async def _rebalance(self, group: _Group) -> None:
        async with group.lock:
            wanted: dict[InProcessConsumer, set[tuple[str, int]]] = {
                m: set() for m in group.members
            }
            topics = sorted({t for m in group.members for t in m.topics})
            for topic in topics:
                subscribers = [m for m in group.members if topic in m.topics]
                for index in range(len(self._topics.get(topic, []))):
                    wanted[subscribers[index % len(subscribers)]].add((topic, index))
            # Like Kafka's eager protocol: every revoked partition is committed
            # and released before anyone is handed a new one.
            await asyncio.gather(*(m._revoke(wanted[m]) for m in wanted))
            for member, partitions in wanted.items():
                member._assign(partitions)

    def backlog(self) -> int:
        """Messages not yet committed by the groups that read their topics (0: all handled)."""
        total = 0
        for group in self._groups.values():
            for topic in {t for member in group.members for t in member.topics}:
                for index, part in enumerate(self._topics.get(topic, ())):
                    total += len(part.log) - group.committed.get((topic, index), 0)
        return total

    async def drained(self) -> None:
        """Until every group has committed everything published to its topics (backlog 0):
        woken by the commit that empties the backlog, no polling."""
        while self.backlog():
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            try:
                await waiter
            finally:
                waiter.cancel()

    def _committed(self, group: str, tp: tuple[str, int]) -> int:
        return self._groups[group].committed.get(tp, 0)

    def _commit(self, group: str, tp: tuple[str, int], offset: int) -> None:
        self._groups[group].committed[tp] = offset
        if self._drained and not self.backlog():
            wake(self._drained)
            self._drained = []


class InProcessConsumer(Consumer):
    def __init__(
        self,
        bus: InProcessBus,
        group: str,
        topics: list[str],
        handler: BatchHandler,
        max_batch: int,
    ) -> None:
        self.bus = bus
        self.group = group
        self.topics = topics
        self.handler = handler
        self.max_batch = max_batch
        self.stats = ConsumerStats()
        self._workers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._revoking: set[tuple[str, int]] = set()
        # The future an idle worker waits on: resolved by an append or by its revocation.
        self._idle: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        missing = [t for t in self.topics if t not in self.bus._topics]
        if missing:
            raise ValueError(f"unknown topic(s): {', '.join(missing)}")
        self._started = True
        await self.bus._join(self)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        await self.bus._leave(self)

    async def _revoke_all(self) -> None:
        await self._revoke(set())
        self.stats.assigned = set()

    async def _revoke(self, keep: set[tuple[str, int]]) -> None:
        """Let the workers of partitions not in `keep` finish their batch, commit and exit."""
        leaving = [tp for tp in self._workers if tp not in keep]
        self._revoking.update(leaving)
        wake(self._idle[tp] for tp in leaving if tp in self._idle)
        tasks = [self._workers[tp] for tp in leaving]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=self.bus.drain_timeout_s)
        for task in pending:
            # Not committed: the batch goes to the partition's next owner.
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _assign(self, partitions: set[tuple[str, int]]) -> None:
        for tp in partitions - set(self._workers):
            self._revoking.discard(tp)
            self._workers[tp] = asyncio.create_task(self._run(tp), name=f"{self.group}:{tp}")
        self.stats.assigned = set(partitions)

    async def _run(self, tp: tuple[str, int]) -> None:
        topic, index = tp
        part = self.bus._topics[topic][index]
        try:
            while tp not in self._revoking:
                offset = self.bus._committed(self.group, tp)
                if offset >= len(part.log):
                    # Checked and registered without an await in between: no wake-up is lost.
                    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    part.waiters.append(waiter)
                    self._idle[tp] = waiter
                    try:
                        await waiter
                    finally:
                        del self._idle[tp]
                        waiter.cancel()
                    continue
                batch = part.log[offset : offset + self.max_batch]
                await self._deliver(tp, batch)
                if tp in self._revoking and self.bus._committed(self.group, tp) == offset:
                    break
        finally:
            self._revoking.discard(tp)
            if self._workers.get(tp) is asyncio.current_task():
                del self._workers[tp]

    async def _deliver(self, tp: tuple[str, int], batch: list[Message]) -> None:
        topic, index = tp
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                await self.handler(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                attempt += 1
                self.stats.redeliveries += 1
                self.bus.observer.handler_failed(topic, self.group)
                log.warning(
                    "handler failed; batch will be delivered again",
                    extra={"topic": topic, "partition": index, "attempt": attempt},
                    exc_info=True,
                )
                if tp in self._revoking:
                    return
                await asyncio.sleep(self.bus.backoff.delay(attempt))
                continue
            self.bus.observer.handler_seconds(topic, self.group, time.perf_counter() - started)
            next_offset = batch[-1].offset + 1
            self.bus._commit(self.group, tp, next_offset)
            self.stats.batches += 1
            self.stats.messages += len(batch)
            self.bus.observer.consumed(topic, self.group, len(batch))
            log_end = len(self.bus._topics[topic][index].log)
            self.bus.observer.lag(topic, self.group, index, log_end - next_offset)
            return
