"""Segmentation on PostgreSQL: rebuild and full ranking, REST ingest, audience emission to Kafka.

    python -m benchmarks.segmentation [--users 1000000] [--ingest 200000] [--concurrency 4]
                                      [--audience N] [--keep]

Needs AFTERGLOW_DATABASE_URL (PostgreSQL) and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (from
`make up`; `. .run/env`). Works in a database of its own, dropped afterwards unless --keep.
Generates N users and 10 x N activities in SQL (INSERT ... SELECT generate_series), then:
1. rebuild: every aggregate from the raw activities (what a restore needs);
2. rescoring: the full ranking from the kept aggregates (twice: cold and warm);
3. ingest: new activities through the ASGI app, in batches of 1,000 (`--concurrency` requests
   in flight on this one process);
4. emission: one audience event per participant of an ended promotion, until Kafka acknowledged
   every one (outbox relay included).
Prints users/s, activities/s, events/s and peak memory (ru_maxrss). Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from services.segmentation import handlers
from services.segmentation.app import build_spec
from services.segmentation.config import SegmentationConfig
from shared.events import PromotionEnded, default_registry, encode
from shared.service import ServiceContext
from shared.settings import Settings

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


async def ingest(client: httpx.AsyncClient, users: int, total: int, concurrency: int) -> int:
    rng = random.Random(1)
    batches = total // 1000
    queue: asyncio.Queue[int] = asyncio.Queue()
    for b in range(batches):
        queue.put_nowait(b)
    recorded = 0

    async def worker() -> None:
        nonlocal recorded
        while True:
            try:
                b = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {
                "activities": [
                    {
                        "id": f"r-{b}-{i}",
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
            response = await client.post("/v1/activities", json=body)
            response.raise_for_status()
            recorded += response.json()["recorded"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return recorded


async def run(args: argparse.Namespace) -> None:
    server = args.database_url or os.environ.get("AFTERGLOW_DATABASE_URL", "")
    kafka = args.kafka or os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", "")
    if not server.startswith("postgresql") or not kafka:
        raise SystemExit("needs AFTERGLOW_DATABASE_URL (PostgreSQL) and Kafka: `. .run/env`")
    users = args.users
    name = f"bench_seg_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(server, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server).set(database=name).render_as_string(hide_password=False)
    print(f"segmentation benchmark: {users:,} users, {10 * users:,} activities, database {name}")
    try:
        settings = Settings(
            database_url=url,
            kafka_bootstrap_servers=kafka,
            topic_prefix=f"bench{uuid.uuid4().hex[:6]}.",
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
            line("generate activities", 10 * users, time.perf_counter() - started, "rows")

            started = time.perf_counter()
            rebuilt = await handlers.rebuild(ctx)
            line("rebuild from activities", rebuilt, time.perf_counter() - started, "users")
            async with engine.connect() as conn:
                await conn.execute(text("COMMIT"))
                await conn.execute(text("VACUUM ANALYZE segmentation.aggregates"))
            for label in ("rescoring (first)", "rescoring (again)"):
                started = time.perf_counter()
                ranking = await handlers.rescore(ctx)
                assert ranking is not None
                line(label, ranking.users, time.perf_counter() - started, "users")

            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://segmentation",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=120,
            ) as client:
                started = time.perf_counter()
                recorded = await ingest(client, users, args.ingest, args.concurrency)
                line(
                    f"REST ingest (x{args.concurrency})",
                    recorded,
                    time.perf_counter() - started,
                    "activities",
                )

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
            before = ctx.outbox.published_total
            rss_before = peak_mb()
            started = time.perf_counter()
            await handlers.on_promotion_ended(ctx, event)
            staged = time.perf_counter() - started
            # The relay counts what Kafka acknowledged; it signals nothing else to wait on.
            while ctx.outbox.published_total - before < audience:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - started
            line("audience into the outbox", audience, staged, "events")
            line("audience to Kafka (acked)", audience, elapsed, "events")
            print(f"  peak memory before emission {rss_before:,.0f} MB, after {peak_mb():,.0f} MB")
    finally:
        if not args.keep:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--ingest", type=int, default=200_000, help="activities through REST")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--audience", type=int, default=0, help="participants (default: users)")
    parser.add_argument("--chunk", type=int, default=2000, help="audience events per transaction")
    parser.add_argument("--outbox-batch", type=int, default=5000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--kafka", default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
