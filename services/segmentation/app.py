"""Composition root of the segmentation service."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from services.segmentation import api, handlers, store
from shared.consumer import EventHandler
from shared.events import EventData, PromotionEnded
from shared.service import ServiceContext, ServiceSpec


def event_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
    return {PromotionEnded: functools.partial(handlers.on_promotion_ended, ctx)}


SPEC = ServiceSpec(
    name="segmentation",
    description="User profiles, consent, activities, tiers and audiences.",
    metadata=store.metadata,
    outbox_table=store.outbox,
    routers=(api.router,),
    handlers=event_handlers,
)

create_app = SPEC.create_app
