"""Composition root of the metrics service."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from services.metrics import api, handlers, store
from shared.consumer import EventHandler
from shared.events import DeliverySent, EventData, TouchPlanned
from shared.service import ServiceContext, ServiceSpec


def event_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
    count = functools.partial(handlers.on_touch_event, ctx)
    return {TouchPlanned: count, DeliverySent: count}


SPEC = ServiceSpec(
    name="metrics",
    description="Funnel, attribution, experiments, alerts and the dashboard.",
    metadata=store.metadata,
    outbox_table=store.outbox,
    routers=(api.router,),
    handlers=event_handlers,
)

create_app = SPEC.create_app
