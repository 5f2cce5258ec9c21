"""`bus_factory`: the same contract tests against the in-process bus and a real Kafka broker."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.bus import Backoff, Bus
from shared.bus.memory import InProcessBus

PARTITIONS = 4
# Short, so that redeliveries happen within a test's time budget.
TEST_BACKOFF = Backoff(initial_s=0.05, maximum_s=0.5)


class BusFactory:
    """Makes started buses of one kind and stops them all when the test ends.

    Keyword options apply to the Kafka bus only (the in-process bus has no timeouts).
    Consumers that must share a group are made from the same bus: the in-process
    bus is its own broker.
    """

    def __init__(self, kind: str, bootstrap: str | None, unique: str) -> None:
        self.kind = kind
        self.bootstrap = bootstrap
        self.unique = unique
        self._buses: list[Bus] = []

    @property
    def is_kafka(self) -> bool:
        return self.kind == "kafka"

    async def __call__(self, **kafka_options: Any) -> Bus:
        bus: Bus
        if self.kind == "memory":
            bus = InProcessBus(partitions=PARTITIONS, backoff=TEST_BACKOFF)
        else:
            from shared.bus.kafka import KafkaBus

            assert self.bootstrap is not None
            options: dict[str, Any] = {
                "client_id": f"contract-{self.unique}",
                "partitions": PARTITIONS,
                "backoff": TEST_BACKOFF,
                "send_timeout_s": 10.0,
                "start_timeout_s": 15.0,
                "drain_timeout_s": 5.0,
            }
            options.update(kafka_options)
            bus = KafkaBus(self.bootstrap, **options)
        await bus.start()
        self._buses.append(bus)
        return bus

    async def close(self) -> None:
        for bus in reversed(self._buses):
            with contextlib.suppress(Exception):
                await bus.stop()


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def bus_factory(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[BusFactory]:
    bootstrap = None
    if request.param == "kafka":
        # Skips locally, fails with CI=true, when no broker is configured or answering.
        bootstrap = request.getfixturevalue("kafka_bootstrap")
    factory = BusFactory(request.param, bootstrap, unique)
    try:
        yield factory
    finally:
        await factory.close()
