"""Composition root of the metrics service."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from services.metrics import alerts, api, dashboard, handlers, store
from services.metrics.config import MetricsSettings
from shared.consumer import BatchEventHandler
from shared.events import EventData
from shared.service import ServiceContext, ServiceSpec, Worker


def batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
    ctx.extras["metrics_settings"] = MetricsSettings()
    count = functools.partial(handlers.on_events, ctx)
    return dict.fromkeys(handlers.HANDLED, count)


def workers(ctx: ServiceContext) -> Sequence[Worker]:
    settings = ctx.extras.setdefault("metrics_settings", MetricsSettings())
    return (functools.partial(alerts.run, ctx, settings),)


SPEC = ServiceSpec(
    name="metrics",
    description="Funnel, attribution, experiments, alerts and the dashboard.",
    metadata=store.metadata,
    outbox_table=store.outbox,
    routers=(api.router, dashboard.router),
    batch_handlers=batch_handlers,
    workers=workers,
)

create_app = SPEC.create_app
