"""Composition root of the metrics service."""

from __future__ import annotations

import asyncio
import functools
import gc
from collections.abc import Mapping, Sequence

from services.metrics import alerts, api, dashboard, handlers, retention, store
from services.metrics.config import MetricsSettings
from shared.consumer import BatchEventHandler
from shared.events import EventData
from shared.service import ServiceContext, ServiceSpec, Worker

# The cyclic garbage collector on a timer instead of every 700 allocations. Counting holds
# each batch's events, rows and touches (tens of objects per event) until the batch is
# committed, so an allocation-driven collection finds nearly all of them alive and walks them,
# young then middle-aged: about a third of the CPU per event (and still 14 us per event with
# collections every 50,000 allocations). Collected once a second, the objects of finished
# batches are already freed by reference counting and only those in hand are walked.
# Behind a backlog every partition has a batch in hand, so a young collection still walks
# tens of thousands of events (about 50 ms); once a second that was 4-5 us per event at
# 100,000 participants (none at 2,000, counted within the first second), while counting
# leaves next to no cyclic garbage (3,309 unreachable objects for 97,000 events counted):
# every 5 seconds.
GC_YOUNG_EVERY_S = 5.0
GC_MIDDLE_EVERY = 6  # young collections (30 s)
GC_FULL_EVERY = 36  # young collections (3 min)


async def collect_garbage() -> None:
    """Run the cyclic garbage collector on a timer while the service runs (see above); what the
    process holds once started (modules, schemas, the app) is left out of every collection."""
    gc.freeze()
    gc.disable()
    try:
        turns = 0
        while True:
            await asyncio.sleep(GC_YOUNG_EVERY_S)
            turns += 1
            if turns % GC_FULL_EVERY == 0:
                gc.collect(2)
            elif turns % GC_MIDDLE_EVERY == 0:
                gc.collect(1)
            else:
                gc.collect(0)
    finally:
        gc.enable()


def batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
    ctx.extras["metrics_settings"] = MetricsSettings()
    count = functools.partial(handlers.on_events, ctx)
    return dict.fromkeys(handlers.HANDLED, count)


def workers(ctx: ServiceContext) -> Sequence[Worker]:
    settings = ctx.extras.setdefault("metrics_settings", MetricsSettings())
    return (
        functools.partial(alerts.run, ctx, settings),
        functools.partial(retention.run, ctx, settings),
        collect_garbage,
    )


SPEC = ServiceSpec(
    name="metrics",
    description="Funnel, attribution, experiments, alerts and the dashboard.",
    metadata=store.metadata,
    outbox_table=store.outbox,
    routers=(api.router, dashboard.router),
    batch_handlers=batch_handlers,
    workers=workers,
    # Counting costs mostly per transaction and per row written, and a larger batch merges
    # more events into each aggregate row (events of a minute and dimensions, a touch's
    # planned and sent): 5,000 messages per poll instead of 500.
    consumer_max_batch=5000,
)

create_app = SPEC.create_app
