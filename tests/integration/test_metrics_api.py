"""The metrics service end to end on the in-process bus: migrations (0001, 0002), the
batch consumer, redelivery, and `GET /v1/funnel` with filters and group_by."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.metrics.app import SPEC
from shared.bus import OutMessage
from shared.bus.memory import InProcessBus
from shared.clock import ManualClock
from shared.events import Event, encode
from shared.settings import ClockKind, Settings
from tests.conftest import fresh_database
from tests.integration.test_metrics_exactness import DAY3, LAUNCH, T0, P, check, stream

TOKEN = "t-admin"
READER = "t-reader"


@pytest.fixture(params=["sqlite", "postgres"])
async def service(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[tuple[httpx.AsyncClient, InProcessBus]]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / 'metrics.db'}"
        else:
            postgres = request.getfixturevalue("postgres_url")
            url = await stack.enter_async_context(fresh_database(postgres, f"t_{unique}"))
        settings = Settings(
            database_url=url,
            clock=ClockKind.MANUAL,
            api_tokens={TOKEN: frozenset({"*"}), READER: frozenset({"segmentation:read"})},
            log_level="WARNING",
        )
        bus = InProcessBus()
        await bus.start()
        stack.push_async_callback(bus.stop)
        app = SPEC.create_app(settings, bus=bus, clock=ManualClock(T0))
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://metrics",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        )
        yield client, bus


def out(event: Event[Any]) -> OutMessage:
    value = encode(event.data, source="test", time=event.time, event_id=event.id)
    return OutMessage(topic=event.data.topic, key=event.key, value=value)


async def funnel_rows(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    answer = await client.get("/v1/funnel", params={"promotion_id": P, **params})
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["rows"]
    return rows


async def test_funnel_over_the_bus(service: tuple[httpx.AsyncClient, InProcessBus]) -> None:
    client, bus = service
    events = stream()
    # Every event twice: the second copy is a redelivery.
    await bus.publish([out(e) for e in events] + [out(e) for e in events])

    deadline = time.monotonic() + 20
    while True:
        rows = {r["wave"]: r for r in await funnel_rows(client)}
        if rows.get("day3", {}).get("failed") == 1 and rows.get("launch", {}).get("planned") == 4:
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    # Topics are consumed independently: wait for every figure to settle.
    while True:
        rows = {r["wave"]: r for r in await funnel_rows(client)}
        try:
            check(rows["launch"], LAUNCH)
            check(rows["day3"], DAY3)
            break
        except AssertionError:
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.05)

    body = (await client.get("/v1/funnel", params={"promotion_id": P})).json()
    assert body["group_by"] == ["wave"]
    grouped = await funnel_rows(client, group_by="wave,segment", segment="high")
    assert {(r["wave"], r["segment"]) for r in grouped} == {("launch", "high"), ("day3", "high")}


async def test_funnel_refuses_bad_input(service: tuple[httpx.AsyncClient, InProcessBus]) -> None:
    client, _ = service
    bad = await client.get("/v1/funnel", params={"promotion_id": P, "group_by": "wave,user"})
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")
    empty = await client.get("/v1/funnel", params={"promotion_id": "nothing"})
    assert empty.json()["rows"] == []
    forbidden = await client.get(
        "/v1/funnel",
        params={"promotion_id": P},
        headers={"Authorization": f"Bearer {READER}"},
    )
    assert forbidden.status_code == 403
    assert (
        await client.get("/v1/funnel", params={"promotion_id": P}, headers={"Authorization": ""})
    ).status_code == 401
