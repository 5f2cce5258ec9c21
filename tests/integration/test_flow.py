"""The foundation's smoke flow: one event from each service to the next, end to end.

scheduling (promotion ended) -> segmentation (audience) -> scheduling (touch due)
-> delivery (delivery sent) -> metrics (funnel), and back to scheduling (touch sent).
Run on the embedded stack (in-process bus, SQLite) and on real Kafka and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.embedded import Embedded, embedded
from shared.clock import ManualClock
from shared.settings import SERVICES, ClockKind, Settings
from tests.conftest import fresh_database

TOKEN = "flow-token"
START = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["embedded", "kafka+postgres"])
async def stack(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Embedded]:
    common: dict[str, Any] = {
        "clock": ClockKind.MANUAL,
        "api_tokens": {TOKEN: frozenset({"*"})},
        "outbox_poll_s": 0.05,
        "log_level": "WARNING",
    }
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "embedded":
            settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", **common)
        else:
            kafka = request.getfixturevalue("kafka_bootstrap")
            postgres = request.getfixturevalue("postgres_url")
            settings = Settings(
                database_url=await stack.enter_async_context(
                    fresh_database(postgres, f"t_{unique}")
                ),
                kafka_bootstrap_servers=kafka,
                topic_prefix=f"t{unique}.",
                **common,
            )
        yield await stack.enter_async_context(
            embedded(settings, clock=ManualClock(START), token=TOKEN)
        )


async def eventually(probe: Any, *, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


async def test_operations_endpoints_answer(stack: Embedded) -> None:
    for name in SERVICES:
        client = stack.clients[name]
        assert (await client.get("/healthz")).json() == {"status": "ok", "service": name}
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": True, "bus": True}
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert "afterglow_http_request_duration_seconds" in metrics.text


async def test_an_ended_promotion_flows_through_every_service(stack: Embedded) -> None:
    users = [f"u-{i}" for i in range(25)]
    added = await stack.clients["segmentation"].post(
        "/v1/promotions/p-1/participants", json={"user_ids": users}
    )
    assert added.status_code == 202, added.text
    assert added.json()["added"] == 25

    ended = await stack.clients["scheduling"].post(
        "/v1/promotions/p-1/end", json={"ended_at": START.isoformat(), "name": "Spring sale"}
    )
    assert ended.status_code == 202, ended.text
    again = await stack.clients["scheduling"].post(
        "/v1/promotions/p-1/end", json={"ended_at": START.isoformat(), "name": "Spring sale"}
    )
    assert again.json()["already_ended"] is True

    async def funnel_complete() -> dict[str, Any] | None:
        response = await stack.clients["metrics"].get("/v1/funnel", params={"promotion_id": "p-1"})
        rows = response.json()["rows"]
        if rows and rows[0]["sent"] == 25 and rows[0]["planned"] == 25:
            return dict(rows[0])
        return None

    row = await eventually(funnel_complete)
    assert row is not None, "the funnel never showed 25 planned and 25 sent"
    assert row["wave"] == "launch"
    assert row["reach_rate"] == 1.0
    assert row["open_rate"] == 0.0

    async def all_sent() -> bool:
        plan = (await stack.clients["scheduling"].get("/v1/promotions/p-1/plan")).json()
        return bool(plan["waves"]) and plan["waves"][0]["sent"] == 25

    assert await eventually(all_sent), "scheduling never learnt that every touch was sent"

    touches = (await stack.clients["scheduling"].get("/v1/users/u-3/touches")).json()["touches"]
    assert [(t["promotion_id"], t["wave"], t["status"]) for t in touches] == [
        ("p-1", "launch", "sent")
    ]
    deliveries = (
        await stack.clients["delivery"].get("/v1/deliveries", params={"user_id": "u-3"})
    ).json()["deliveries"]
    assert [d["touch_id"] for d in deliveries] == [touches[0]["id"]]
