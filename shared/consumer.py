"""From bus messages to typed event handlers, with the dead-letter policy.

A message that cannot become a known event goes to `<topic>.dlq` at once,
with the reason in its headers, and the consumer goes on. A handler that
raises is retried in place: forever while the cause is transient (database
or broker unreachable, so a restart delays work and never drops it), and up
to `max_attempts` otherwise, after which the message is dead-lettered too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import exc as sa_exc

from shared.bus import Backoff, Bus, Message, OutMessage, PublishError
from shared.events import Event, EventData, EventError, Registry, dlq_topic

log = logging.getLogger(__name__)

EventHandler = Callable[[Event[Any]], Awaitable[None]]

# Below Kafka's default message limit (1 MiB) so that a dead letter with its headers fits.
MAX_EVENT_BYTES = 900 * 1024
DLQ_KEEP_BYTES = 64 * 1024


class DeadLetterSink(Protocol):
    """Where dead letters are counted; ServiceMetrics is one."""

    def dlq(self, topic: str, reason: str) -> None: ...


class _Uncounted:
    def dlq(self, topic: str, reason: str) -> None:
        return None


def is_transient(exc: BaseException) -> bool:
    """Errors that a later attempt can cure without anybody changing the message."""
    if isinstance(exc, PublishError | ConnectionError | TimeoutError | OSError):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return bool(exc.connection_invalidated) or isinstance(
            exc, sa_exc.OperationalError | sa_exc.InterfaceError
        )
    return isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError)


class EventConsumer:
    """A bus batch handler that decodes, dispatches by event type and dead-letters."""

    def __init__(
        self,
        *,
        service: str,
        group: str,
        bus: Bus,
        registry: Registry,
        handlers: Mapping[type[EventData], EventHandler],
        topic_name: Callable[[str], str] = lambda topic: topic,
        sink: DeadLetterSink | None = None,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
        transient: Callable[[BaseException], bool] = is_transient,
    ) -> None:
        self.service = service
        self.group = group
        self.bus = bus
        self.registry = registry
        self.handlers = dict(handlers)
        self.topics = sorted({topic_name(schema.topic) for schema in self.handlers})
        self.sink: DeadLetterSink = sink or _Uncounted()
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.transient = transient

    async def __call__(self, batch: Sequence[Message]) -> None:
        for message in batch:
            await self._one(message)

    async def _one(self, message: Message) -> None:
        try:
            if len(message.value) > MAX_EVENT_BYTES:
                raise EventError(
                    "too_large", f"{len(message.value)} bytes exceeds {MAX_EVENT_BYTES}"
                )
            event = self.registry.decode(message.value)
        except EventError as exc:
            await self._dead_letter(message, exc.reason, exc.detail)
            return
        handler = self.handlers.get(type(event.data))
        if handler is None:
            # Topics carry several event types; the ones this service does not need pass by.
            return
        attempt = 0
        while True:
            try:
                await handler(event)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                transient = self.transient(exc)
                if not transient and attempt >= self.max_attempts:
                    log.error(
                        "handler failed for good; message dead-lettered",
                        extra={"topic": message.topic, "type": event.type, "attempts": attempt},
                        exc_info=True,
                    )
                    await self._dead_letter(
                        message, "handler_failed", f"{type(exc).__name__}: {exc}"
                    )
                    return
                log.warning(
                    "handler failed; retrying",
                    extra={
                        "topic": message.topic,
                        "type": event.type,
                        "attempt": attempt,
                        "transient": transient,
                        "error": type(exc).__name__,
                    },
                )
                await asyncio.sleep(self.backoff.delay(attempt))

    async def _dead_letter(self, message: Message, reason: str, detail: str) -> None:
        headers = (
            *message.headers,
            ("dlq.reason", reason.encode()),
            ("dlq.detail", detail[:1000].encode()),
            ("dlq.topic", message.topic.encode()),
            ("dlq.partition", str(message.partition).encode()),
            ("dlq.offset", str(message.offset).encode()),
            ("dlq.service", self.service.encode()),
            ("dlq.group", self.group.encode()),
        )
        value = message.value
        if len(value) > MAX_EVENT_BYTES:
            # Keep the head so people can see what it was without breaking the broker limit.
            value = value[:DLQ_KEEP_BYTES]
            headers = (*headers, ("dlq.truncated", b"true"))
        await self.bus.publish(
            [OutMessage(dlq_topic(message.topic), message.key or "", value, headers)]
        )
        self.sink.dlq(message.topic, reason)
        log.warning(
            "message dead-lettered",
            extra={"topic": message.topic, "offset": message.offset, "reason": reason},
        )
