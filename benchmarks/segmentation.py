"""Segmentation on PostgreSQL: rebuild and full ranking, REST ingest, audience emission to Kafka.

    python -m benchmarks.segmentation [--users 1000000] [--ingest 200000] [--concurrency 4]
                                      [--audience N] [--keep] [--json PATH] [--profile PREFIX]
                                      [--ingest-only | --audience-only]

Needs AFTERGLOW_DATABASE_URL (PostgreSQL) and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (from
`make up`; `. .run/env`). Works in a database of its own, dropped afterwards unless --keep.
Generates N users and 10 x N activities in SQL (INSERT ... SELECT generate_series), then:
1. rebuild: every aggregate from the raw activities (what a restore needs);
2. rescoring: the full ranking from the kept aggregates (twice: cold and warm);
3. ingest: new activities through the REST API in batches of 1,000, served by uvicorn in
   this one process; the client is another process (its request bodies are built before
   the clock starts) with `--concurrency` requests in flight. Also timed: until the outbox
   relay of this process published every `activity.recorded` to Kafka;
4. emission: one audience event per participant of an ended promotion, until Kafka
   acknowledged every one.
Prints users/s, activities/s, events/s and peak memory (ru_maxrss), the p50 and p99 latency
of the `POST /v1/activities` requests, and the CPU time that ingest and emission cost this
process and the PostgreSQL backends of the benchmark's database (per 1,000 items): on a
loaded machine the wall-clock rates are pessimistic, CPU per item much less so. Asserts nothing.
`--ingest-only` skips steps 2 and 4 (with a smaller `--users`, a short run of the ingest);
`--audience-only` skips step 3 and ranks once (a short run of the emission).
`--profile PREFIX` writes cProfile statistics of this process (the server side) for the
ingest and the emission to PREFIX-ingest.prof and PREFIX-audience.prof.

`--json PATH` also writes the figures as one flat JSON object:
  users, activities             population generated (users, raw activities)
  load_1m                       the machine's 1-minute load average at the start
  generate_s                    seconds to generate the activities
  rebuild_s, rebuild_users_per_s                    aggregates rebuilt from the activities
  rescoring_first_s, rescoring_s, rescoring_users_per_s   full ranking, first and again
  ingest_activities, ingest_concurrency             activities sent through REST, in flight
  ingest_s, ingest_activities_per_s                 until the last response
  ingest_published_s, ingest_published_per_s        until the outbox had published them all
  ingest_p50_ms, ingest_p99_ms                      latency of one POST /v1/activities
  ingest_cpu_ms_per_1000, ingest_db_cpu_ms_per_1000 CPU of this process, of the PostgreSQL
                                                    backends, per 1,000 activities (to published)
  audience_events, audience_s, audience_events_per_s    audience to Kafka, acknowledged
  audience_cpu_ms_per_1000, audience_db_cpu_ms_per_1000  CPU per 1,000 events, as for ingest
  peak_mb_before_audience, peak_mb                  peak RSS of this process (server side)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import math
import os
import random
import resource
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import uvicorn
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from benchmarks.bus import delete_topics
from services.segmentation import handlers
from services.segmentation.app import build_spec
from services.segmentation.config import SegmentationConfig
from shared.db import create_database_sql
from shared.events import PromotionEnded, default_registry, encode
from shared.service import ServiceContext
from shared.settings import Settings
from tests.support.ports import free_port

TOKEN = "bench-token"
NOW = datetime.now(UTC)


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def line(name: str, count: int, seconds: float, unit: str) -> None:
    rate = count / seconds if seconds > 0 else float("inf")
    print(
        f"  {name:<28} {count:>11,} {unit:<10} {seconds:8.2f} s  {rate:>12,.0f} {unit}/s"
        f"   peak {peak_mb():,.0f} MB",
        flush=True,
    )


class CpuMeter:
    """CPU seconds of this process and of the PostgreSQL backends serving database `name`.

    The backends are found in pg_stat_activity and read from /proc (a server on this
    machine); where /proc cannot be read their share is NaN.
    """

    def __init__(self, admin: Any, name: str) -> None:
        self.admin = admin
        self.name = name

    async def _backends(self) -> dict[int, float]:
        async with self.admin.connect() as conn:
            pids = (
                await conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE datname = :name"),
                    {"name": self.name},
                )
            ).scalars()
            return {pid: _proc_cpu(pid) for pid in pids}

    @asynccontextmanager
    async def measure(self, spent: dict[str, float]) -> AsyncIterator[None]:
        """Fills `spent` with `process` and `db` CPU seconds of the block."""
        before_db = await self._backends()
        before = time.process_time()
        yield
        spent["process"] = time.process_time() - before
        after_db = await self._backends()
        spent["db"] = sum(cpu - before_db.get(pid, 0.0) for pid, cpu in after_db.items())


def _proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds (NaN when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def profiled(prefix: str | None, phase: str) -> AsyncIterator[None]:
    """cProfile of this process's thread for the block, written to PREFIX-phase.prof."""
    if prefix is None:
        yield
        return
    profile = cProfile.Profile(time.process_time)  # CPU, not wall: the machine is shared
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(f"{prefix}-{phase}.prof")


def cpu_line(spent: dict[str, float], count: int) -> tuple[float, float]:
    """Prints and returns CPU milliseconds per 1,000 items (this process, the backends)."""
    process = spent["process"] * 1e6 / count
    db = spent["db"] * 1e6 / count
    print(f"    CPU per 1,000: this process {process:,.1f} ms, PostgreSQL {db:,.1f} ms")
    return process, db


async def generate(conn: Any, users: int, per_user: int) -> None:
    """N users' activities in SQL, 1,000,000 rows per statement; the index is built afterwards."""
    await conn.execute(text("DROP INDEX segmentation.ix_activities_user_time"))
    total = users * per_user
    step = 1_000_000
    for first in range(1, total + 1, step):
        last = min(first + step - 1, total)
        await conn.execute(
            text(
                """
                INSERT INTO segmentation.activities
                  (id, user_id, kind, occurred_at, amount, currency, item_id, recorded_at)
                SELECT 'b-' || g,
                       'u-' || lpad((g % :users)::text, 8, '0'),
                       (ARRAY['purchase','purchase','purchase','visit','open','click',
                              'purchase','visit','refund','purchase'])[1 + (g * 7) % 10],
                       CAST(:now AS timestamptz) - make_interval(secs => (g * 7919 % 34560000)),
                       round((10 + (g * 31 % 990))::numeric, 2)::float8,
                       'CNY',
                       'sku-' || (g * 13 % 5000),
                       CAST(:now AS timestamptz)
                FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
                """
            ),
            {"users": users, "now": NOW, "first": first, "last": last},
        )
        print(f"    generated {last:,} activities", flush=True)
    await conn.execute(
        text(
            "CREATE INDEX ix_activities_user_time ON segmentation.activities (user_id, occurred_at)"
        )
    )


def ingest_bodies(users: int, total: int, seed: int) -> list[bytes]:
    """The request bodies of `total` activities of random users, 1,000 per batch."""
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:6]
    return [
        orjson.dumps(
            {
                "activities": [
                    {
                        "id": f"r-{tag}-{b}-{i}",
                        "user_id": f"u-{rng.randrange(users):08d}",
                        "kind": "purchase" if i % 3 else "visit",
                        "occurred_at": (NOW - timedelta(minutes=i)).isoformat(),
                        "amount": 12.5 + i % 100,
                        "currency": "CNY",
                        "item_id": f"sku-{rng.randrange(5000)}",
                    }
                    for i in range(1000)
                ]
            }
        )
        for b in range(total // 1000)
    ]


async def client(url: str, users: int, total: int, concurrency: int) -> dict[str, float]:
    """The ingest client (its own process): post every body, `concurrency` in flight."""
    bodies = ingest_bodies(users, total, seed=os.getpid())
    recorded = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=300,
        limits=limits,
    ) as http:
        queue = list(reversed(bodies))

        latencies: list[float] = []

        async def worker() -> None:
            nonlocal recorded
            while queue:
                sent = time.perf_counter()
                response = await http.post("/v1/activities", content=queue.pop())
                latencies.append(time.perf_counter() - sent)
                response.raise_for_status()
                recorded += response.json()["recorded"]

        started_at = time.time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if latencies else []
    return {
        "recorded": recorded,
        "seconds": seconds,
        "started_at": started_at,
        "p50_ms": cuts[49] * 1000 if cuts else math.nan,
        "p99_ms": cuts[98] * 1000 if cuts else math.nan,
    }


async def ingest(app: Any, users: int, total: int, concurrency: int) -> dict[str, float]:
    """Serve `app` with uvicorn here; the client posts from another process."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, lifespan="off", log_config=None, access_log=False
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.segmentation",
            "--client",
            f"http://127.0.0.1:{port}",
            "--users",
            str(users),
            "--ingest",
            str(total),
            "--concurrency",
            str(concurrency),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"the ingest client failed (exit {process.returncode})")
        result: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
        return result
    finally:
        server.should_exit = True
        await serving


async def run_ingest(
    args: argparse.Namespace,
    app: Any,
    ctx: ServiceContext,
    meter: CpuMeter,
    figures: dict[str, Any],
) -> None:
    """Step 3: the REST ingest, until the outbox published every activity to Kafka."""
    users = args.users
    before = ctx.outbox.published_total
    spent: dict[str, float] = {}
    async with meter.measure(spent), profiled(args.profile, "ingest"):
        sent = await ingest(app, users, args.ingest, args.concurrency)
        recorded = int(sent["recorded"])
        line(f"REST ingest (x{args.concurrency})", recorded, sent["seconds"], "activities")
        while ctx.outbox.published_total - before < recorded:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        # From the client's first request (wall clock: the client is another process).
        published = time.time() - sent["started_at"]
    line("  ... published to Kafka", recorded, published, "activities")
    print(f"    POST /v1/activities p50 {sent['p50_ms']:.1f} ms, p99 {sent['p99_ms']:.1f} ms")
    cpu, db_cpu = cpu_line(spent, recorded)
    figures.update(
        ingest_activities=recorded,
        ingest_concurrency=args.concurrency,
        ingest_s=sent["seconds"],
        ingest_activities_per_s=recorded / sent["seconds"],
        ingest_published_s=published,
        ingest_published_per_s=recorded / published,
        ingest_p50_ms=sent["p50_ms"],
        ingest_p99_ms=sent["p99_ms"],
        ingest_cpu_ms_per_1000=cpu,
        ingest_db_cpu_ms_per_1000=db_cpu,
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server = args.database_url or os.environ.get("AFTERGLOW_DATABASE_URL", "")
    kafka = args.kafka or os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", "")
    if not server.startswith("postgresql") or not kafka:
        raise SystemExit("needs AFTERGLOW_DATABASE_URL (PostgreSQL) and Kafka: `. .run/env`")
    users = args.users
    name = f"bench_seg_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(create_database_sql(name)))
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    print(f"segmentation benchmark: {users:,} users, {10 * users:,} activities, database {name}")
    figures: dict[str, Any] = {"load_1m": round(os.getloadavg()[0], 2)}
    meter = CpuMeter(admin, name)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    try:
        settings = Settings(
            database_url=url,
            kafka_bootstrap_servers=kafka,
            topic_prefix=prefix,
            api_tokens={TOKEN: frozenset({"*"})},
            log_level="WARNING",
            outbox_batch=args.outbox_batch,
            kafka_linger_ms=20,
        )
        # No periodic pass during the run: the benchmark calls each step itself.
        config = SegmentationConfig(rescore_interval_s=10**9, audience_chunk=args.chunk)
        app = build_spec(config).create_app(settings)
        async with app.router.lifespan_context(app):
            ctx: ServiceContext = app.state.ctx
            engine = create_async_engine(url)
            started = time.perf_counter()
            async with engine.begin() as conn:
                await generate(conn, users, 10)
            async with engine.connect() as conn:
                await conn.execute(text("COMMIT"))
                await conn.execute(text("VACUUM ANALYZE segmentation.activities"))
            seconds = time.perf_counter() - started
            line("generate activities", 10 * users, seconds, "rows")
            figures.update(users=users, activities=10 * users, generate_s=seconds)

            started = time.perf_counter()
            rebuilt = await handlers.rebuild(ctx)
            seconds = time.perf_counter() - started
            line("rebuild from activities", rebuilt, seconds, "users")
            figures.update(rebuild_s=seconds, rebuild_users_per_s=rebuilt / seconds)
            async with engine.connect() as conn:
                await conn.execute(text("COMMIT"))
                await conn.execute(text("VACUUM ANALYZE segmentation.aggregates"))
            for label, key in (
                ()
                if args.ingest_only
                else (("rescoring (first)", "rescoring_first_s"),)
                if args.audience_only
                else (
                    ("rescoring (first)", "rescoring_first_s"),
                    ("rescoring (again)", "rescoring_s"),
                )
            ):
                started = time.perf_counter()
                ranking = await handlers.rescore(ctx)
                assert ranking is not None
                seconds = time.perf_counter() - started
                line(label, ranking.users, seconds, "users")
                figures[key] = seconds
                figures["rescoring_users_per_s"] = ranking.users / seconds

            if not args.audience_only:
                await run_ingest(args, app, ctx, meter, figures)
            if args.ingest_only:
                await engine.dispose()
                return figures
            audience = args.audience or users
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO segmentation.participants (promotion_id, user_id, added_at) "
                        "SELECT 'bench', 'u-' || lpad(g::text, 8, '0'), now() "
                        "FROM generate_series(0, :n - 1) AS g"
                    ),
                    {"n": audience},
                )
            await engine.dispose()
            ended = PromotionEnded(promotion_id="bench", ended_at=NOW, name="bench")
            event = default_registry().decode(encode(ended, source="bench", time=NOW))
            rss_before = peak_mb()
            # Returns once Kafka acknowledged the last chunk (published straight to the bus).
            spent = {}
            async with meter.measure(spent), profiled(args.profile, "audience"):
                started = time.perf_counter()
                await handlers.on_promotion_ended(ctx, event)
                elapsed = time.perf_counter() - started
            line("audience to Kafka (acked)", audience, elapsed, "events")
            cpu, db_cpu = cpu_line(spent, audience)
            print(f"  peak memory before emission {rss_before:,.0f} MB, after {peak_mb():,.0f} MB")
            figures.update(
                audience_events=audience,
                audience_s=elapsed,
                audience_events_per_s=audience / elapsed,
                audience_cpu_ms_per_1000=cpu,
                audience_db_cpu_ms_per_1000=db_cpu,
                peak_mb_before_audience=rss_before,
                peak_mb=peak_mb(),
            )
    finally:
        if not args.keep:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await delete_topics(kafka, prefix)
        await admin.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--ingest", type=int, default=200_000, help="activities through REST")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--audience", type=int, default=0, help="participants (default: users)")
    parser.add_argument("--chunk", type=int, default=10_000, help="audience events per chunk")
    parser.add_argument("--outbox-batch", type=int, default=5000)
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="after generating and rebuilding, only the REST ingest (no rescoring, no audience)",
    )
    parser.add_argument(
        "--audience-only",
        action="store_true",
        help="after generating, rebuilding and one ranking, only the audience emission",
    )
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--kafka", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--profile", default=None, help="write cProfile stats to PREFIX-ingest/-audience.prof"
    )
    parser.add_argument("--client", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(client(args.client, args.users, args.ingest, args.concurrency))
        print(json.dumps(result))
        return
    figures = asyncio.run(run(args))
    if args.json:
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
        with open(args.json, "w") as out:
            json.dump(rounded, out, indent=2)
            out.write("\n")
        print(f"  figures written to {args.json}")


if __name__ == "__main__":
    main()
