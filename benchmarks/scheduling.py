"""Scheduling throughput on PostgreSQL and Kafka: plan N participants x 5 waves, relay the
touch.planned events, then dispatch a day of due touches (the launch wave of promotions that
ended across one day) on a clock that plays the day in `--seconds`.

    python -m benchmarks.scheduling [--participants 1000000] [--rate 10000] [--batch 1000]

Needs AFTERGLOW_DATABASE_URL (PostgreSQL) and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (`make up`).
Creates and drops a database of its own. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from services.scheduling import dispatcher, planning, store
from services.scheduling.config import SchedulingSettings
from services.scheduling.state import stop_dispatchers
from shared.bus import Message
from shared.bus.kafka import KafkaBus
from shared.db import Database
from shared.events import AudienceMemberResolved, Event, SegmentSnapshot, TouchDue
from shared.migrations import upgrade_async
from shared.observability import ServiceMetrics
from shared.outbox import Outbox
from shared.service import ServiceContext, all_topics
from shared.settings import ClockKind, Settings

DAY_START = datetime(2026, 3, 8, 0, 0, tzinfo=UTC)
CONSENT = {"sms": True, "email": True, "push": True}
CHUNK = 500


class FastClock:
    """Wall time sped up: one benchmark day lasts `seconds` of wall time."""

    kind = ClockKind.MANUAL

    def __init__(self, start: datetime, speed: float) -> None:
        self.start = start
        self.speed = speed
        self.wall0 = time.time()

    def begin(self, start: datetime) -> None:
        self.start, self.wall0 = start, time.time()

    def now(self) -> datetime:
        # Stops an hour after the benchmark day: the later waves stay out of the figures.
        played = self.start + timedelta(seconds=(time.time() - self.wall0) * self.speed)
        return min(played, DAY_START + timedelta(days=1, hours=1))

    def wall_of(self, at: datetime) -> float:
        return self.wall0 + (at - self.start).total_seconds() / self.speed

    async def sleep_until(self, when: datetime, *, max_wait_s: float) -> None:
        delay = (when - self.now()).total_seconds() / self.speed
        if delay > 0 and max_wait_s > 0:
            await asyncio.sleep(min(delay, max_wait_s))


def zone_for(hour: int) -> str:
    """A fixed-offset zone where `hour` UTC is around noon, so quiet hours never bite."""
    offset = 12 - hour
    if offset == 0:
        return "UTC"
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"


def members(first: int, count: int, total: int) -> list[Event[Any]]:
    out = []
    for i in range(first, first + count):
        ended = DAY_START + timedelta(seconds=86400 * i / total)
        data = AudienceMemberResolved(
            user_id=f"u-{i:08d}",
            promotion_id=f"bench-{i % 24:02d}",
            ended_at=ended,
            timezone=zone_for(ended.hour),
            consent=CONSENT,
            segment=SegmentSnapshot(channel_order=["push", "sms"]),
        )
        out.append(
            Event[Any](
                id=str(uuid.uuid4()), source="bench", type=data.event_type(), time=ended, data=data
            )
        )
    return out


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def run(args: argparse.Namespace) -> None:
    base = os.environ.get("AFTERGLOW_DATABASE_URL", "")
    bootstrap = os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", "")
    if not base.startswith("postgresql") or not bootstrap:
        raise SystemExit("set AFTERGLOW_DATABASE_URL (PostgreSQL) and the Kafka servers: make up")
    name = f"bench_sched_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        await bench(args, url, bootstrap)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


async def bench(args: argparse.Namespace, url: str, bootstrap: str) -> None:
    n = args.participants
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    settings = Settings(database_url=url, kafka_bootstrap_servers=bootstrap, topic_prefix=prefix)
    await upgrade_async(url, "scheduling")
    db = Database(url, "scheduling", pool_size=10)
    await db.start()
    metrics = ServiceMetrics("scheduling-bench")
    bus = KafkaBus(bootstrap, client_id="bench-scheduling", partitions=8, linger_ms=5)
    await bus.start()
    await bus.ensure_topics(all_topics(settings))
    outbox = Outbox(
        db,
        store.outbox,
        bus,
        source="afterglow/scheduling",
        topic_name=settings.topic,
        lanes=8,
        batch=2000,
        poll_s=0.05,
    )
    due_total = 0
    rate = float(args.rate)
    clock = FastClock(DAY_START, 1.0)
    ctx = ServiceContext(
        name="scheduling",
        settings=settings,
        db=db,
        bus=bus,
        clock=clock,  # type: ignore[arg-type]
        outbox=outbox,
        metrics=metrics,
        registry=__import__("shared.events").events.default_registry(),
    )
    try:
        # -- planning ------------------------------------------------------------------
        # As the Kafka consumer does: each partition's batches in their own task.
        starts = iter(range(0, n, CHUNK))

        async def plan_partition() -> None:
            for first in starts:
                await planning.on_audience_members(ctx, members(first, min(CHUNK, n - first), n))

        started = time.perf_counter()
        await asyncio.gather(*(plan_partition() for _ in range(args.partitions)))
        plan_s = time.perf_counter() - started
        async with db.connect() as conn:
            planned = int(await conn.scalar(select(func.count()).select_from(store.touches)) or 0)
            due_total = int(
                await conn.scalar(
                    select(func.count()).where(
                        store.touches.c.status == "planned",
                        store.touches.c.due_at < DAY_START + timedelta(days=1),
                    )
                )
                or 0
            )
            backlog = await outbox.pending()
        print(f"scheduling benchmark: {n:,} participants, PostgreSQL + Kafka, one process")
        print(
            f"  planned     {planned:>10,} touches in {plan_s:6.1f} s = {planned / plan_s:>9,.0f}/s"
        )

        latencies: list[float] = []
        due_type = TouchDue.event_type().encode()

        async def observe(batch: Sequence[Message]) -> None:
            received = time.time()
            seen[0] += len(batch)
            for message in batch:
                if due_type not in message.value[:400]:
                    continue
                body = orjson.loads(message.value)
                at = datetime.fromisoformat(body["data"]["due_at"])
                latencies.append(received - clock.wall_of(at))
                arrivals.append(received)

        arrivals: list[float] = []
        seen = [0]
        consumer = bus.consumer(
            f"bench-{prefix}", [settings.topic("touches")], observe, max_batch=2000
        )
        await consumer.start()
        # -- relaying the touch.planned events ----------------------------------------
        started = time.perf_counter()
        while await outbox.relay_once():
            pass
        relay_s = time.perf_counter() - started
        print(
            f"  relayed     {backlog:>10,} events  in {relay_s:6.1f} s = "
            f"{backlog / relay_s:>9,.0f}/s (touch.planned to Kafka)"
        )

        while seen[0] < backlog:  # noqa: ASYNC110 - the consumer counts, nobody signals
            await asyncio.sleep(0.1)
        seconds = due_total / rate
        clock.speed = 86400 / seconds
        # -- dispatching one day ------------------------------------------------------
        await outbox.start()
        clock.begin(DAY_START)
        config = SchedulingSettings(dispatch_batch=args.batch, dispatch_idle_s=0.05)
        tasks = [asyncio.create_task(dispatcher.run(ctx, config)) for _ in range(args.dispatchers)]
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        while True:  # until no touch.due arrived for 2 s
            before = len(latencies)
            await asyncio.sleep(2)
            if len(latencies) == before:
                break
        dispatch_s = (max(arrivals) - min(arrivals)) if len(arrivals) > 1 else float("nan")
        del started
        await stop_dispatchers(ctx)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with db.connect() as conn:
            rows = (
                await conn.execute(
                    select(store.touches.c.status, store.touches.c.reason, func.count())
                    .where(store.touches.c.due_at < DAY_START + timedelta(days=1))
                    .group_by(store.touches.c.status, store.touches.c.reason)
                )
            ).all()
        await consumer.stop()
        counts = {f"{s}:{r}" if r else s: int(c) for s, r, c in rows}
        sent = len(latencies)
        print(
            f"  due today   {due_total:>10,} touches; the day played in {seconds:.0f} s "
            f"({rate:,.0f} due/s)"
        )
        print(
            f"  dispatched  {sent:>10,} touch.due in {dispatch_s:6.1f} s = "
            f"{sent / dispatch_s:>9,.0f}/s (caps checked) {counts}"
        )
        print(
            f"  due -> touch.due on Kafka: p50 {percentile(latencies, 0.5) * 1000:,.0f} ms, "
            f"p99 {percentile(latencies, 0.99) * 1000:,.0f} ms, "
            f"max {max(latencies or [0]) * 1000:,.0f} ms"
        )
    finally:
        await outbox.stop(timeout_s=2)
        await bus.stop()
        await db.stop()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS    {peak_mb:>10,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--participants", type=int, default=1_000_000)
    parser.add_argument(
        "--rate", type=float, default=10_000, help="due touches per second while the day plays"
    )
    parser.add_argument(
        "--batch", type=int, default=1000, help="touches claimed per dispatch transaction"
    )
    parser.add_argument(
        "--dispatchers", type=int, default=2, help="dispatcher loops in the process"
    )
    parser.add_argument(
        "--partitions", type=int, default=4, help="audience batches planned concurrently"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
