"""`InProcessBus.drained()`: what the embedded demo waits on between clock steps. It returns
once every group has committed all it reads, a failed batch included, and not before."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from shared.bus import Message, OutMessage
from shared.bus.base import Backoff
from shared.bus.memory import InProcessBus

pytestmark = pytest.mark.timeout(30)


async def test_drained_waits_for_the_last_commit_of_every_group() -> None:
    bus = InProcessBus(partitions=2, backoff=Backoff(initial_s=0.01))
    await bus.start()
    await bus.ensure_topics(["t"])
    release = asyncio.Event()
    failed_once: list[bool] = []
    seen: dict[str, int] = {"slow": 0, "flaky": 0}

    async def slow(batch: Sequence[Message]) -> None:
        await release.wait()
        seen["slow"] += len(batch)

    async def flaky(batch: Sequence[Message]) -> None:
        if not failed_once:
            failed_once.append(True)
            raise RuntimeError("first try fails: the batch is delivered again")
        seen["flaky"] += len(batch)

    consumers = [bus.consumer("slow", ["t"], slow), bus.consumer("flaky", ["t"], flaky)]
    try:
        await asyncio.wait_for(bus.drained(), 1)  # nothing published: drained at once
        for consumer in consumers:
            await consumer.start()
        await bus.publish([OutMessage("t", f"k{i}", b"v") for i in range(10)])
        waiting = asyncio.ensure_future(bus.drained())
        await asyncio.sleep(0.1)
        assert not waiting.done() and bus.backlog() > 0  # "slow" holds its batches
        release.set()
        await asyncio.wait_for(waiting, 5)
        assert bus.backlog() == 0 and seen == {"slow": 10, "flaky": 10} and failed_once
    finally:
        await bus.stop()
