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
# Several consecutive events of one type from one partition, in order, in one call:
# the way to one transaction and one bulk write for many events. Consecutive events of
# several types mapped to the very same handler object come together in one call too.
BatchEventHandler = Callable[[list[Event[Any]]], Awaitable[None]]

# Below Kafka's default message limit (1 MiB) so that a dead letter with its headers fits.
MAX_EVENT_BYTES = 900 * 1024
DLQ_KEEP_BYTES = 64 * 1024


class DeadLetterSink(Protocol):
    """Where dead letters are counted; ServiceMetrics is one."""

    def dlq(self, topic: str, reason: str) -> None: ...


class _Uncounted:
    def dlq(self, topic: str, reason: str) -> None:
        return None


# SQLSTATE classes of a server that is going away or not back yet: 08 connection
# exception, 53 insufficient resources, 57 operator intervention (57P01 admin shutdown,
# 57P03 cannot connect now: the server is starting up).
_UNREACHABLE_SQLSTATE = ("08", "53", "57")


def is_transient(exc: BaseException) -> bool:
    """Errors that a later attempt can cure without anybody changing the message.

    That is the broker or the database unreachable, also as the raw driver reports it
    (hot paths talk to asyncpg directly) and while PostgreSQL restarts.
    """
    if isinstance(exc, PublishError | ConnectionError | TimeoutError | OSError):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and (
        exc.connection_invalidated
        or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    ):
        return True
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return True
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str) and state.startswith(_UNREACHABLE_SQLSTATE):
            return True
    return False


class EventConsumer:
    """A bus batch handler that decodes, dispatches by event type and dead-letters."""

    def __init__(
        self,
        *,
        service: str,
        group: str,
        bus: Bus,
        registry: Registry,
        handlers: Mapping[type[EventData], EventHandler] | None = None,
        batch_handlers: Mapping[type[EventData], BatchEventHandler] | None = None,
        topic_name: Callable[[str], str] = lambda topic: topic,
        sink: DeadLetterSink | None = None,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
        transient: Callable[[BaseException], bool] = is_transient,
        skip: Callable[[Message], bool] | None = None,
    ) -> None:
        self.service = service
        self.group = group
        self.bus = bus
        self.registry = registry
        self.batch_handlers = dict(batch_handlers or {})
        # Every handled type: a batch handler also serves single events of its type.
        self.handlers: dict[type[EventData], Callable[[Any], Awaitable[None]]] = {
            **dict(handlers or {}),
            **self.batch_handlers,
        }
        self.topics = sorted({topic_name(schema.topic) for schema in self.handlers})
        self.sink: DeadLetterSink = sink or _Uncounted()
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.transient = transient
        # Messages passed by undecoded (a service's own events, applied when it made them).
        self.skip = skip

    async def __call__(self, batch: Sequence[Message]) -> None:
        run: list[tuple[Message, Event[Any]]] = []
        skip = self.skip
        for message in batch:
            if skip is not None and skip(message):
                continue
            event = await self._decode(message)
            if event is None or type(event.data) not in self.handlers:
                # Topics carry several event types; the ones this service does not need pass by.
                continue
            if run and not self._same_run(type(run[0][1].data), type(event.data)):
                await self._dispatch(run)
                run = []
            run.append((message, event))
        if run:
            await self._dispatch(run)

    def _same_run(self, a: type[EventData], b: type[EventData]) -> bool:
        """One type, or several types served by one batch handler (a mixed batch in one call)."""
        handler = self.batch_handlers.get(a)
        return a is b or (handler is not None and handler is self.batch_handlers.get(b))

    async def _decode(self, message: Message) -> Event[Any] | None:
        try:
            if len(message.value) > MAX_EVENT_BYTES:
                raise EventError(
                    "too_large", f"{len(message.value)} bytes exceeds {MAX_EVENT_BYTES}"
                )
            return self.registry.decode(message.value)
        except EventError as exc:
            await self._dead_letter(message, exc.reason, exc.detail)
            return None

    async def _dispatch(self, run: list[tuple[Message, Event[Any]]]) -> None:
        """Consecutive events of one type: together to a batch handler, else one by one."""
        schema = type(run[0][1].data)
        batch_handler = self.batch_handlers.get(schema)
        if batch_handler is None:
            for message, event in run:
                await self._attempt(message, event.type, self.handlers[schema], event)
            return
        events = [event for _, event in run]
        if await self._attempt(run[0][0], run[0][1].type, batch_handler, events, isolate=True):
            return
        # The batch failed for good: find the culprit by handling each event alone.
        for message, event in run:
            await self._attempt(message, event.type, batch_handler, [event])

    async def _attempt(
        self,
        message: Message,
        event_type: str,
        handler: Callable[[Any], Awaitable[None]],
        argument: Any,
        *,
        isolate: bool = False,
    ) -> bool:
        """Call until it succeeds: forever if transient, else up to max_attempts.

        Returns False when it failed for good; the message is then dead-lettered,
        unless `isolate` asks the caller to retry its events one by one instead.
        """
        attempt = 0
        while True:
            try:
                await handler(argument)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                transient = self.transient(exc)
                if not transient and attempt >= self.max_attempts:
                    if isolate:
                        log.warning(
                            "batch failed for good; handling its events one by one",
                            extra={"topic": message.topic, "type": event_type},
                        )
                        return False
                    log.error(
                        "handler failed for good; message dead-lettered",
                        extra={"topic": message.topic, "type": event_type, "attempts": attempt},
                        exc_info=True,
                    )
                    await self._dead_letter(
                        message, "handler_failed", f"{type(exc).__name__}: {exc}"
                    )
                    return False
                log.warning(
                    "handler failed; retrying",
                    extra={
                        "topic": message.topic,
                        "type": event_type,
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
