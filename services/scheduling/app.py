"""Composition root of the scheduling service."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from services.scheduling import api, dispatcher, handlers, planning, store
from services.scheduling.config import SchedulingSettings
from shared.consumer import BatchEventHandler, EventHandler
from shared.events import (
    AudienceMemberResolved,
    DeliveryFailed,
    DeliverySent,
    EngagementRecorded,
    EventData,
    PromotionCancelled,
    PromotionEnded,
    UserErased,
    UserUpdated,
)
from shared.service import ServiceContext, ServiceSpec, Worker, tune_gc


def event_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
    return {
        PromotionEnded: functools.partial(handlers.on_promotion_ended, ctx),
        PromotionCancelled: functools.partial(handlers.on_promotion_cancelled, ctx),
        UserUpdated: functools.partial(handlers.on_user_updated, ctx),
        UserErased: functools.partial(handlers.on_user_erased, ctx),
        EngagementRecorded: functools.partial(handlers.on_engagement, ctx),
    }


def batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
    outcomes = functools.partial(handlers.on_delivery_outcomes, ctx)
    return {
        AudienceMemberResolved: functools.partial(planning.on_audience_members, ctx),
        # Sent and failed in one call, in their order (see handlers.on_delivery_outcomes).
        DeliverySent: outcomes,
        DeliveryFailed: outcomes,
    }


def make_spec(config: SchedulingSettings | None = None) -> ServiceSpec:
    """The service; `config` overrides the AFTERGLOW_SCHEDULING_* environment (tests)."""

    def workers(ctx: ServiceContext) -> Sequence[Worker]:
        settings = config or SchedulingSettings()
        tune_gc(settings.gc_threshold)
        return [
            functools.partial(dispatcher.run, ctx, settings) for _ in range(settings.dispatchers)
        ]

    return ServiceSpec(
        name="scheduling",
        description="Policies, waves, caps, fatigue and durable timers.",
        metadata=store.metadata,
        outbox_table=store.outbox,
        routers=(api.router,),
        handlers=event_handlers,
        batch_handlers=batch_handlers,
        workers=workers,
    )


SPEC = make_spec()
create_app = SPEC.create_app
