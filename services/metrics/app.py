"""Composition root of the metrics service."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from services.metrics import api, handlers, store
from services.metrics.config import MetricsSettings
from shared.consumer import BatchEventHandler
from shared.events import EventData
from shared.service import ServiceContext, ServiceSpec


def batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
    ctx.extras["metrics_settings"] = MetricsSettings()
    count = functools.partial(handlers.on_events, ctx)
    return dict.fromkeys(handlers.HANDLED, count)


SPEC = ServiceSpec(
    name="metrics",
    description="Funnel, attribution, experiments, alerts and the dashboard.",
    metadata=store.metadata,
    outbox_table=store.outbox,
    routers=(api.router,),
    batch_handlers=batch_handlers,
)

create_app = SPEC.create_app
