"""The bus port: what every transport (Kafka, in-process) promises.

- Messages with the same key land on the same partition and are handed to the
  handler in the order they were published.
- A handler receives a batch of messages from one partition. The position is
  committed only after the handler returned; if it raises, the same messages
  are delivered again after a back-off, so nothing is skipped.
- Consumers in one group share the partitions; a consumer that stops (or
  crashes) leaves its uncommitted messages to the next owner.
- `publish` either returns after the broker acknowledged every message or
  raises `PublishError` within the configured timeout; it never waits forever.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

Headers = tuple[tuple[str, bytes], ...]


class PublishError(RuntimeError):
    """Publishing did not complete; the caller must keep the messages and try again."""


@dataclass(frozen=True, slots=True)
class OutMessage:
    topic: str
    key: str
    value: bytes
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: Headers = ()
    timestamp_ms: int = 0

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


BatchHandler = Callable[[Sequence[Message]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before a failed batch is delivered again: doubling, capped."""

    initial_s: float = 0.05
    maximum_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return float(min(self.maximum_s, self.initial_s * (2 ** max(0, attempt - 1))))


@dataclass(slots=True)
class ConsumerStats:
    """What a consumer did, for tests and /readyz: batches, messages and redeliveries."""

    batches: int = 0
    messages: int = 0
    redeliveries: int = 0
    assigned: set[tuple[str, int]] = field(default_factory=set)


class Consumer(abc.ABC):
    stats: ConsumerStats

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None:
        """Finish the batch in hand, commit it, and leave the group.

        Bounded: a batch that does not finish within the drain timeout is
        cancelled, not committed, and goes to the partition's next owner.
        """


class Bus(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create the topics that do not exist yet, with the configured partition count."""

    @abc.abstractmethod
    async def publish(self, messages: Sequence[OutMessage]) -> None:
        """Publish all messages, acknowledged, or raise PublishError."""

    @abc.abstractmethod
    def consumer(
        self,
        group: str,
        topics: Sequence[str],
        handler: BatchHandler,
        *,
        max_batch: int = 500,
    ) -> Consumer: ...

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the transport answers now (for /readyz)."""


class BusObserver:
    """Hooks a transport calls so that metrics stay out of the transport code. No-op here."""

    def produced(self, topic: str, count: int) -> None:
        return None

    def consumed(self, topic: str, group: str, count: int) -> None:
        return None

    def handler_failed(self, topic: str, group: str) -> None:
        return None

    def handler_seconds(self, topic: str, group: str, seconds: float) -> None:
        return None

    def lag(self, topic: str, group: str, partition: int, lag: int) -> None:
        return None
