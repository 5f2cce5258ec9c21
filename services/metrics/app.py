"""Composition root of the metrics service."""

from __future__ import annotations

import functools
import gc
from collections.abc import Mapping, Sequence

from services.metrics import alerts, api, dashboard, handlers, retention, store
from services.metrics.config import MetricsSettings
from shared.consumer import BatchEventHandler
from shared.events import EventData
from shared.service import ServiceContext, ServiceSpec, Worker

# Young-generation collections every this many net allocations instead of CPython's 700.
# Counting allocates a few dicts and tuples per event that all die with their batch; at 700
# the cyclic collector ran every few events and took a third of the CPU per event (measured
# on the benchmark's stream: ~46 -> ~30 us per event decoded and counted). A collection then
# scans at most this many young objects, a few milliseconds.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """Collect young objects less often in this process (see GC_YOUNG_THRESHOLD)."""
    young, *older = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, *older)


def batch_handlers(ctx: ServiceContext) -> Mapping[type[EventData], BatchEventHandler]:
    ctx.extras["metrics_settings"] = MetricsSettings()
    tune_gc()
    count = functools.partial(handlers.on_events, ctx)
    return dict.fromkeys(handlers.HANDLED, count)


def workers(ctx: ServiceContext) -> Sequence[Worker]:
    settings = ctx.extras.setdefault("metrics_settings", MetricsSettings())
    return (
        functools.partial(alerts.run, ctx, settings),
        functools.partial(retention.run, ctx, settings),
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
