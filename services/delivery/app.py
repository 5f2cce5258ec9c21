"""Composition root of the delivery service."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from services.delivery import api, handlers, store
from shared.consumer import EventHandler
from shared.events import EventData, TouchDue
from shared.service import ServiceContext, ServiceSpec


def event_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
    return {TouchDue: functools.partial(handlers.on_touch_due, ctx)}


SPEC = ServiceSpec(
    name="delivery",
    description="Channels, provider adapters, retries, budget and receipts.",
    metadata=store.metadata,
    outbox_table=store.outbox,
    routers=(api.router,),
    handlers=event_handlers,
)

create_app = SPEC.create_app
