"""Prometheus metrics of one service: HTTP, bus and outbox, on the service's own registry.

Conventions for metrics that services add to `metrics.registry`: the `afterglow_`
prefix, `_total` counters, `_seconds` histograms, base units, and labels with a
bounded set of values (never user, touch or promotion ids).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.bus.base import BusObserver

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ServiceMetrics(BusObserver):
    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        group = ("service", "topic", "group")
        self._http = Histogram(
            "afterglow_http_request_duration_seconds",
            "HTTP requests by route template and status",
            ("service", "method", "route", "status"),
            registry=r,
        )
        self._produced = Counter(
            "afterglow_bus_messages_produced_total",
            "Messages published and acknowledged",
            ("service", "topic"),
            registry=r,
        )
        self._consumed = Counter(
            "afterglow_bus_messages_consumed_total",
            "Messages handled and committed",
            group,
            registry=r,
        )
        self._failures = Counter(
            "afterglow_bus_handler_failures_total",
            "Batches whose handler raised (they are delivered again)",
            group,
            registry=r,
        )
        self._dlq = Counter(
            "afterglow_bus_dlq_messages_total",
            "Messages moved to a dead-letter topic",
            ("service", "topic", "reason"),
            registry=r,
        )
        self._handler_seconds = Histogram(
            "afterglow_bus_handler_duration_seconds",
            "Time a handler took for one batch",
            group,
            registry=r,
        )
        self._lag = Gauge(
            "afterglow_bus_consumer_lag",
            "Messages not yet consumed, per partition",
            (*group, "partition"),
            registry=r,
        )
        self._outbox = Gauge(
            "afterglow_outbox_pending",
            "Outbox rows not yet relayed to the bus",
            ("service",),
            registry=r,
        )

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "other"
        self._http.labels(self.service, method, route, str(status)).observe(seconds)

    def produced(self, topic: str, count: int) -> None:
        self._produced.labels(self.service, topic).inc(count)

    def consumed(self, topic: str, group: str, count: int) -> None:
        self._consumed.labels(self.service, topic, group).inc(count)

    def handler_failed(self, topic: str, group: str) -> None:
        self._failures.labels(self.service, topic, group).inc()

    def handler_seconds(self, topic: str, group: str, seconds: float) -> None:
        self._handler_seconds.labels(self.service, topic, group).observe(seconds)

    def lag(self, topic: str, group: str, partition: int, lag: int) -> None:
        self._lag.labels(self.service, topic, group, str(partition)).set(lag)

    def dlq(self, topic: str, reason: str, count: int = 1) -> None:
        self._dlq.labels(self.service, topic, reason).inc(count)

    def outbox_pending(self, n: int) -> None:
        self._outbox.labels(self.service).set(n)


def route_template(scope: Scope, outer_root_path: str = "") -> str:
    """The matched route's path template, or `unmatched`.

    FastAPI 0.163 includes routers lazily: `scope["route"]` is the route as
    declared, without the prefixes of the routers it was included through; the
    full template is on FastAPI's effective route context (not public API,
    hence the fallbacks; tests/unit/test_observability.py pins the behaviour).
    """
    route = scope.get("route")
    if route is None:
        return UNMATCHED
    fastapi_scope: Any = scope.get("fastapi")
    context = (
        fastapi_scope.get("effective_route_context") if isinstance(fastapi_scope, dict) else None
    )
    template = getattr(context, "path_format", None)
    if getattr(context, "original_route", None) is not route or not isinstance(template, str):
        template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return UNMATCHED
    mount = str(scope.get("root_path", "")).removeprefix(outer_root_path)
    return mount + template


class PrometheusMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        outer_root_path = str(scope.get("root_path", ""))
        status = 500
        started = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_request(
                scope["method"],
                route_template(scope, outer_root_path),
                status,
                time.perf_counter() - started,
            )


def metrics_response(metrics: ServiceMetrics) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
