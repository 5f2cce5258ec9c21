"""Metrics' group commit: concurrent batches counted together, a bad batch fails alone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from services.metrics.handlers import Combiner
from shared.bus import Message
from shared.consumer import EventConsumer
from shared.events import (
    DeliverySent,
    Event,
    EventData,
    TouchPlanned,
    default_registry,
    encode,
)


async def test_concurrent_batches_share_one_run_and_a_bad_one_fails_alone() -> None:
    runs: list[list[Any]] = []
    gate = asyncio.Event()

    async def run(events: list[Any]) -> None:
        runs.append(list(events))
        if len(runs) == 1:
            await gate.wait()  # the first run holds the lock while the others queue up
        if "bad" in events:
            raise ValueError("bad event")

    combiner = Combiner(run)
    first = asyncio.create_task(combiner.submit(["a"]))
    await asyncio.sleep(0)
    others = [asyncio.create_task(combiner.submit([x])) for x in ("b", "bad", "c")]
    await asyncio.sleep(0)
    gate.set()
    await first
    results = await asyncio.gather(*others, return_exceptions=True)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], ValueError)
    # a alone; then b, bad, c together (failed); then each alone.
    assert runs == [["a"], ["b", "bad", "c"], ["b"], ["bad"], ["c"]]


async def test_a_transaction_takes_the_first_batches_up_to_its_size_and_the_rest_follow() -> None:
    runs: list[list[Any]] = []
    gate = asyncio.Event()

    async def run(events: list[Any]) -> None:
        runs.append(list(events))
        if len(runs) == 1:
            await gate.wait()

    combiner = Combiner(run, max_events=3)
    first = asyncio.create_task(combiner.submit(["a"]))
    await asyncio.sleep(0)
    batches = (["b", "c"], ["d"], ["e", "f", "g", "h"], ["i"])
    others = [asyncio.create_task(combiner.submit(b)) for b in batches]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *others)
    # Whole batches, in order, until 3 events are reached; a larger batch goes alone.
    assert runs == [["a"], ["b", "c", "d"], ["e", "f", "g", "h"], ["i"]]


async def test_one_batch_handler_for_several_types_gets_them_in_one_call() -> None:
    calls: list[list[str]] = []

    async def handler(events: list[Event[Any]]) -> None:
        calls.append([e.type for e in events])

    consumer = EventConsumer(
        service="metrics",
        group="g",
        bus=None,  # type: ignore[arg-type]  # nothing is dead-lettered here
        registry=default_registry(),
        batch_handlers=dict.fromkeys((TouchPlanned, DeliverySent), handler),
    )
    common: dict[str, Any] = {
        "touch_id": "t-1",
        "user_id": "u-1",
        "promotion_id": "p-1",
        "wave": "launch",
    }
    at = datetime(2026, 1, 1, tzinfo=UTC)
    data: list[EventData] = [
        TouchPlanned(**common, due_at=at),
        DeliverySent(**common, channel="email", at=at),
        TouchPlanned(**{**common, "touch_id": "t-2"}, due_at=at),
    ]
    messages = [
        Message(
            topic=d.topic, key="u-1", value=encode(d, source="test", time=at), partition=0, offset=i
        )
        for i, d in enumerate(data)
    ]
    await consumer(messages)
    assert len(calls) == 1 and len(calls[0]) == 3


async def test_lanes_count_at_once_and_a_caller_waits_for_all_of_its_lanes() -> None:
    started: list[list[str]] = []
    both_running = asyncio.Event()
    release = asyncio.Event()

    async def run(events: list[Any]) -> None:
        started.append(list(events))
        if len(started) == 2:
            both_running.set()
        await release.wait()
        if "bad0" in events:
            raise ValueError("bad event")

    # Even-numbered events go to lane 0, odd ones to lane 1.
    combiner = Combiner(run, lanes=2, lane_of=lambda e: int(e[-1]) % 2)
    caller = asyncio.create_task(combiner.submit(["e0", "e1", "e2", "e3"]))
    # The two lanes' transactions run at the same time: neither waits for the other.
    await asyncio.wait_for(both_running.wait(), timeout=5)
    assert sorted(started) == [["e0", "e2"], ["e1", "e3"]]
    assert not caller.done()
    release.set()
    await caller

    # A failure in one lane fails the caller, once the other lane has finished too.
    started.clear()
    release.clear()
    both_running.clear()
    failing = asyncio.create_task(combiner.submit(["bad0", "ok1"]))
    await asyncio.wait_for(both_running.wait(), timeout=5)
    release.set()
    with pytest.raises(ValueError, match="bad event"):
        await failing
    assert sorted(started) == [["bad0"], ["ok1"]]
