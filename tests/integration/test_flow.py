"""One promotion through every service, end to end, as other systems drive it.

segmentation (profiles, participants) <- scheduling (promotion ended) ->
segmentation (audience) -> scheduling (plan, dispatch) -> delivery (provider
call over real HTTP) -> metrics (funnel) and back to scheduling (sent).
Run on the embedded stack (in-process bus, SQLite) and on real Kafka and
PostgreSQL; the provider is a recording HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from services.embedded import Embedded, embedded
from shared.clock import ManualClock
from shared.settings import CHANNELS, SERVICES, ClockKind, Settings
from tests.conftest import fresh_database
from tests.support.provider_server import ProviderServer

TOKEN = "flow-token"
START = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
USERS = [f"u-{i}" for i in range(25)]


@dataclass
class Flow:
    stack: Embedded
    provider: ProviderServer
    clock: ManualClock


@pytest.fixture(params=["embedded", "kafka+postgres"])
async def flow(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> AsyncIterator[Flow]:
    async with contextlib.AsyncExitStack() as stack:
        provider = await stack.enter_async_context(ProviderServer())
        common: dict[str, Any] = {
            "clock": ClockKind.MANUAL,
            "api_tokens": {TOKEN: frozenset({"*"})},
            "receipt_secret": "flow-secret",
            "outbox_poll_s": 0.05,
            "log_level": "WARNING",
            **{f"provider_{channel}_url": provider.url for channel in CHANNELS},
        }
        if request.param == "embedded":
            settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", **common)
        else:
            kafka = request.getfixturevalue("kafka_bootstrap")
            postgres = request.getfixturevalue("postgres_url")
            database = await stack.enter_async_context(fresh_database(postgres, f"t_{unique}"))
            settings = Settings(
                database_url=database,
                kafka_bootstrap_servers=kafka,
                topic_prefix=f"t{unique}.",
                **common,
            )
        clock = ManualClock(START)
        running = await stack.enter_async_context(embedded(settings, clock=clock, token=TOKEN))
        yield Flow(running, provider, clock)


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}", pytrace=False)
        await asyncio.sleep(0.1)


async def test_operations_endpoints_answer(flow: Flow) -> None:
    for name in SERVICES:
        client = flow.stack.clients[name]
        assert (await client.get("/healthz")).json() == {"status": "ok", "service": name}
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": True, "bus": True}
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert "afterglow_http_request_duration_seconds" in metrics.text


async def test_an_ended_promotion_flows_through_every_service(flow: Flow) -> None:
    clients = flow.stack.clients
    # Exact counts: no holdouts in this policy.
    default = (await clients["scheduling"].get("/v1/policies/default")).json()
    policy = default["policy"]
    policy["experiment"].update(holdout_share=0.0, wave_holdout_share=0.0)
    saved = await clients["scheduling"].put("/v1/policies/flow", json=policy)
    assert saved.status_code in (200, 201), saved.text

    for i, user in enumerate(USERS):
        profile = {
            "birth_year": 1990,
            "timezone": "UTC",
            "addresses": {"email": f"{user}@example.com", "sms": f"+861380000{i:04d}"},
            "consent": {"email": True, "sms": True, "push": False},
        }
        answer = await clients["segmentation"].put(f"/v1/users/{user}", json=profile)
        assert answer.status_code in (200, 201), answer.text
    added = await clients["segmentation"].post(
        "/v1/promotions/p-1/participants", json={"user_ids": USERS}
    )
    assert added.status_code == 202, added.text
    assert added.json()["added"] == len(USERS)

    body = {"ended_at": START.isoformat(), "name": "Spring sale", "policy": "flow"}
    ended = await clients["scheduling"].post("/v1/promotions/p-1/end", json=body)
    assert ended.status_code == 202, ended.text
    again = await clients["scheduling"].post("/v1/promotions/p-1/end", json=body)
    assert again.json()["already_ended"] is True

    async def launch_settled() -> dict[str, Any] | None:
        plan = (await clients["scheduling"].get("/v1/promotions/p-1/plan")).json()
        waves = {w["wave"]: w for w in plan["waves"]}
        launch = waves.get("launch")
        if launch and launch["planned"] == len(USERS) and launch["sent"] == len(USERS):
            return waves
        return None

    # The launch wave is due at the end of the promotion (12:00 UTC, outside quiet hours).
    flow.clock.set(START + timedelta(minutes=5))
    waves = await eventually(launch_settled, "every launch touch to be sent")
    assert waves["launch"]["suppressed"] == {}
    assert len(flow.provider.calls) == len(USERS)
    assert flow.provider.duplicates() == 0
    assert len({call.key for call in flow.provider.calls}) == len(USERS)

    async def funnel_launch() -> dict[str, Any] | None:
        funnel = await clients["metrics"].get("/v1/funnel", params={"promotion_id": "p-1"})
        rows = {row["wave"]: row for row in funnel.json()["rows"]}
        launch = rows.get("launch")
        return launch if launch and launch["sent"] == len(USERS) else None

    row = await eventually(funnel_launch, "the funnel to count every launch touch")
    assert row["planned"] == len(USERS)
    assert row["reach_rate"] == 1.0

    touches = (await clients["scheduling"].get("/v1/users/u-3/touches")).json()["touches"]
    launch_touch = next(t for t in touches if t["wave"] == "launch")
    assert (launch_touch["promotion_id"], launch_touch["status"]) == ("p-1", "sent")
    deliveries = (
        await clients["delivery"].get("/v1/deliveries", params={"user_id": "u-3"})
    ).json()["deliveries"]
    assert launch_touch["id"] in [d["touch_id"] for d in deliveries]
    assert launch_touch["id"] in {call.key for call in flow.provider.calls}
