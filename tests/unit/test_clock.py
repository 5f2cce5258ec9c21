from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from fastapi import FastAPI

from shared.auth import install_auth
from shared.clock import Clock, ManualClock, WallClock, clock_router, make_clock
from shared.problems import install_problem_handlers
from shared.settings import ClockKind, InsecureSettings, Profile, Settings

T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
ADMIN = {"Authorization": "Bearer admin-token"}


def make_app(clock: Clock, profile: Profile = Profile.DEV) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)
    install_auth(app, {"admin-token": {"admin"}, "reader-token": {"scheduling:read"}})
    app.include_router(clock_router(clock, profile=profile))
    return app


async def call(
    app: FastAPI, method: str, body: object = None, headers: dict[str, str] = ADMIN
) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, "/v1/admin/clock", json=body, headers=headers)


def test_wall_clock_is_aware_utc() -> None:
    now = WallClock().now()
    assert now.tzinfo is UTC
    assert abs((now - datetime.now(UTC)).total_seconds()) < 1
    assert WallClock().kind is ClockKind.WALL


async def test_wall_clock_sleeps_until_when_or_max_wait() -> None:
    clock = WallClock()
    started = time.monotonic()
    await clock.sleep_until(clock.now() - timedelta(hours=1), max_wait_s=5)
    await clock.sleep_until(clock.now() + timedelta(milliseconds=30), max_wait_s=5)
    await clock.sleep_until(clock.now() + timedelta(hours=1), max_wait_s=0.03)
    assert 0.05 < time.monotonic() - started < 1


def test_manual_clock_moves_forward_only() -> None:
    clock = ManualClock(T0)
    assert clock.now() == T0
    assert clock.kind is ClockKind.MANUAL
    clock.advance(timedelta(days=3))
    assert clock.now() == T0 + timedelta(days=3)
    clock.set(T0 + timedelta(days=3))
    with pytest.raises(ValueError, match=r"backwards.*2025-03-02T08:00:00\+00:00.*2025-03-04T08"):
        clock.set(T0 + timedelta(days=1))
    with pytest.raises(ValueError):
        clock.advance(timedelta(seconds=-1))
    assert clock.now() == T0 + timedelta(days=3)


def test_manual_clock_normalises_to_utc_and_refuses_naive_times() -> None:
    shanghai = timezone(timedelta(hours=8))
    clock = ManualClock(datetime(2025, 3, 1, 16, 0, tzinfo=shanghai))
    assert clock.now() == T0
    assert clock.now().tzinfo is UTC
    with pytest.raises(ValueError, match="naive"):
        ManualClock(datetime(2025, 3, 1))
    with pytest.raises(ValueError, match="naive"):
        clock.set(datetime(2025, 3, 2))


async def test_manual_sleepers_wake_when_the_clock_moves() -> None:
    clock = ManualClock(T0)
    sleepers = [
        asyncio.create_task(clock.sleep_until(T0 + timedelta(days=7), max_wait_s=30))
        for _ in range(3)
    ]
    await asyncio.sleep(0.01)
    assert not any(s.done() for s in sleepers)
    clock.advance(timedelta(days=1))
    async with asyncio.timeout(1):
        await asyncio.gather(*sleepers)


async def test_manual_sleep_returns_after_max_wait_or_at_once_when_due() -> None:
    clock = ManualClock(T0)
    started = time.monotonic()
    await clock.sleep_until(T0, max_wait_s=30)
    await clock.sleep_until(T0 + timedelta(days=1), max_wait_s=0.03)
    assert 0.02 < time.monotonic() - started < 1
    assert clock.now() == T0


def test_make_clock() -> None:
    assert isinstance(make_clock(Settings(profile="dev", clock="wall")), WallClock)
    manual = make_clock(Settings(profile="dev", clock="manual"), start=T0)
    assert isinstance(manual, ManualClock)
    assert manual.now() == T0
    unsafe = Settings.model_construct(profile=Profile.PRODUCTION, clock=ClockKind.MANUAL)
    with pytest.raises(InsecureSettings):
        make_clock(unsafe)


async def test_get_clock() -> None:
    response = await call(make_app(ManualClock(T0)), "GET")
    assert response.status_code == 200
    assert response.json() == {"now": "2025-03-01T08:00:00Z", "kind": "manual"}
    wall = (await call(make_app(WallClock()), "GET")).json()
    assert wall["kind"] == "wall"


async def test_put_moves_the_manual_clock() -> None:
    clock = ManualClock(T0)
    response = await call(make_app(clock), "PUT", {"now": "2025-03-04T16:00:00+08:00"})
    assert response.status_code == 200
    assert response.json() == {"now": "2025-03-04T08:00:00Z", "kind": "manual"}
    assert clock.now() == T0 + timedelta(days=3)


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_the_clock_needs_the_admin_scope(method: str) -> None:
    app = make_app(ManualClock(T0))
    body = {"now": "2025-03-04T08:00:00Z"}
    assert (await call(app, method, body, headers={})).status_code == 401
    reader = {"Authorization": "Bearer reader-token"}
    response = await call(app, method, body, headers=reader)
    assert response.status_code == 403
    assert "'admin'" in response.json()["detail"]


async def test_put_on_the_wall_clock_is_409() -> None:
    response = await call(make_app(WallClock()), "PUT", {"now": "2030-01-01T00:00:00Z"})
    assert response.status_code == 409
    assert "the clock is not manual" in response.json()["detail"]


async def test_put_refuses_a_naive_time() -> None:
    clock = ManualClock(T0)
    response = await call(make_app(clock), "PUT", {"now": "2025-03-04T08:00:00"})
    assert response.status_code == 422
    assert response.json()["field"] == "now"
    assert clock.now() == T0


async def test_put_refuses_to_go_backwards() -> None:
    clock = ManualClock(T0)
    response = await call(make_app(clock), "PUT", {"now": "2025-02-01T00:00:00Z"})
    assert response.status_code == 422
    problem = response.json()
    assert problem["field"] == "now"
    assert problem["errors"][0]["field"] == "now"
    assert "2025-02-01T00:00:00+00:00" in problem["detail"]
    assert "2025-03-01T08:00:00+00:00" in problem["detail"]
    assert clock.now() == T0


async def test_production_never_accepts_a_clock_change() -> None:
    clock = ManualClock(T0)
    app = make_app(clock, profile=Profile.PRODUCTION)
    response = await call(app, "PUT", {"now": "2025-03-04T08:00:00Z"})
    assert response.status_code == 403
    assert "production" in response.json()["detail"]
    assert clock.now() == T0
    wall = await call(
        make_app(WallClock(), Profile.PRODUCTION), "PUT", {"now": "2030-01-01T00:00:00Z"}
    )
    assert wall.status_code == 403
