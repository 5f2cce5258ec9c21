"""Metrics aggregation on PostgreSQL and Kafka (issue 6): events/s counted by one metrics
process, catch-up behind the newest event, and `GET /v1/funnel` latency.

    python -m benchmarks.metrics [--participants 100000] [--funnel-participants 1000000]
                                 [--order send-time|participant] [--batch 1000] [--calls 20]
                                 [--json PATH] [--profile PATH]

Per participant: touch.planned for two waves (launch, day3), delivery.sent for each, an
engagement "opened" for 30% of sends and "clicked" for 10%, and a purchase
(activity.recorded) 1 hour after the launch send for 5% of participants. Participant i sends
at minute i mod 1440 of a day (and 3 days later). `--order send-time` (the default) publishes
the participants in the order of their send minute, as topics fill when the sends happen, so
the events a batch counts share a few minutes; `--order participant` publishes them by i, so
that consecutive events fall in different minutes and nearly every event adds an aggregate
row of its own (the worst case for `minute_counts`). The events are
encoded and published to Kafka a batch (`--batch`) at a time before the metrics app starts,
so the app works through a backlog and no producer shares its CPU: events/s (consume, decode
and count) runs from the first event consumed until the funnel shows every count (the funnel
is asked only once every message is consumed); catch-up is the time from the app's start
(all events already published) until then, and the peak consumer lag is read from the app's
metrics registry. CPU per event is that of this process (consuming, decoding, counting)
and of PostgreSQL's backends serving the benchmark's database, over the same span: on a
loaded machine it is the figure to judge a change by. `--profile PATH` writes a cProfile of
this process over that span (`python -m pstats PATH`).

Funnel latency at `--funnel-participants` (default 1,000,000): counting that many through
Kafka would take long, so a second promotion's aggregate rows (`minute_counts`, the only
table `GET /v1/funnel` reads) are written directly, the rows counting that stream yields
(`seed_rows`, the same keys and values as the handlers produce for `build`; the benchmark
checks that model against the counted promotion's rows, channel aside, first), then the
funnel is timed on it.

`--json PATH` also writes the figures as one flat JSON object:
participants, order, events, encode_s, publish_events_per_s, all_counted (bool),
aggregate_events_per_s, aggregate_s, catch_up_s, startup_s, cpu_us_per_event (this process
while it counts), gc_us_per_event (of which in the garbage collector), db_cpu_us_per_event
(PostgreSQL's backends of the benchmark's database, read from /proc: same host only) (these
seven null when not all counted), peak_lag,
seed_model_matches (bool), funnel_p50_ms / funnel_p99_ms (group_by=wave, at `participants`),
funnel_channel_p50_ms / funnel_channel_p99_ms (group_by=wave,channel),
funnel_participants, funnel_rows (aggregate rows of that promotion),
big_funnel_p50_ms / big_funnel_p99_ms (group_by=wave, at funnel_participants),
big_funnel_channel_p50_ms / big_funnel_channel_p99_ms, peak_rss_mb.

Needs AFTERGLOW_DATABASE_URL (PostgreSQL) and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (`make up`).
Creates and drops a database of its own; uses a unique topic prefix. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import math
import os
import resource
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.bus import delete_topics
from services.metrics import store
from services.metrics.app import create_app
from shared.bus import OutMessage
from shared.bus.kafka import KafkaBus
from shared.db import create_database_sql
from shared.events import (
    ActivityRecorded,
    DeliverySent,
    EngagementRecorded,
    EventData,
    TouchPlanned,
    encode,
)
from shared.service import all_topics
from shared.settings import Settings

TOKEN = "bench"
# A week ago at midnight: the service runs on the system clock and leaves out events older
# than its counted-id retention (30 days).
START = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=7)
WAVES = (("launch", timedelta(0)), ("day3", timedelta(days=3)))
CHANNELS = ("email", "sms", "push")
SEGMENTS = ("high", "mid", "low")
MEASURES = ("planned", "sent", "opened", "clicked", "orders")


ORDERS = ("send-time", "participant")


def participant_order(participants: int, order: str) -> Iterator[int]:
    """The participants in publishing order (see `--order`): by send minute (i mod 1440),
    or by number."""
    if order == "participant":
        return iter(range(participants))
    return (i for minute in range(1440) for i in range(minute, participants, 1440))


def build(
    participants: int,
    promotion: str,
    topic: Any,
    expected: dict[str, int],
    batch: int,
    order: str = "send-time",
) -> Iterator[list[OutMessage]]:
    """Every participant's events, encoded, in lists of about `batch` (so that 1,000,000
    participants, ~4.9 million events, never sit in memory at once), participants in `order`;
    `expected` gathers the funnel totals they add up to."""
    out: list[OutMessage] = []

    def add(data: EventData, at: datetime) -> None:
        value = encode(data, source="bench/metrics", time=at)
        out.append(OutMessage(topic=topic(data.topic), key=data.partition_key(), value=value))

    for i in participant_order(participants, order):
        user = f"u-{i}"
        channel = CHANNELS[i % len(CHANNELS)]
        segment = SEGMENTS[(i // 7) % len(SEGMENTS)]
        # Spread sends over a day of minutes, as a real promotion's are.
        base = START + timedelta(minutes=i % 1440)
        for wave, offset in WAVES:
            tid = f"t-{i}-{wave}"
            common: dict[str, Any] = {
                "touch_id": tid,
                "user_id": user,
                "promotion_id": promotion,
                "wave": wave,
            }
            due = base + offset
            add(TouchPlanned(**common, due_at=due, segment=segment), due - timedelta(hours=1))
            add(DeliverySent(**common, channel=channel, at=due, cost=0.01), due)
            expected["planned"] += 1
            expected["sent"] += 1
            roll = (i * 31 + len(wave)) % 100
            if roll < 30:
                at = due + timedelta(minutes=5)
                add(EngagementRecorded(**common, channel=channel, kind="opened", at=at), at)
                expected["opened"] += 1
            if roll < 10:
                at = due + timedelta(minutes=6)
                add(EngagementRecorded(**common, channel=channel, kind="clicked", at=at), at)
                expected["clicked"] += 1
        if i % 20 == 0:
            at = base + timedelta(hours=1)
            purchase = ActivityRecorded(
                user_id=user,
                id=f"a-{i}",
                kind="purchase",
                occurred_at=at,
                amount=25.0,
                currency="EUR",
            )
            add(purchase, at)
            expected["orders"] += 1
        if len(out) >= batch:
            yield out
            out = []
    if out:
        yield out


def seed_rows(participants: int, promotion: str) -> list[dict[str, Any]]:
    """The counts `build(participants)` yields, without counting it: one row per minute,
    dimensions and measure (`by_column` turns them into `minute_counts` rows)."""
    sums: dict[tuple[datetime, str, str, str, str], float] = {}

    def add(at: datetime, wave: str, channel: str, segment: str, measure: str, v: float) -> None:
        key = (at.replace(second=0, microsecond=0), wave, channel, segment, measure)
        sums[key] = sums.get(key, 0.0) + v

    for i in range(participants):
        channel = CHANNELS[i % len(CHANNELS)]
        segment = SEGMENTS[(i // 7) % len(SEGMENTS)]
        base = START + timedelta(minutes=i % 1440)
        for wave, offset in WAVES:
            due = base + offset
            add(due - timedelta(hours=1), wave, "", segment, "planned", 1)
            for measure, v in (("sends", 1.0), ("sent", 1.0), ("cost", 0.01)):
                add(due, wave, channel, segment, measure, v)
            roll = (i * 31 + len(wave)) % 100
            if roll < 30:
                add(due + timedelta(minutes=5), wave, channel, segment, "opened", 1)
            if roll < 10:
                add(due + timedelta(minutes=6), wave, channel, segment, "clicked", 1)
        if i % 20 == 0:  # bought an hour after the launch send: credited to it
            for measure, v in (("orders", 1.0), ("revenue", 25.0), ("converted", 1.0)):
                add(base, "launch", channel, segment, measure, v)
    return [
        {
            "promotion_id": promotion,
            "minute": k[0],
            "wave": k[1],
            "channel": k[2],
            "segment": k[3],
            "variant": "",
            "measure": k[4],
            "value": v,
        }
        for k, v in sums.items()
    ]


def by_key(rows: Any) -> dict[tuple[Any, ...], float]:
    """Sums per minute, wave, segment and measure: the channel of "planned" is whichever
    send was counted first (order across topics varies), so the model leaves channel out."""
    out: dict[tuple[Any, ...], float] = {}
    for r in rows:
        key = (r["minute"], r["wave"], r["segment"], r["variant"], r["measure"])
        out[key] = round(out.get(key, 0.0) + r["value"], 6)
    return {k: v for k, v in out.items() if v}


def by_measure(row: Any) -> list[dict[str, Any]]:
    """A `minute_counts` row (a column per measure) as one row per measure it counts."""
    key = {k: row[k] for k in store.COUNT_KEY}
    return [
        {**key, "measure": m, "value": v}
        for m in store.MEASURES
        if (v := row[store.measure_column(m)])
    ]


def by_column(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of one measure each as `minute_counts` rows (a column per measure)."""
    out: dict[tuple[Any, ...], dict[str, Any]] = {}
    zeros = {store.measure_column(m): 0.0 for m in store.MEASURES}
    for r in rows:
        key = tuple(r[k] for k in store.COUNT_KEY)
        row = out.setdefault(key, {**dict(zip(store.COUNT_KEY, key, strict=True)), **zeros})
        row[store.measure_column(r["measure"])] += r["value"]
    return list(out.values())


async def counted_rows(url: str, promotion: str) -> dict[tuple[Any, ...], float]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                select(store.minute_counts).where(store.minute_counts.c.promotion_id == promotion)
            )
            return by_key(m for r in found.all() for m in by_measure(r._mapping))
    finally:
        await engine.dispose()


async def seed(url: str, rows: list[dict[str, Any]]) -> int:
    """Write `rows` (one measure each) as `minute_counts` rows; returns how many."""
    rows = by_column(rows)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for first in range(0, len(rows), 2000):
                await conn.execute(store.minute_counts.insert(), rows[first : first + 2000])
            await conn.execute(text("ANALYZE metrics.minute_counts"))
    finally:
        await engine.dispose()
    return len(rows)


async def time_funnel(
    client: httpx.AsyncClient, promotion: str, calls: int
) -> dict[str, list[float]]:
    latencies: dict[str, list[float]] = {}
    for group_by in ("wave", "wave,channel"):
        spent: list[float] = []
        for _ in range(calls):
            t0 = time.perf_counter()
            answer = await client.get(
                "/v1/funnel", params={"promotion_id": promotion, "group_by": group_by}
            )
            spent.append(time.perf_counter() - t0)
            answer.raise_for_status()
        latencies[group_by] = spent
    return latencies


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {m: int(sum(r.get(m) or 0 for r in rows)) for m in MEASURES}


def sample(registry: Any, name: str) -> float:
    return float(
        sum(s.value for metric in registry.collect() for s in metric.samples if s.name == name)
    )


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def backend_cpu_s(pids: set[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each of these processes so far, from /proc."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone (or PostgreSQL on another host: no figure)
        out[pid] = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return out


async def backend_pids(url: str) -> set[int]:
    """The PostgreSQL server processes serving the benchmark's database now."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
            )
            return {int(r[0]) for r in found.all()}
    finally:
        await engine.dispose()


class GcTimer:
    """Seconds spent in the cyclic garbage collector since `start`."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._began = 0.0
        self.running = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.running:
            return
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.spent += time.perf_counter() - self._began

    def start(self) -> None:
        self.running = True
        gc.callbacks.append(self)

    def stop(self) -> float:
        self.running = False
        if self in gc.callbacks:
            gc.callbacks.remove(self)
        return self.spent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def main_async(
    args: argparse.Namespace, url: str, bootstrap: str, prefix: str
) -> dict[str, Any]:
    settings = Settings(
        database_url=url,
        kafka_bootstrap_servers=bootstrap,
        topic_prefix=prefix,
        api_tokens={TOKEN: frozenset({"*"})},
        log_level="WARNING",
    )
    promotion = "p-bench"
    expected = dict.fromkeys(MEASURES, 0)
    encode_s = publish_s = 0.0
    events = 0
    producer = KafkaBus(
        bootstrap, client_id="bench-metrics-producer", partitions=settings.kafka_partitions
    )
    await producer.start()
    try:
        await producer.ensure_topics(all_topics(settings))
        # Encoded and published a batch at a time: memory stays that of one batch.
        batches = build(
            args.participants, promotion, settings.topic, expected, args.batch, args.order
        )
        while True:
            started = time.perf_counter()
            part = next(batches, None)
            encode_s += time.perf_counter() - started
            if part is None:
                break
            started = time.perf_counter()
            await producer.publish(part)
            publish_s += time.perf_counter() - started
            events += len(part)
    finally:
        await producer.stop()

    # The models are worked out before the app starts: at 1,000,000 participants each takes
    # about 10 s of CPU without a pause, which would starve the app's consumer of heartbeats
    # (its group membership lapses after 10 s) if the app were running.
    model = by_key(seed_rows(args.participants, promotion))
    big = "p-bench-big"
    big_rows = seed_rows(args.funnel_participants, big)
    app = create_app(settings)
    figures: dict[str, Any] = {
        "events": events,
        "expected": expected,
        "encode_s": encode_s,
        "publish_s": publish_s,
    }
    async with contextlib.AsyncExitStack() as stack:
        app_started = time.perf_counter()
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://metrics",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            )
        )
        registry = app.state.metrics.registry
        params = {"promotion_id": promotion, "group_by": "wave"}
        first_consumed: float | None = None
        peak_lag = 0.0
        counted: dict[str, int] = {}
        deadline = time.perf_counter() + args.timeout
        done_at: float | None = None
        next_funnel = 0.0
        profile = cProfile.Profile() if args.profile else None
        cpu_at_first = 0.0
        gc_timer = GcTimer()
        db_cpu_at_first: dict[int, float] = {}
        while time.perf_counter() < deadline:
            now = time.perf_counter()
            consumed = sample(registry, "afterglow_bus_messages_consumed_total")
            if first_consumed is None and consumed:
                first_consumed = now
                cpu_at_first = time.process_time()
                gc_timer.start()
                db_cpu_at_first = backend_cpu_s(await backend_pids(url))
                if profile is not None:
                    profile.enable()
            peak_lag = max(peak_lag, sample(registry, "afterglow_bus_consumer_lag"))
            # The funnel is asked only once every message is consumed (a counted batch is
            # committed, then counted as consumed), so the benchmark's own queries do not take
            # the CPU from the counting it measures.
            if consumed >= events and now >= next_funnel:
                answer = await client.get("/v1/funnel", params=params)
                counted = totals(answer.json()["rows"])
                if counted == expected:
                    done_at = time.perf_counter()
                    figures["cpu_s"] = time.process_time() - cpu_at_first
                    figures["gc_s"] = gc_timer.stop()
                    # Backends opened meanwhile count whole; closed ones are missed.
                    db_cpu = backend_cpu_s(await backend_pids(url))
                    figures["db_cpu_s"] = sum(
                        v - db_cpu_at_first.get(pid, 0.0) for pid, v in db_cpu.items()
                    )
                    break
                next_funnel = time.perf_counter() + args.poll
            await asyncio.sleep(0.05)
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
        figures["counted"] = counted
        figures["peak_lag"] = peak_lag
        figures["consumed"] = sample(registry, "afterglow_bus_messages_consumed_total")
        if done_at is not None and first_consumed is not None:
            figures["aggregate_s"] = done_at - first_consumed
            figures["catch_up_s"] = done_at - app_started
            figures["startup_s"] = first_consumed - app_started

        figures["latencies"] = await time_funnel(client, promotion, args.calls)
        figures["seed_model_matches"] = model == await counted_rows(url, promotion)
        figures["funnel_rows"] = await seed(url, big_rows)
        figures["big_latencies"] = await time_funnel(client, big, args.calls)
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = os.environ.get("AFTERGLOW_DATABASE_URL", "")
    bootstrap = os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", "")
    if not base.startswith("postgresql") or not bootstrap:
        raise SystemExit(
            "AFTERGLOW_DATABASE_URL (PostgreSQL) and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS are needed "
            "(run `make up`, then `set -a; . .run/env; set +a`)"
        )
    name = f"bench_metrics_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(base, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(create_database_sql(name)))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    prefix = f"bench-metrics-{uuid.uuid4().hex[:8]}."
    try:
        return await main_async(args, url, bootstrap, prefix)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
        await delete_topics(bootstrap, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--participants", type=int, default=100_000)
    parser.add_argument(
        "--order",
        choices=ORDERS,
        default="send-time",
        help="publish participants by send minute (as topics fill), or by number (worst case)",
    )
    parser.add_argument("--batch", type=int, default=1000, help="messages per publish call")
    parser.add_argument("--calls", type=int, default=20, help="funnel calls per group_by")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between funnel polls")
    parser.add_argument("--timeout", type=float, default=1800, help="give up counting after")
    parser.add_argument(
        "--funnel-participants",
        type=int,
        default=1_000_000,
        help="participants of the promotion whose funnel latency is measured on seeded rows",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here (flat JSON)")
    parser.add_argument(
        "--profile", type=Path, help="write a cProfile of the process while it counts here"
    )
    args = parser.parse_args()
    f = asyncio.run(run(args))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report(args, f, peak_mb)
    if args.json is not None:
        args.json.write_text(json.dumps(flat(args, f, peak_mb), indent=2) + "\n")


def ms(spent: list[float]) -> tuple[float, float]:
    return statistics.median(spent) * 1000, percentile(spent, 0.99) * 1000


def flat(args: argparse.Namespace, f: dict[str, Any], peak_mb: float) -> dict[str, Any]:
    events = f["events"]
    done = "aggregate_s" in f
    out: dict[str, Any] = {
        "participants": args.participants,
        "order": args.order,
        "events": events,
        "encode_s": round(f["encode_s"], 3),
        "publish_events_per_s": round(events / f["publish_s"]),
        "all_counted": done,
        "aggregate_events_per_s": round(events / f["aggregate_s"]) if done else None,
        "aggregate_s": round(f["aggregate_s"], 3) if done else None,
        "catch_up_s": round(f["catch_up_s"], 3) if done else None,
        "startup_s": round(f["startup_s"], 3) if done else None,
        "cpu_us_per_event": round(f["cpu_s"] / events * 1e6, 1) if done else None,
        "db_cpu_us_per_event": round(f["db_cpu_s"] / events * 1e6, 1) if done else None,
        "gc_us_per_event": round(f["gc_s"] / events * 1e6, 1) if done else None,
        "peak_lag": f["peak_lag"],
        "seed_model_matches": f["seed_model_matches"],
        "funnel_participants": args.funnel_participants,
        "funnel_rows": f["funnel_rows"],
        "peak_rss_mb": round(peak_mb),
    }
    for prefix, latencies in (("funnel", f["latencies"]), ("big_funnel", f["big_latencies"])):
        for group_by, name in (("wave", prefix), ("wave,channel", f"{prefix}_channel")):
            p50, p99 = ms(latencies[group_by])
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = round(p50, 2), round(p99, 2)
    return out


def report(args: argparse.Namespace, f: dict[str, Any], peak_mb: float) -> None:
    events = f["events"]
    print(
        f"metrics: PostgreSQL + Kafka, one process, {args.participants:,} participants, "
        f"{events:,} events (2 waves planned+sent, opens, clicks, purchases), "
        f"published in {args.order} order"
    )
    print(f"  encoded   {f['encode_s']:>10.1f} s")
    print(f"  published {events / f['publish_s']:>10,.0f} events/s (batches of {args.batch})")
    if "aggregate_s" in f:
        print(
            f"  aggregated {events / f['aggregate_s']:>9,.0f} events/s "
            f"({f['aggregate_s']:.1f} s from first event consumed to all counted)"
        )
        print(
            f"  catch-up  {f['catch_up_s']:>10.1f} s from app start, backlog of {events:,} "
            f"(startup {f['startup_s']:.1f} s)"
        )
        print(
            f"  CPU       {f['cpu_s'] / events * 1e6:>10.1f} us/event in this process, "
            f"({f['gc_s'] / events * 1e6:.1f} of them collecting garbage), "
            f"{f['db_cpu_s'] / events * 1e6:.1f} us/event in PostgreSQL's backends "
            f"(load average {', '.join(f'{x:.2f}' for x in os.getloadavg())})"
        )
    else:
        print(f"  NOT all counted after {args.timeout:.0f} s: {f['counted']} of {f['expected']}")
    print(f"  peak lag  {f['peak_lag']:>10,.0f} messages (consumer lag gauge, all partitions)")
    for label, latencies in (
        (f"{args.participants:,} participants", f["latencies"]),
        (
            f"{args.funnel_participants:,} participants ({f['funnel_rows']:,} seeded rows)",
            f["big_latencies"],
        ),
    ):
        print(f"  funnel at {label}:")
        for group_by, spent in latencies.items():
            p50, p99 = ms(spent)
            print(
                f"    group_by={group_by:<12} p50 {p50:>7.1f} ms  p99 {p99:>7.1f} ms "
                f"({len(spent)} calls)"
            )
    matches = "yes" if f["seed_model_matches"] else "NO"
    print(f"  seeding model matches the counted rows: {matches}")
    print(f"  peak RSS  {peak_mb:>10,.0f} MB")


if __name__ == "__main__":
    main()
