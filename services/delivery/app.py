"""Composition root of the delivery service."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from services.delivery import api, handlers, store
from services.delivery.config import DeliveryConfig, load_config, resolve
from services.delivery.runtime import DeliveryRuntime
from shared.consumer import BatchEventHandler, EventHandler
from shared.events import EventData, TouchDue, UserErased, UserUpdated
from shared.service import ServiceContext, ServiceSpec, Worker


def make_spec(config: DeliveryConfig | None = None) -> ServiceSpec:
    """The service; `config` replaces AFTERGLOW_DELIVERY_CONFIG (tests, benchmarks, demo)."""

    def runtime(ctx: ServiceContext) -> DeliveryRuntime:
        # Built inside the lifespan (the spec's callables run there), once per start.
        rt: DeliveryRuntime | None = ctx.extras.get("delivery")
        if rt is None:
            resolved = (
                resolve(config, ctx.settings) if config is not None else load_config(ctx.settings)
            )
            rt = ctx.extras["delivery"] = DeliveryRuntime(resolved, ctx.metrics.registry)
        return rt

    def event_handlers(ctx: ServiceContext) -> Mapping[type[EventData], EventHandler]:
        rt = runtime(ctx)
        return {
            UserUpdated: functools.partial(handlers.on_user_updated, ctx),
            UserErased: functools.partial(handlers.on_user_erased, ctx, rt),
        }

    def batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
        return {TouchDue: functools.partial(handlers.on_touches_due, ctx, runtime(ctx))}

    def workers(ctx: ServiceContext) -> Sequence[Worker]:
        return (runtime(ctx).run,)

    return ServiceSpec(
        name="delivery",
        description="Channels, provider adapters, retries, budget and receipts.",
        metadata=store.metadata,
        outbox_table=store.outbox,
        routers=(api.router,),
        handlers=event_handlers,
        batch_handlers=batch_handlers,
        workers=workers,
    )


SPEC = make_spec()

create_app = SPEC.create_app
