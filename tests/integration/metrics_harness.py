"""The metrics service for tests: on SQLite or a fresh PostgreSQL database, the in-process
bus, a manual clock; an ASGI client, and on request a real loopback HTTP server (uvicorn on
127.0.0.1, an ephemeral port) for clients outside the process such as a browser."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from services.metrics.app import SPEC
from shared.bus.memory import InProcessBus
from shared.clock import ManualClock
from shared.settings import ClockKind, Settings
from tests.conftest import fresh_database


@dataclass
class Metrics:
    client: httpx.AsyncClient
    bus: InProcessBus
    clock: ManualClock
    app: FastAPI
    url: str | None = None  # the loopback server's base URL, when serving


async def _serve(app: FastAPI, stack: contextlib.AsyncExitStack) -> str:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    )
    task = asyncio.create_task(server.serve())

    async def stop() -> None:
        server.should_exit = True
        await task

    stack.push_async_callback(stop)
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def running_metrics(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    unique: str,
    *,
    start: datetime,
    tokens: Mapping[str, frozenset[str]],
    serve: bool = False,
) -> AsyncIterator[Metrics]:
    """`request.param` chooses the database: "sqlite" or "postgres"."""
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'metrics.db'}"
        else:
            postgres = request.getfixturevalue("postgres_url")
            url = await stack.enter_async_context(fresh_database(postgres, f"t_{unique}"))
        settings = Settings(
            database_url=url,
            clock=ClockKind.MANUAL,
            api_tokens=dict(tokens),
            outbox_poll_s=0.05,
            log_level="WARNING",
        )
        bus = InProcessBus()
        await bus.start()
        stack.push_async_callback(bus.stop)
        clock = ManualClock(start)
        app = SPEC.create_app(settings, bus=bus, clock=clock)
        await stack.enter_async_context(app.router.lifespan_context(app))
        token = next(iter(tokens))
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://metrics",
                headers={"Authorization": f"Bearer {token}"},
            )
        )
        served = await _serve(app, stack) if serve else None
        yield Metrics(client, bus, clock, app, served)
