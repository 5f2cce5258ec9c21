"""The composition root every service shares: settings, database, bus, clock,
outbox, consumers and background loops are opened in the lifespan and closed
there, never at import. A service describes itself with a `ServiceSpec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import MetaData, Table

from shared.auth import install_auth
from shared.bus import Bus, Consumer, Message
from shared.bus.memory import InProcessBus
from shared.clock import Clock, clock_router, make_clock
from shared.consumer import BatchEventHandler, EventConsumer, EventHandler
from shared.db import Database
from shared.events import TOPICS, EventData, Registry, default_registry, dlq_topic
from shared.logs import configure_logging
from shared.migrations import upgrade_async
from shared.observability import PrometheusMiddleware, ServiceMetrics, metrics_response
from shared.outbox import Outbox
from shared.problems import Problem, install_problem_handlers
from shared.settings import Profile, Settings

log = logging.getLogger(__name__)

Worker = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class ServiceContext:
    """Everything a handler or route of one service may touch."""

    name: str
    settings: Settings
    db: Database
    bus: Bus
    clock: Clock
    outbox: Outbox
    metrics: ServiceMetrics
    registry: Registry
    extras: dict[str, Any] = field(default_factory=dict)

    def topic(self, name: str) -> str:
        return self.settings.topic(name)


def _no_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
    return {}


def _no_batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
    return {}


def _no_workers(ctx: ServiceContext) -> Sequence[Worker]:
    return ()


def _skip_nothing(ctx: ServiceContext) -> Callable[[Message], bool] | None:
    return None


def tune_gc(threshold0: int) -> None:
    """Collect the youngest generation every `threshold0` allocations (never less often
    than already set; 0 leaves it). For a service that keeps thousands of objects in flight
    (tasks, rows, messages, a batch's events): they survive each young collection, so
    Python's default of 700 re-scans them over and over. Garbage cycles are still
    collected, later. Figures: delivery's `gc_threshold`, scheduling's `gc_threshold`.
    """
    if threshold0 <= 0:
        return
    current = gc.get_threshold()
    if current[0] < threshold0:
        gc.set_threshold(threshold0, *current[1:])


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    description: str
    metadata: MetaData
    outbox_table: Table
    routers: Sequence[APIRouter] = ()
    handlers: Callable[[ServiceContext], Mapping[type[EventData], EventHandler]] = _no_handlers
    batch_handlers: Callable[[ServiceContext], Mapping[type[EventData], BatchEventHandler]] = (
        _no_batch_handlers
    )
    workers: Callable[[ServiceContext], Sequence[Worker]] = _no_workers
    # Consumed messages to pass by without decoding them (see EventConsumer's `skip`).
    skip: Callable[[ServiceContext], Callable[[Message], bool] | None] = _skip_nothing
    # Most messages handed to the handlers per poll: a service whose cost is mostly per
    # transaction (one per batch) counts more per second with larger batches.
    consumer_max_batch: int = 500

    def create_app(
        self,
        settings: Settings | None = None,
        *,
        bus: Bus | None = None,
        clock: Clock | None = None,
    ) -> FastAPI:
        return create_service_app(self, settings, bus=bus, clock=clock)


async def get_context(request: Request) -> ServiceContext:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    ctx: ServiceContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        raise Problem(status=503, title="Service starting", detail="the service is not ready yet")
    return ctx


Ctx = Annotated[ServiceContext, Depends(get_context)]


def make_bus(settings: Settings, client_id: str, metrics: ServiceMetrics) -> Bus:
    if settings.kafka_bootstrap_servers:
        from shared.bus.kafka import KafkaBus

        return KafkaBus(
            settings.kafka_bootstrap_servers,
            client_id=client_id,
            partitions=settings.kafka_partitions,
            linger_ms=settings.kafka_linger_ms,
            send_timeout_s=settings.kafka_send_timeout_s,
            observer=metrics,
        )
    if settings.profile is Profile.PRODUCTION:
        raise RuntimeError("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS is required in production")
    log.warning(
        "no Kafka configured: this service runs on its own in-process bus and sees no other "
        "service's events (use `afterglow demo` for the embedded mode)"
    )
    return InProcessBus(partitions=settings.kafka_partitions, observer=metrics)


def all_topics(settings: Settings) -> list[str]:
    names = [settings.topic(t) for t in TOPICS]
    return names + [dlq_topic(t) for t in names]


def create_service_app(
    spec: ServiceSpec,
    settings: Settings | None = None,
    *,
    bus: Bus | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """Build one service's app; pass `bus`/`clock` to share them (embedded mode, tests)."""
    settings = settings or Settings()
    metrics = ServiceMetrics(spec.name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_level, settings.log_format, service=spec.name)
        db = Database(settings.database_url, spec.name, pool_size=settings.db_pool_size)
        if settings.auto_migrate:
            await upgrade_async(settings.database_url, spec.name)
        await db.start()
        await db.warn_if_slow_collation()
        owned_bus = bus is None
        the_bus = bus or make_bus(settings, f"afterglow-{spec.name}", metrics)
        the_clock = clock or app.state.clock
        if owned_bus:
            await the_bus.start()
        await the_bus.ensure_topics(all_topics(settings))
        outbox = Outbox(
            db,
            spec.outbox_table,
            the_bus,
            source=f"afterglow/{spec.name}",
            topic_name=settings.topic,
            lanes=settings.outbox_lanes,
            batch=settings.outbox_batch,
            poll_s=settings.outbox_poll_s,
            vacuum_rows=settings.outbox_vacuum_rows,
        )
        ctx = ServiceContext(
            name=spec.name,
            settings=settings,
            db=db,
            bus=the_bus,
            clock=the_clock,
            outbox=outbox,
            metrics=metrics,
            registry=default_registry(),
        )
        consumer: Consumer | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            await outbox.start()
            handlers = spec.handlers(ctx)
            batch_handlers = spec.batch_handlers(ctx)
            if handlers or batch_handlers:
                runner = EventConsumer(
                    service=spec.name,
                    group=f"{settings.topic_prefix}afterglow-{spec.name}",
                    bus=the_bus,
                    registry=ctx.registry,
                    handlers=handlers,
                    batch_handlers=batch_handlers,
                    topic_name=settings.topic,
                    sink=metrics,
                    max_attempts=settings.consumer_max_attempts,
                    skip=spec.skip(ctx),
                )
                consumer = the_bus.consumer(
                    runner.group, runner.topics, runner, max_batch=spec.consumer_max_batch
                )
                await consumer.start()
            tasks.append(asyncio.create_task(_watch_outbox(ctx), name=f"{spec.name}-outbox-gauge"))
            for worker in spec.workers(ctx):
                tasks.append(asyncio.create_task(worker(), name=f"{spec.name}-worker"))
            app.state.ctx = ctx
            # What startup made (modules, schemas, the app) lives as long as the process: out
            # of the collector's sight, a full collection scans only the objects made since.
            gc.freeze()
            log.info("service started", extra={"service": spec.name})
            yield
        finally:
            app.state.ctx = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if consumer is not None:
                await consumer.stop()
            await outbox.stop()
            if owned_bus:
                await the_bus.stop()
            await db.stop()
            log.info("service stopped", extra={"service": spec.name})

    app = FastAPI(
        title=f"Afterglow {spec.name}",
        description=spec.description,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_auth(app, settings.effective_tokens())
    app.state.clock = clock or make_clock(settings)
    app.state.metrics = metrics
    app.state.ctx = None
    install_problem_handlers(app)
    app.add_middleware(PrometheusMiddleware, metrics=metrics)
    app.include_router(_operations_router(spec.name))
    app.include_router(clock_router(app.state.clock, profile=settings.profile))
    for router in spec.routers:
        app.include_router(router)
    return app


OUTBOX_GAUGE_INTERVAL_S = 10.0


async def _watch_outbox(ctx: ServiceContext) -> None:
    """Keep `afterglow_outbox_pending` current: a growing backlog means the bus is refusing."""
    while True:
        try:
            ctx.metrics.outbox_pending(await ctx.outbox.pending())
        except Exception:
            log.warning("could not count the outbox backlog", exc_info=True)
        await asyncio.sleep(OUTBOX_GAUGE_INTERVAL_S)


def _operations_router(service: str) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok", "service": service}

    @router.get("/readyz")
    async def readyz(request: Request) -> Response:
        """The database and the bus answer."""
        ctx: ServiceContext | None = request.app.state.ctx
        checks = {"database": False, "bus": False}
        if ctx is not None:
            checks["database"] = await ctx.db.ping()
            checks["bus"] = await ctx.bus.ping()
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not ready", "service": service, "checks": checks}
        if ready:
            return JSONResponse(body)
        failing = ", ".join(name for name, ok in checks.items() if not ok)
        return Problem(
            status=503,
            title="Not ready",
            detail=f"not reachable: {failing}",
            checks=checks,
        ).to_response()

    @router.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        return metrics_response(request.app.state.metrics)

    return router
