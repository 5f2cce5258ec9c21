"""Composition root of the segmentation service."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from services.segmentation import api, handlers, store
from services.segmentation.config import SegmentationConfig, load_config
from shared.consumer import BatchEventHandler, EventHandler
from shared.events import ActivityRecorded, EngagementRecorded, EventData, PromotionEnded
from shared.service import ServiceContext, ServiceSpec, Worker


def build_spec(config: SegmentationConfig | None = None) -> ServiceSpec:
    """The service; `config` None reads `AFTERGLOW_SEGMENTATION_CONFIG` when the app starts."""

    def configure(ctx: ServiceContext) -> None:
        if handlers.CONFIG_KEY not in ctx.extras:
            ctx.extras[handlers.CONFIG_KEY] = config or load_config()

    def event_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
        configure(ctx)
        return {PromotionEnded: functools.partial(handlers.on_promotion_ended, ctx)}

    def batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
        configure(ctx)
        return {
            ActivityRecorded: functools.partial(handlers.on_activities, ctx),
            EngagementRecorded: functools.partial(handlers.on_engagements, ctx),
        }

    def workers(ctx: ServiceContext) -> Sequence[Worker]:
        configure(ctx)
        return (functools.partial(handlers.rescoring_loop, ctx),)

    return ServiceSpec(
        name="segmentation",
        description="User profiles, consent, activities, tiers and audiences.",
        metadata=store.metadata,
        outbox_table=store.outbox,
        routers=(api.router,),
        handlers=event_handlers,
        batch_handlers=batch_handlers,
        workers=workers,
        skip=handlers.own_activities,
    )


SPEC = build_spec()

create_app = SPEC.create_app
