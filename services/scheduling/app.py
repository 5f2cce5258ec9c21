"""Composition root of the scheduling service."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from services.scheduling import api, handlers, store
from shared.consumer import EventHandler
from shared.events import AudienceMemberResolved, DeliveryFailed, DeliverySent, EventData
from shared.service import ServiceContext, ServiceSpec


def event_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
    outcome = functools.partial(handlers.on_delivery_outcome, ctx)
    return {
        AudienceMemberResolved: functools.partial(handlers.on_audience_member, ctx),
        DeliverySent: outcome,
        DeliveryFailed: outcome,
    }


SPEC = ServiceSpec(
    name="scheduling",
    description="Policies, waves, caps, fatigue and durable timers.",
    metadata=store.metadata,
    outbox_table=store.outbox,
    routers=(api.router,),
    handlers=event_handlers,
)

create_app = SPEC.create_app
