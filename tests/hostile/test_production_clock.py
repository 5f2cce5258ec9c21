"""The manual clock is refused in the production profile, on each of the four real apps.

tests/unit/test_clock.py proves it for the clock router alone and tests/unit/test_settings.py
that `AFTERGLOW_CLOCK=manual` is refused at start in production; this file proves that every
service, as built for production, mounts the router with the production guard, so that even an
admin token cannot move time.
"""

from __future__ import annotations

import httpx
import pytest

from services.registry import build_app
from shared.problems import PROBLEM_MEDIA_TYPE
from shared.settings import SERVICES, Profile
from tests.hostile.apps import ADMIN_TOKEN, settings_for

PRODUCTION_URL = "postgresql+asyncpg://afterglow@127.0.0.1:5432/afterglow"


def production(service: str) -> httpx.AsyncClient:
    settings = settings_for(
        service,
        PRODUCTION_URL,
        profile=Profile.PRODUCTION,
        kafka_bootstrap_servers="127.0.0.1:9092",
    )
    # No lifespan: the clock routes need neither the database nor the bus.
    app = build_app(service, settings)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url=f"http://{service}",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )


@pytest.mark.parametrize("service", SERVICES)
async def test_production_refuses_to_set_the_clock_even_to_an_admin(service: str) -> None:
    async with production(service) as client:
        before = await client.get("/v1/admin/clock")
        assert before.status_code == 200
        assert before.json()["kind"] == "wall"
        response = await client.put("/v1/admin/clock", json={"now": "2030-01-01T00:00:00Z"})
        assert response.status_code == 403, response.text
        assert response.headers["content-type"].startswith(PROBLEM_MEDIA_TYPE)
        assert "production" in response.json()["detail"]
        after = await client.get("/v1/admin/clock")
        assert after.json()["now"] < "2030", "the clock moved"
