"""All four services in one process: the embedded mode (one in-process bus), or, when
Kafka is configured, four apps each with its own Kafka client (as in production)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from services.registry import build_app
from shared.bus import Bus
from shared.bus.memory import InProcessBus
from shared.clock import Clock, make_clock
from shared.settings import SERVICES, Settings


@dataclass
class Embedded:
    apps: dict[str, FastAPI]
    clients: dict[str, httpx.AsyncClient]
    clock: Clock
    settings: Settings


@contextlib.asynccontextmanager
async def embedded(
    settings: Settings, *, bus: Bus | None = None, clock: Clock | None = None, token: str
) -> AsyncIterator[Embedded]:
    """Start the four apps (lifespans included) and give an HTTP client for each."""
    the_bus: Bus | None = bus
    if the_bus is None and not settings.kafka_bootstrap_servers:
        the_bus = InProcessBus(partitions=settings.kafka_partitions)
    the_clock = clock or make_clock(settings)
    if the_bus is not None:
        await the_bus.start()
    try:
        apps = {name: build_app(name, settings, bus=the_bus, clock=the_clock) for name in SERVICES}
        async with contextlib.AsyncExitStack() as stack:
            for app in apps.values():
                await stack.enter_async_context(app.router.lifespan_context(app))
            clients = {}
            for name, app in apps.items():
                clients[name] = await stack.enter_async_context(
                    httpx.AsyncClient(
                        transport=httpx.ASGITransport(app=app),
                        base_url=f"http://{name}",
                        headers={"Authorization": f"Bearer {token}"},
                    )
                )
            yield Embedded(apps, clients, the_clock, settings)
    finally:
        if the_bus is not None:
            await the_bus.stop()
