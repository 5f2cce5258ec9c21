"""Scheduling throughput on PostgreSQL and Kafka: plan N participants x 5 waves, relay the
touch.planned events, then dispatch a day of due touches (the launch wave of 1,440 promotions,
one ending each minute of one day) on a clock that plays the day at `--rate` due touches per
second.

    python -m benchmarks.scheduling [--participants 1000000] [--rate 12000] [--batch 1000]
                                    [--replicas 2] [--plan-only] [--json PATH]

The promotions are ended first, as POST /v1/promotions/{id}/end does. Planning then runs in
`--replicas` processes (this module with `--replica I`), as the service scaled out: each
plans every R-th batch of 500 participants, which it decodes from the bytes segmentation
publishes, as its consumer would; `--replicas 1` plans in this process. The outbox relay and
the dispatchers run in this one process (the dispatch goal is for one process).
The touch.due events are observed on Kafka by another process (this module with
`--observe`), so that the measuring consumer does not take CPU from the process measured.
Latency runs from a touch's due time (its `due_at` on the benchmark's clock, mapped to wall
time) to the moment the observer received its touch.due from Kafka. The default rate is above
the 10,000/s goal: dispatched/s then shows what the process keeps up with, not the rate asked.

Needs AFTERGLOW_DATABASE_URL (PostgreSQL) and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (`make up`).
Creates and drops a database of its own. Prints figures; asserts nothing.

`--json PATH` writes the figures as one flat JSON object:
    participants            audience size
    replicas                planning processes
    touches_planned         timer rows written (5 per participant)
    plan_s, planned_per_s   planning wall time and touches planned per second
    plan_cpu_us_per_touch   CPU of the planning processes per touch planned (PostgreSQL's not
                            included)
    plan_db_cpu_us_per_touch
                            CPU of PostgreSQL's backends of the benchmark's database per touch
                            planned (read from /proc: a server on this machine; NaN otherwise)
    plan_loadavg_1m         the machine's 1-minute load average when planning ended
    relayed_events          touch.planned/suppressed events relayed to Kafka after planning
    relay_s, relayed_per_s  relay wall time and events per second
    due_today               touches due during the played day
    rate                    due touches per second while the day played (offered load)
    dispatched              touch.due events observed on Kafka
    suppressed              touches of the day suppressed at dispatch (any reason)
    dispatch_s              first to last touch.due observed, seconds
    dispatched_per_s        dispatched / dispatch_s (caps, quiet hours, fatigue checked)
    dispatch_cpu_us_per_touch
                            CPU of this process (dispatchers and relay) per due touch
    dispatch_db_cpu_us_per_touch
                            CPU of PostgreSQL's backends per due touch, over the same span
    due_p50_ms, due_p99_ms, due_max_ms
                            due time -> touch.due received from Kafka
    peak_rss_mb             peak resident memory of the service process
    observer_peak_rss_mb    peak resident memory of the observer process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import math
import os
import resource
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.bus import delete_topics
from benchmarks.metrics import backend_cpu_s, backend_pids
from services.scheduling import dispatcher, handlers, planning, store
from services.scheduling.config import SchedulingSettings
from services.scheduling.state import DEFAULT_POLICY, stop_dispatchers
from shared.bus.kafka import KafkaBus
from shared.db import Database, create_database_sql
from shared.events import (
    AudienceMemberResolved,
    Event,
    SegmentSnapshot,
    TouchDue,
    default_registry,
    encode,
)
from shared.migrations import upgrade_async
from shared.observability import ServiceMetrics
from shared.outbox import Outbox
from shared.service import ServiceContext, all_topics, tune_gc
from shared.settings import ClockKind, Settings

DAY_START = datetime(2026, 3, 8, 0, 0, tzinfo=UTC)
MINUTES_A_DAY = 1440
CONSENT = {"sms": True, "email": True, "push": True}
CHUNK = 500
SOURCE = "afterglow/segmentation"
REGISTRY = default_registry()


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


_USER_MARK, _ID_MARK = b"user-placeholder", b"00000000-0000-4000-8000-placeholder0"
_templates: dict[int, bytes] = {}


def member_message(i: int, total: int) -> bytes:
    """Participant `i`'s audience.member_resolved as segmentation publishes it (the bytes
    of `shared.events.encode`), from a template per promotion."""
    # A promotion ends every minute of the day, each with its share of the audience:
    # due touches arrive all day long, and a promotion's participants share its end.
    minute = MINUTES_A_DAY * i // total
    template = _templates.get(minute)
    if template is None:
        ended = DAY_START + timedelta(minutes=minute)
        data = AudienceMemberResolved(
            user_id=_USER_MARK.decode(),
            promotion_id=f"bench-{minute:04d}",
            ended_at=ended,
            timezone=zone_for(ended.hour),
            consent=CONSENT,
            segment=SegmentSnapshot(channel_order=["push", "sms"]),
        )
        template = encode(data, source=SOURCE, time=ended, event_id=_ID_MARK.decode())
        _templates[minute] = template
    user = b"u-%08d" % i
    return template.replace(_USER_MARK, user).replace(
        _ID_MARK, b"00000000-0000-4000-8000-%012d" % i
    )


def members(first: int, count: int, total: int) -> list[Event[Any]]:
    """A batch of the audience as the service's consumer hands it over: decoded from the
    bytes segmentation published (the decoding is part of what planning costs)."""
    decode = REGISTRY.decode
    return [decode(member_message(i, total)) for i in range(first, first + count)]


@contextlib.contextmanager
def profiled(path: str | None, phase: str) -> Iterator[None]:
    """cProfile of this process during one phase, to `path.phase.prof` (--profile)."""
    if not path:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(f"{path}.{phase}.prof")


async def db_cpu_since(url: str, before: dict[int, float]) -> float:
    """CPU seconds of the database's backends since `before` (NaN without /proc figures)."""
    after = backend_cpu_s(await backend_pids(url))
    if not after:
        return math.nan
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def run(args: argparse.Namespace) -> dict[str, float]:
    base = os.environ.get("AFTERGLOW_DATABASE_URL", "")
    bootstrap = os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", "")
    if not base.startswith("postgresql") or not bootstrap:
        raise SystemExit("set AFTERGLOW_DATABASE_URL (PostgreSQL) and the Kafka servers: make up")
    name = f"bench_sched_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(create_database_sql(name)))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    try:
        return await bench(args, url, bootstrap, prefix)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
        await delete_topics(bootstrap, prefix)


def service_context(url: str, bootstrap: str, prefix: str) -> ServiceContext:
    """The scheduling service's context on the benchmark's database, topics and clock (its
    database, bus and outbox not started yet)."""
    settings = Settings(database_url=url, kafka_bootstrap_servers=bootstrap, topic_prefix=prefix)
    db = Database(url, "scheduling", pool_size=10)
    bus = KafkaBus(bootstrap, client_id="bench-scheduling", partitions=8, linger_ms=5)
    outbox = Outbox(
        db,
        store.outbox,
        bus,
        source="afterglow/scheduling",
        topic_name=settings.topic,
        lanes=8,
        batch=2000,
        poll_s=0.05,
        vacuum_rows=settings.outbox_vacuum_rows,
    )
    return ServiceContext(
        name="scheduling",
        settings=settings,
        db=db,
        bus=bus,
        clock=FastClock(DAY_START, 1.0),
        outbox=outbox,
        metrics=ServiceMetrics("scheduling-bench"),
        registry=REGISTRY,
    )


def as_started_service() -> None:
    """As the service does once started (services/scheduling/app.py, shared/service.py): its
    collector threshold, and startup's objects out of the collector's sight."""
    tune_gc(SchedulingSettings().gc_threshold)
    gc.freeze()


async def plan_share(
    ctx: ServiceContext, n: int, partitions: int, replica: int, replicas: int
) -> None:
    """Plan this replica's share of the audience: batches of CHUNK participants, every
    `replicas`-th one from the `replica`-th, as a consumer of its share of the partitions
    would receive them; `partitions` batches at a time, each in its own task, as the Kafka
    consumer runs each partition's batches."""
    starts = iter(range(replica * CHUNK, n, replicas * CHUNK))

    async def plan_partition() -> None:
        for first in starts:
            await planning.on_audience_members(ctx, members(first, min(CHUNK, n - first), n))

    await asyncio.gather(*(plan_partition() for _ in range(partitions)))


# -- planning replicas ---------------------------------------------------------------
# With --replicas R > 1, planning runs in R processes of this module (`--replica I`), as the
# service scaled to R replicas: each plans its share of the audience on its own connections.
# They start, connect and say "ready"; on "go" they plan, print their CPU seconds as JSON and
# keep their connections until told to end, so that their backends' CPU can still be read.


async def plan_in_replicas(
    args: argparse.Namespace, url: str, bootstrap: str, prefix: str
) -> tuple[float, float, float]:
    """Planning in `args.replicas` processes: wall seconds, their CPU seconds, PostgreSQL's."""
    command = [sys.executable, "-m", "benchmarks.scheduling", "--url", url, "--prefix", prefix]
    command += ["--bootstrap", bootstrap, "--participants", str(args.participants)]
    command += ["--partitions", str(args.partitions), "--replicas", str(args.replicas)]
    processes = [
        await asyncio.create_subprocess_exec(
            *command,
            "--replica",
            str(i),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(args.replicas)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
            if line.strip() != b"ready":
                raise SystemExit(f"a planning replica did not start: {line!r}")
        db_cpu = backend_cpu_s(await backend_pids(url))
        started = time.perf_counter()
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()
        cpu = 0.0
        for process in processes:
            assert process.stdout is not None
            line = await process.stdout.readline()
            if not line.startswith(b"{"):
                raise SystemExit(f"a planning replica failed: {line!r}")
            cpu += float(orjson.loads(line)["cpu_s"])
        plan_s = time.perf_counter() - started
        plan_db_cpu = await db_cpu_since(url, db_cpu)
    finally:
        for process in processes:
            if process.stdin is not None and not process.stdin.is_closing():
                process.stdin.close()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=60)
            except TimeoutError:
                process.kill()
    return plan_s, cpu, plan_db_cpu


async def replica(args: argparse.Namespace) -> None:
    """One planning replica (see plan_in_replicas)."""
    ctx = service_context(args.url, args.bootstrap, args.prefix)
    await ctx.db.start()
    loop = asyncio.get_running_loop()
    try:
        as_started_service()
        print("ready", flush=True)
        if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
            return
        cpu = time.process_time()
        await plan_share(ctx, args.participants, args.partitions, args.replica, args.replicas)
        print(orjson.dumps({"cpu_s": time.process_time() - cpu}).decode(), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
    finally:
        await ctx.db.stop()


async def bench(
    args: argparse.Namespace, url: str, bootstrap: str, prefix: str
) -> dict[str, float]:
    n = args.participants
    await upgrade_async(url, "scheduling")
    ctx = service_context(url, bootstrap, prefix)
    settings, db, bus, outbox = ctx.settings, ctx.db, ctx.bus, ctx.outbox
    clock: FastClock = ctx.clock  # type: ignore[assignment]
    await db.start()
    await bus.start()
    await bus.ensure_topics(all_topics(settings))
    rate = float(args.rate)
    figures: dict[str, float] = {"participants": n, "replicas": args.replicas}
    as_started_service()
    day_end = DAY_START + timedelta(days=1)
    try:
        # -- planning ------------------------------------------------------------------
        # The promotions ended first (POST /v1/promotions/{id}/end), then segmentation
        # resolved their audiences.
        for minute in range(MINUTES_A_DAY):
            await handlers.end_promotion(
                ctx,
                f"bench-{minute:04d}",
                ended_at=DAY_START + timedelta(minutes=minute),
                name=f"Benchmark {minute}",
                policy=DEFAULT_POLICY,
            )
        if args.replicas > 1:
            plan_s, plan_cpu, plan_db_cpu = await plan_in_replicas(args, url, bootstrap, prefix)
        else:
            db_cpu = backend_cpu_s(await backend_pids(url))
            started, cpu = time.perf_counter(), time.process_time()
            with profiled(args.profile, "plan"):
                await plan_share(ctx, n, args.partitions, 0, 1)
            plan_s, plan_cpu = time.perf_counter() - started, time.process_time() - cpu
            plan_db_cpu = await db_cpu_since(url, db_cpu)
        t = store.touches
        async with db.connect() as conn:
            planned = int(await conn.scalar(select(func.count()).select_from(t)) or 0)
            due_total = int(
                await conn.scalar(
                    select(func.count()).where(t.c.status == "planned", t.c.due_at < day_end)
                )
                or 0
            )
            backlog = await outbox.pending()
        figures.update(
            touches_planned=planned,
            plan_s=plan_s,
            planned_per_s=planned / plan_s,
            plan_cpu_us_per_touch=plan_cpu / planned * 1e6,
            plan_db_cpu_us_per_touch=plan_db_cpu / planned * 1e6,
        )
        load = os.getloadavg()
        figures["plan_loadavg_1m"] = load[0]
        replicas = f"{args.replicas} replica processes" if args.replicas > 1 else "one process"
        print(
            f"scheduling benchmark: {n:,} participants, PostgreSQL + Kafka; planning in"
            f" {replicas}, relay and dispatch in one"
        )
        print(
            f"  planned     {planned:>10,} touches in {plan_s:6.1f} s = {planned / plan_s:>9,.0f}/s"
            f"; CPU per touch: the service {figures['plan_cpu_us_per_touch']:.1f} us,"
            f" PostgreSQL {figures['plan_db_cpu_us_per_touch']:.1f} us"
            f" (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})"
        )
        if args.plan_only:
            figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"  peak RSS    {figures['peak_rss_mb']:>10,.0f} MB")
            return figures
        # -- relaying the touch.planned events ----------------------------------------
        started = time.perf_counter()
        with profiled(args.profile, "relay"):
            while await outbox.relay_once():
                pass
        relay_s = time.perf_counter() - started
        figures.update(relayed_events=backlog, relay_s=relay_s, relayed_per_s=backlog / relay_s)
        print(
            f"  relayed     {backlog:>10,} events  in {relay_s:6.1f} s = "
            f"{backlog / relay_s:>9,.0f}/s (touch.planned to Kafka)"
        )
        # -- dispatching one day ------------------------------------------------------
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "observed.bin")
            observer = await start_observer(bootstrap, settings.topic("touches"), out)
            seconds = due_total / rate
            clock.speed = 86400 / seconds
            db_cpu = backend_cpu_s(await backend_pids(url))
            cpu = time.process_time()
            with profiled(args.profile, "dispatch"):
                await outbox.start()
                clock.begin(DAY_START)
                config = SchedulingSettings(dispatch_batch=args.batch, dispatch_idle_s=0.05)
                tasks = [
                    asyncio.create_task(dispatcher.run(ctx, config))
                    for _ in range(args.dispatchers)
                ]
                await asyncio.sleep(seconds)
                # Until nothing of the day is pending and the outbox is empty. One row is
                # enough to know: a count here ran parallel scans of the 5,000,000 touches
                # every 0.2 s, taking the CPU the dispatchers were measured on.
                async with asyncio.timeout(max(1800.0, 10 * seconds)):
                    while True:
                        async with db.connect() as conn:
                            left = await conn.scalar(
                                select(t.c.touch_id)
                                .where(t.c.status == "planned", t.c.due_at <= clock.now())
                                .limit(1)
                            )
                            unsent = await conn.scalar(select(store.outbox.c.id).limit(1))
                        if left is None and unsent is None:
                            break
                        await asyncio.sleep(0.2)
                dispatch_cpu = time.process_time() - cpu
            dispatch_db_cpu = await db_cpu_since(url, db_cpu)
            await stop_dispatchers(ctx)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            async with db.connect() as conn:
                rows = (
                    await conn.execute(
                        select(t.c.status, t.c.reason, func.count())
                        .where(t.c.planned_due_at < day_end)
                        .group_by(t.c.status, t.c.reason)
                    )
                ).all()
            counts = {f"{s}:{r}" if r else s: int(c) for s, r, c in rows}
            emitted = counts.get("dispatched", 0)
            received, dues = await finish_observer(observer, out, emitted)
        due_walls = [clock.wall_of(datetime.fromtimestamp(d, UTC)) for d in dues]
        latencies = [r - w for r, w in zip(received, due_walls, strict=True)]
        # When the touches later than 1 s came due, in seconds into the played day: after a
        # stall (an autovacuum, a checkpoint) they span a few seconds; when the dispatcher
        # cannot keep up, much of the day.
        late = [w - clock.wall0 for w, lat in zip(due_walls, latencies, strict=True) if lat > 1.0]
        sent = len(latencies)
        dispatch_s = (max(received) - min(received)) if sent > 1 else float("nan")
        suppressed = sum(c for k, c in counts.items() if k.startswith("suppressed:")) - counts.get(
            "suppressed:holdout", 0
        )
        figures.update(
            due_today=due_total,
            rate=rate,
            dispatched=sent,
            suppressed=suppressed,
            dispatch_s=dispatch_s,
            dispatched_per_s=sent / dispatch_s,
            due_p50_ms=percentile(latencies, 0.5) * 1000,
            due_p99_ms=percentile(latencies, 0.99) * 1000,
            due_max_ms=max(latencies or [0]) * 1000,
            dispatch_cpu_us_per_touch=dispatch_cpu / max(1, due_total) * 1e6,
            dispatch_db_cpu_us_per_touch=dispatch_db_cpu / max(1, due_total) * 1e6,
        )
        print(
            f"  due today   {due_total:>10,} touches; the day played in {seconds:.0f} s "
            f"({rate:,.0f} due/s)"
        )
        print(
            f"  dispatched  {sent:>10,} touch.due in {dispatch_s:6.1f} s = "
            f"{sent / dispatch_s:>9,.0f}/s (caps checked) {counts}"
        )
        print(
            f"  this process's CPU while dispatching (dispatchers and outbox relay): "
            f"{figures['dispatch_cpu_us_per_touch']:.1f} us per due touch; PostgreSQL's "
            f"{figures['dispatch_db_cpu_us_per_touch']:.1f} us"
        )
        print(
            f"  due -> touch.due on Kafka: p50 {figures['due_p50_ms']:,.0f} ms, "
            f"p99 {figures['due_p99_ms']:,.0f} ms, max {figures['due_max_ms']:,.0f} ms"
        )
        figures["late_over_1s"] = len(late)
        if late:
            print(
                f"  later than 1 s: {len(late):,} touches, due between {min(late):.1f} and "
                f"{max(late):.1f} s into the played day ({seconds:.0f} s)"
            )
    finally:
        await outbox.stop(timeout_s=2)
        await bus.stop()
        await db.stop()
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures["observer_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"  peak RSS    {figures['peak_rss_mb']:>10,.0f} MB "
        f"(observer process {figures['observer_peak_rss_mb']:,.0f} MB)"
    )
    return figures


# -- the observer process ----------------------------------------------------------


async def start_observer(bootstrap: str, topic: str, out: str) -> asyncio.subprocess.Process:
    """The observer, positioned at the end of the topic (after the touch.planned events)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.scheduling",
        "--observe",
        topic,
        "--bootstrap",
        bootstrap,
        "--out",
        out,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
    if line.strip() != b"ready":
        raise SystemExit(f"the observer did not start: {line!r}")
    return process


async def finish_observer(
    process: asyncio.subprocess.Process, out: str, expected: int
) -> tuple[list[float], list[float]]:
    """Tell the observer how many touch.due to wait for; read what it received."""
    assert process.stdin is not None
    process.stdin.write(f"{expected}\n".encode())
    await process.stdin.drain()
    process.stdin.close()
    await asyncio.wait_for(process.wait(), timeout=120)
    values = array("d")
    values.frombytes(await asyncio.to_thread(Path(out).read_bytes))
    return list(values[0::2]), list(values[1::2])


async def observe(topic: str, bootstrap: str) -> array[float]:
    """Receive touch.due from the end of `topic`; write (received, due) wall-time pairs."""
    # No group: every partition of the topic is assigned to this consumer.
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="latest"
    )
    await consumer.start()
    try:
        while not consumer.assignment():  # noqa: ASYNC110 - aiokafka has no event for it
            await asyncio.sleep(0.05)
        partitions = sorted(consumer.assignment())
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        expected: asyncio.Future[int] = loop.create_future()

        async def read_expected() -> None:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            expected.set_result(int(line or 0))

        reader = asyncio.create_task(read_expected())
        due_type = TouchDue.event_type().encode()
        values = array("d")
        idle_since = time.time()
        while True:
            batches = await consumer.getmany(timeout_ms=100, max_records=5000)
            received = time.time()
            for records in batches.values():
                for record in records:
                    value = record.value
                    if value is None or due_type not in value[:400]:
                        continue
                    due_at = orjson.loads(value)["data"]["due_at"]
                    values.append(received)
                    values.append(datetime.fromisoformat(due_at).timestamp())
            if batches:
                idle_since = received
            # Everything expected arrived, or nothing more came for 5 s.
            if expected.done() and (
                len(values) // 2 >= expected.result() or received - idle_since > 5
            ):
                break
        reader.cancel()
    finally:
        await consumer.stop()
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--participants", type=int, default=1_000_000)
    parser.add_argument(
        "--rate",
        type=float,
        default=12_000,
        help="due touches per second while the day plays (above the 10,000/s goal)",
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
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="planning processes, each planning its share of the audience (1: in this one)",
    )
    parser.add_argument(
        "--plan-only",
        action="store_true",
        help="stop after planning (no relay, no dispatch): the plan_* figures only",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as flat JSON")
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="cProfile each phase of this process to PATH.plan.prof (with --replicas 1),"
        " .relay.prof, .dispatch.prof",
    )
    parser.add_argument("--observe", metavar="TOPIC", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--replica", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.replica is not None:
        asyncio.run(replica(args))
        return
    if args.observe:
        observed = asyncio.run(observe(args.observe, args.bootstrap))
        Path(args.out).write_bytes(observed.tobytes())
        return
    figures = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_bytes(
            orjson.dumps(figures, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        )


if __name__ == "__main__":
    main()
