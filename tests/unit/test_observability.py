from __future__ import annotations

import httpx
from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CollectorRegistry

from shared.bus.base import BusObserver
from shared.observability import (
    UNMATCHED,
    PrometheusMiddleware,
    ServiceMetrics,
    metrics_response,
)

HTTP = "afterglow_http_request_duration_seconds_count"


def make_app(metrics: ServiceMetrics) -> FastAPI:
    app = FastAPI()
    app.add_middleware(PrometheusMiddleware, metrics=metrics)
    users = APIRouter(prefix="/users")

    @users.get("/{user_id}")
    async def user(user_id: str) -> dict[str, str]:
        return {"user_id": user_id}

    @users.get("/{user_id}/touches/{touch_id}")
    async def touch(user_id: str, touch_id: str) -> dict[str, str]:
        return {}

    v1 = APIRouter()
    v1.include_router(users)
    app.include_router(v1, prefix="/v1")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/metrics")
    async def scrape() -> Response:
        return metrics_response(metrics)

    sub = FastAPI()

    @sub.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {}

    app.mount("/sub", sub)
    return app


def requests(metrics: ServiceMetrics, method: str, route: str, status: int) -> float:
    labels = {"service": metrics.service, "method": method, "route": route, "status": str(status)}
    return metrics.registry.get_sample_value(HTTP, labels) or 0.0


async def send(app: FastAPI, method: str, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.request(method, path)


async def test_requests_are_labelled_with_the_full_route_template() -> None:
    metrics = ServiceMetrics("segmentation")
    app = make_app(metrics)
    for user in ("u-1", "u-2", "13800000000"):
        assert (await send(app, "GET", f"/v1/users/{user}")).status_code == 200
    await send(app, "GET", "/v1/users/u-1/touches/t-9")
    assert requests(metrics, "GET", "/v1/users/{user_id}", 200) == 3
    assert requests(metrics, "GET", "/v1/users/{user_id}/touches/{touch_id}", 200) == 1
    assert b"u-1" not in (await send(app, "GET", "/metrics")).content


async def test_unknown_paths_are_unmatched_and_bad_methods_keep_the_route() -> None:
    metrics = ServiceMetrics("segmentation")
    app = make_app(metrics)
    await send(app, "GET", "/v2/whatever/123")
    await send(app, "DELETE", "/v1/users/u-1")
    await send(app, "BREW", "/v1/users/u-1")
    assert requests(metrics, "GET", UNMATCHED, 404) == 1
    assert requests(metrics, "DELETE", "/v1/users/{user_id}", 405) == 1
    assert requests(metrics, "other", "/v1/users/{user_id}", 405) == 1


async def test_errors_and_mounts() -> None:
    metrics = ServiceMetrics("delivery")
    app = make_app(metrics)
    assert (await send(app, "GET", "/boom")).status_code == 500
    await send(app, "GET", "/sub/items/7")
    await send(app, "GET", "/sub/items/x")
    assert requests(metrics, "GET", "/boom", 500) == 1
    assert requests(metrics, "GET", "/sub/items/{item_id}", 200) == 1
    assert requests(metrics, "GET", "/sub/items/{item_id}", 422) == 1


async def test_metrics_endpoint_speaks_prometheus_text() -> None:
    metrics = ServiceMetrics("metrics")
    app = make_app(metrics)
    await send(app, "GET", "/v1/users/u-1")
    response = await send(app, "GET", "/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert 'afterglow_http_request_duration_seconds_bucket{le="0.005",method="GET"' in response.text
    assert "# TYPE afterglow_bus_messages_produced_total counter" in response.text


def test_bus_observer_hooks() -> None:
    metrics = ServiceMetrics("scheduling")
    observer: BusObserver = metrics
    observer.produced("touch.planned", 3)
    observer.produced("touch.planned", 2)
    observer.consumed("promotion.ended", "scheduling", 4)
    observer.handler_failed("promotion.ended", "scheduling")
    observer.handler_seconds("promotion.ended", "scheduling", 0.2)
    observer.lag("promotion.ended", "scheduling", 3, 17)
    metrics.dlq("touch.due", "poison")
    metrics.outbox_pending(12)
    metrics.outbox_pending(5)
    value = metrics.registry.get_sample_value
    svc = {"service": "scheduling"}
    group = {**svc, "topic": "promotion.ended", "group": "scheduling"}
    assert value("afterglow_bus_messages_produced_total", {**svc, "topic": "touch.planned"}) == 5
    assert value("afterglow_bus_messages_consumed_total", group) == 4
    assert value("afterglow_bus_handler_failures_total", group) == 1
    assert value("afterglow_bus_handler_duration_seconds_sum", group) == 0.2
    assert value("afterglow_bus_consumer_lag", {**group, "partition": "3"}) == 17
    dlq = {**svc, "topic": "touch.due", "reason": "poison"}
    assert value("afterglow_bus_dlq_messages_total", dlq) == 1
    assert value("afterglow_outbox_pending", svc) == 5


def test_each_service_has_its_own_registry() -> None:
    a, b = ServiceMetrics("segmentation"), ServiceMetrics("segmentation")
    a.produced("t", 1)
    assert (
        b.registry.get_sample_value(
            "afterglow_bus_messages_produced_total", {"service": "segmentation", "topic": "t"}
        )
        is None
    )
    shared = CollectorRegistry()
    ServiceMetrics("delivery", shared).produced("t", 1)
    assert (
        shared.get_sample_value(
            "afterglow_bus_messages_produced_total", {"service": "delivery", "topic": "t"}
        )
        == 1
    )
