"""A scheduling service (or several replicas) on a manual clock and an in-process bus, with
a recorder of what it emits; for the scheduling integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import func, select

from services.scheduling import store
from services.scheduling.app import make_spec
from services.scheduling.config import SchedulingSettings
from services.scheduling.state import stop_dispatchers
from shared.bus import Message, OutMessage
from shared.bus.memory import InProcessBus
from shared.clock import ManualClock
from shared.events import Event, EventData, default_registry, encode
from shared.service import ServiceContext
from shared.settings import ClockKind, Settings

TOKEN = "scheduling-token"


@dataclass
class Harness:
    apps: list[FastAPI]
    client: httpx.AsyncClient
    bus: InProcessBus
    clock: ManualClock
    events: list[Event[Any]] = field(default_factory=list)

    @property
    def ctx(self) -> ServiceContext:
        ctx: ServiceContext = self.apps[0].state.ctx
        return ctx

    def emitted(self, kind: type[EventData]) -> list[Any]:
        return [e for e in self.events if isinstance(e.data, kind)]

    async def publish(self, *events: EventData) -> None:
        now = self.clock.now()
        await self.bus.publish(
            [
                OutMessage(e.topic, e.partition_key(), encode(e, source="test", time=now))
                for e in events
            ]
        )

    async def count(self, query: Any) -> int:
        async with self.ctx.db.connect() as conn:
            return int(await conn.scalar(query) or 0)

    async def planned_members(self) -> int:
        return await self.count(select(func.count()).select_from(store.plan_members))

    async def wait_for(self, probe: Any, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await probe():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)

    async def settle(self) -> None:
        """Everything due by now is decided, published and recorded."""
        t = store.touches
        now = self.clock.now()

        async def quiet() -> bool:
            due = await self.count(
                select(func.count()).where(t.c.status == "planned", t.c.due_at <= now)
            )
            pending = sum([await app.state.ctx.outbox.pending() for app in self.apps])
            return due == 0 and pending == 0

        await self.wait_for(quiet)
        seen = -1
        while seen != len(self.events):
            seen = len(self.events)
            await asyncio.sleep(0.05)

    async def next_due(self) -> datetime | None:
        t = store.touches
        async with self.ctx.db.connect() as conn:
            found: datetime | None = await conn.scalar(
                select(func.min(t.c.due_at)).where(t.c.status == "planned")
            )
        return found

    async def run_until(self, end: datetime, on_step: Any = None) -> None:
        """Move the clock from one due time to the next until `end`, settling each time."""
        await self.settle()
        while True:
            upcoming = await self.next_due()
            if upcoming is None or upcoming > end:
                break
            if upcoming > self.clock.now():
                self.clock.set(upcoming)
            await self.settle()
            if on_step is not None:
                await on_step()
        if end > self.clock.now():
            self.clock.set(end)
        await self.settle()


@contextlib.asynccontextmanager
async def scheduling(
    database_url: str,
    start: datetime,
    *,
    replicas: int = 1,
    config: SchedulingSettings | None = None,
) -> AsyncIterator[Harness]:
    settings = Settings(
        database_url=database_url,
        clock=ClockKind.MANUAL,
        api_tokens={TOKEN: frozenset({"*"})},
        outbox_poll_s=0.05,
        log_level="WARNING",
    )
    bus = InProcessBus(partitions=4)
    clock = ManualClock(start)
    await bus.start()
    spec = make_spec(config or SchedulingSettings(dispatch_idle_s=0.05))
    registry = default_registry()
    harness: Harness | None = None

    async def record(batch: Sequence[Message]) -> None:
        assert harness is not None
        harness.events.extend(registry.decode(m.value) for m in batch)

    try:
        async with contextlib.AsyncExitStack() as stack:
            apps = []
            for _ in range(replicas):
                app = spec.create_app(settings, bus=bus, clock=clock)
                await stack.enter_async_context(app.router.lifespan_context(app))
                apps.append(app)
            client = await stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=apps[0]),
                    base_url="http://scheduling",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            )
            harness = Harness(apps, client, bus, clock)

            recorder = bus.consumer("recorder", ["touches", "promotions"], record)
            await recorder.start()
            stack.push_async_callback(recorder.stop)
            yield harness
            for app in apps:
                await stop_dispatchers(app.state.ctx)
    finally:
        await bus.stop()


def days(n: float) -> timedelta:
    return timedelta(days=n)
