"""What delivery holds while it runs: one provider client per channel and its metrics."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.delivery.config import DeliveryConfig
from services.delivery.domain import ChannelTerms
from services.delivery.providers.client import ProviderClient
from services.delivery.providers.resilience import CircuitBreaker, CircuitState, Limiter
from shared.service import tune_gc

_CIRCUIT_VALUE = {CircuitState.CLOSED: 0.0, CircuitState.HALF_OPEN: 1.0, CircuitState.OPEN: 2.0}


class DeliveryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "afterglow_delivery_provider_calls_total",
            "Provider calls by channel and outcome.",
            ["channel", "outcome"],
            registry=registry,
        )
        self.call_seconds = Histogram(
            "afterglow_delivery_provider_call_seconds",
            "Duration of provider calls.",
            ["channel"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.outcomes = Counter(
            "afterglow_delivery_touches_total",
            "Touches settled by channel, status and reason.",
            ["channel", "status", "reason"],
            registry=registry,
        )
        self.settle_retries = Counter(
            "afterglow_delivery_settle_retries_total",
            "Rounds of provider answers that could not be written at once: retried, or "
            "given up (the batch is redelivered and its calls repeated).",
            ["outcome"],
            registry=registry,
        )
        self.circuit = Gauge(
            "afterglow_delivery_circuit_state",
            "Circuit breaker per channel: 0 closed, 1 half-open, 2 open.",
            ["channel"],
            registry=registry,
        )


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, DeliveryMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(registry: CollectorRegistry) -> DeliveryMetrics:
    """One set per registry: an app whose lifespan runs twice registers them once."""
    found = _metrics.get(registry)
    if found is None:
        found = _metrics[registry] = DeliveryMetrics(registry)
    return found


def _circuit_value(circuit: CircuitBreaker) -> Callable[[], float]:
    return lambda: _CIRCUIT_VALUE[circuit.state]


class DeliveryRuntime:
    """Provider clients are built when the service starts (in its lifespan) and closed by
    `run()`, the worker that lives as long as the service."""

    def __init__(self, config: DeliveryConfig, registry: CollectorRegistry) -> None:
        self.config = config
        tune_gc(config.gc_threshold)
        self.metrics = metrics_for(registry)
        self._call_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._outcome_children: dict[tuple[str, str, str], Any] = {}
        self.semaphore = Limiter(config.concurrency)
        # Users erased while this process runs: their pending sends stop between tries.
        self.erased: set[str] = set()
        # (promotion, channel) spend rows known to exist (committed; never deleted).
        self.spend_rows: set[tuple[str, str]] = set()
        self.providers: dict[str, ProviderClient] = {
            name: ProviderClient(
                name, channel, semaphore=self.semaphore, observe=self._observe_call
            )
            for name, channel in config.channels.items()
        }
        for name, provider in self.providers.items():
            provider.open()
            self.metrics.circuit.labels(name).set_function(_circuit_value(provider.circuit))
        self.terms: Mapping[str, ChannelTerms] = {
            name: ChannelTerms(
                configured=provider.configured,
                cost=config.channel(name).cost_of(name),
                budget=config.channel(name).budget_per_promotion,
                reserve_share=config.channel(name).reserve_share,
            )
            for name, provider in self.providers.items()
        }

    def _observe_call(self, channel: str, outcome: str, seconds: float) -> None:
        # Label children are cached: `labels()` costs more than the call it counts.
        key = (channel, outcome)
        children = self._call_children.get(key)
        if children is None:
            children = self._call_children[key] = (
                self.metrics.calls.labels(channel, outcome),
                self.metrics.call_seconds.labels(channel),
            )
        children[0].inc()
        children[1].observe(seconds)

    def count(self, channel: str, status: str, reason: str = "") -> None:
        """One touch settled: `afterglow_delivery_touches_total`."""
        key = (channel, status, reason)
        child = self._outcome_children.get(key)
        if child is None:
            child = self._outcome_children[key] = self.metrics.outcomes.labels(*key)
        child.inc()

    def settle_retry(self, outcome: str) -> None:
        """A round of answers not written at once: `retried` or `gave_up`."""
        self.metrics.settle_retries.labels(outcome).inc()

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()

    async def run(self) -> None:
        """Keep the clients open until the service stops."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()
