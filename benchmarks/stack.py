"""End to end on the four services as separate processes, real Kafka and PostgreSQL, a
loopback provider: what one promotion of N participants costs from REST to provider call.

    python -m benchmarks.stack [--participants 10000] [--put-users 10000] [--concurrency 16]
                               [--ingest-batch 100] [--ingest-concurrency 4] [--latency-ms 20]
                               [--channel-rate R] [--timeout 3600] [--logs DIR] [--json PATH]

Starts `afterglow serve <name>` for segmentation, scheduling, delivery and metrics (the
launcher of services/stack.py, through tests/e2e/stack.py) on a fresh PostgreSQL database
and a fresh topic prefix, with the manual clock; the provider is a loopback HTTP server in
this process answering 200 after `--latency-ms`, which records when each call arrived.
Delivery's rate limit per channel is raised to `--channel-rate` (default: out of the way), so
that the figures show what the services keep up with, not the configured limit.
Then, through the public REST API except for most users' profiles at large N:

0. bulk users (only when N > `--put-users`): the users after the first `--put-users` are
   not created through the API but loaded with PostgreSQL COPY, 20,000 a transaction,
   straight into what a new user's PUT /v1/users leaves in the services' tables once its
   user.updated was handled: segmentation's `users` and `aggregates`, scheduling's `users`
   and delivery's `contacts` (`BULK_TABLES`). Segmentation has no batch form of that
   route: one PUT each (~100/s here) would take hours at 1,000,000, and so would the
   user.updated events through the relay and both consumers (~3 ms of CPU per user, one
   transaction per event in each consumer). Purchases, participants and all that follows
   go through the API and Kafka for every user;
1. users: PUT /v1/users/{id} for the first `--put-users` users (default 10,000; all of
   them when N is no more: the REST figures are measured on that sample), UTC, every
   channel consented, `--concurrency` requests in flight;
2. ingest: one purchase per user through POST /v1/activities, `--ingest-batch` per request
   (100: N/100 requests, enough for a p99), `--ingest-concurrency` requests in flight;
3. participants: all N join one promotion (POST .../participants, 10,000 per request);
4. planning: the promotion ends with `ended_at` an hour ahead of the manual clock, so that
   nothing is due yet: from the end request until scheduling has handled every audience
   event (its consumed counter) - touches planned per second;
5. dispatch: the manual clock moves to `ended_at`, so that the whole launch wave is due at
   that instant, through scheduling's dispatcher, touch.due on Kafka, delivery, to the
   provider: touches per second from due time to the last call, and the latency of each
   call from due time (a burst: p99 is close to the time the whole wave takes).

Between the steps it waits until every service's bus counters stand still. At the end it
reads each service process's peak resident memory (VmHWM) and CPU time from /proc. The
database and the topics are dropped afterwards, and the processes stopped, on any exit
(SIGTERM and SIGINT included; after a SIGKILL the services still get SIGTERM from the
kernel as their parent dies, but the `bench_stack_*` database stays); `--timeout` bounds
the whole run.

Needs AFTERGLOW_DATABASE_URL (PostgreSQL) and AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS (`make up`).
Prints a table; asserts nothing. `--json PATH` writes one flat JSON object:
    participants                      N
    bulk_users                        users loaded with COPY, not through the API (0: none)
    bulk_s, bulk_users_per_s          that load (building the rows in this process included)
    put_users                         users through PUT /v1/users (the sample the users_*
                                      figures are measured on)
    users_s, users_per_s              PUT /v1/users wall time, requests per second
    users_p50_ms, users_p99_ms        latency of one PUT
    ingest_requests, ingest_activities
    ingest_s, ingest_requests_per_s, ingest_activities_per_s
    ingest_p50_ms, ingest_p99_ms      latency of one POST /v1/activities (--ingest-batch items)
    participants_s                    adding the participants
    touches_planned                   touches of every wave the plan lists
    plan_s, planned_per_s             end request -> every audience event handled
    launch_due                        launch touches planned (holdout included)
    provider_calls                    calls the provider received (distinct touches)
    provider_repeats                  calls for a touch already called
    dispatch_s, dispatched_per_s      due time -> last provider call
    dispatch_settled_s                due time -> every launch touch final in the plan
                                      (delivery's results back in scheduling; the plan is
                                      asked at most a tenth of the time, so at 1,000,000 this
                                      may be ~10 s late)
    due_first_ms, due_p50_ms, due_p99_ms, due_max_ms
                                      due time -> provider call
    launch_sent, launch_suppressed, launch_failed, launch_pending
                                      the launch wave in the plan at the end
    users_cpu_ms_per_user             CPU of the four services per PUT user (the request and
                                      its user.updated)
    ingest_cpu_us_per_activity        the same per activity (ingest, relay, metrics)
    plan_cpu_us_per_touch             the same per touch planned (audience, planning, relay)
    dispatch_cpu_us_per_touch         the same per provider call, from due time until
                                      dispatch_settled_s (idle polling included)
                                      (CPU per item is much less distorted by other load
                                      on the machine than the wall-clock rates)
    idle_cpu_pct                      CPU the four services use when nothing happens,
                                      percent of one core (measured before dispatch)
    <service>_peak_rss_mb             peak resident memory of each service process
    <service>_cpu_s                   CPU time of each service process over the whole run
    driver_peak_rss_mb                this process (the client and the provider)
    load_1m_start, load_1m_end        load average (other work makes figures pessimistic)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import orjson

from benchmarks.bus import delete_topics
from services.sandbox import HttpRequest, HttpResponse, LoopbackHttpServer
from tests.conftest import fresh_database
from tests.e2e.stack import ProcessStack, json_of, process_stack

PROMOTION = "bench-stack"
PARTICIPANT_BATCH = 10_000
CHANNELS = ("sms", "email", "push", "in_app")
# Users a COPY transaction of the bulk load (bounded memory in this process).
BULK_CHUNK = 20_000


# -- pure helpers (unit-tested) --------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank `p` quantile (0 <= p <= 1) of `values`; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def consumed(metrics_text: str, topic: str) -> float:
    """Messages of `topic` handled and committed, from a service's /metrics text."""
    total = 0.0
    needle = f'topic="{topic}"'
    for line in metrics_text.splitlines():
        if line.startswith("afterglow_bus_messages_consumed_total{") and needle in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def proc_status_kb(text: str, field: str) -> int | None:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), or None."""
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def proc_cpu_s(stat: str) -> float:
    """utime + stime of /proc/<pid>/stat, in seconds."""
    # The command name (field 2) may hold spaces; the fields after its ")" are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def table(figures: dict[str, Any]) -> str:
    """The figures as `name  value` lines, values aligned."""
    width = max((len(k) for k in figures), default=0)
    lines = []
    for key, value in figures.items():
        if isinstance(value, float):
            shown = (
                "nan"
                if math.isnan(value)
                else f"{value:,.1f}"
                if abs(value) >= 10
                else f"{value:.3g}"
            )
        elif isinstance(value, int) and not isinstance(value, bool):
            shown = f"{value:,}"
        else:
            shown = str(value)
        lines.append(f"  {key.ljust(width)}  {shown:>14}")
    return "\n".join(lines)


# -- the loopback provider -------------------------------------------------------------------


class Recorder:
    """A provider on loopback: 200 after `latency_s`, the arrival time of each call kept
    (a float per call, so that a million calls stay small)."""

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.arrivals = array("d")
        self.keys: set[str] = set()
        self.repeats = 0
        self._http = LoopbackHttpServer(self._handle)

    @property
    def url(self) -> str:
        return self._http.url

    async def _handle(self, request: HttpRequest) -> HttpResponse | None:
        key = request.headers.get("idempotency-key", "")
        if key in self.keys:
            self.repeats += 1
        else:
            self.keys.add(key)
            self.arrivals.append(time.monotonic())
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return HttpResponse.json(200, {"provider_message_id": f"pm-{len(self.keys)}"})

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Recorder]:
        await self._http.start()
        try:
            yield self
        finally:
            await self._http.stop()


# -- the driver ------------------------------------------------------------------------------


def user_id(i: int) -> str:
    return f"u-{i:08d}"


def user_body(i: int) -> dict[str, Any]:
    return {
        "birth_year": 1960 + i % 45,
        "timezone": "UTC",
        "locale": "en-US",
        "addresses": {
            "sms": f"+1555{i:08d}",
            "email": f"{user_id(i)}@example.com",
            "push": f"device-{i}",
            "in_app": user_id(i),
        },
        "consent": dict.fromkeys(CHANNELS, True),
    }


def activity_batches(n: int, start: datetime, size: int) -> Iterator[dict[str, Any]]:
    """One purchase per user, `size` per request."""
    for first in range(0, n, size):
        yield {
            "activities": [
                {
                    "id": f"buy-{i}",
                    "user_id": user_id(i),
                    "kind": "purchase",
                    "occurred_at": (start - timedelta(days=1 + i % 90)).isoformat(),
                    "amount": float(10 + i % 500),
                    "currency": "USD",
                    "item_id": f"sku-{i % 40}",
                    "category": ("beauty", "home", "fashion")[i % 3],
                }
                for i in range(first, min(first + size, n))
            ]
        }


# What PUT /v1/users leaves for a new user in each service's tables, once segmentation has
# written it and scheduling and delivery have handled its user.updated: (table, columns).
BULK_TABLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "segmentation",
        "users",
        (
            "user_id",
            "birth_year",
            "timezone",
            "locale",
            "addresses",
            "consent",
            "created_at",
            "updated_at",
        ),
    ),
    (
        "segmentation",
        "aggregates",
        ("user_id", "purchases", "visits", "monetary", "ltv", "abuse_review", "updated_at"),
    ),
    (
        "scheduling",
        "users",
        ("user_id", "timezone", "consent", "fatigue", "unanswered", "first_seen_at", "updated_at"),
    ),
    ("delivery", "contacts", ("user_id", "addresses", "consent", "erased", "updated_at")),
)


def bulk_rows(first: int, last: int, now: datetime) -> list[list[tuple[Any, ...]]]:
    """The rows of `BULK_TABLES`, in that order, for new users `first`..`last - 1`."""
    rows: list[list[tuple[Any, ...]]] = [[] for _ in BULK_TABLES]
    seg_users, aggregates, sched_users, contacts = rows
    for i in range(first, last):
        body = user_body(i)
        uid = user_id(i)
        addresses = orjson.dumps(body["addresses"]).decode()
        consent = orjson.dumps(body["consent"]).decode()
        seg_users.append(
            (
                uid,
                body["birth_year"],
                body["timezone"],
                body["locale"],
                addresses,
                consent,
                now,
                now,
            )
        )
        aggregates.append((uid, 0, 0, 0.0, 0.0, False, now))
        sched_users.append((uid, body["timezone"], consent, "normal", 0, now, now))
        contacts.append((uid, addresses, consent, False, now))
    return rows


async def bulk_load_users(url: str, first: int, last: int, now: datetime) -> None:
    """Users `first`..`last - 1` straight into the services' tables with COPY (`BULK_TABLES`),
    `BULK_CHUNK` users a transaction, built chunk by chunk (never the whole list in memory)."""
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        for start in range(first, last, BULK_CHUNK):
            end = min(start + BULK_CHUNK, last)
            rows = bulk_rows(start, end, now)
            async with conn.transaction():
                for (schema, table, columns), records in zip(BULK_TABLES, rows, strict=True):
                    await conn.copy_records_to_table(
                        table, schema_name=schema, records=records, columns=list(columns)
                    )
            if (end - first) % (10 * BULK_CHUNK) == 0 or end == last:
                say(f"  {end - first:,} of {last - first:,} copied")
    finally:
        await conn.close()


async def users_consumed(s: ProcessStack, topic: str, at_least: int, deadline: float) -> None:
    """Until scheduling and delivery have each handled `at_least` user.updated events."""
    for name in ("scheduling", "delivery"):
        while consumed((await s.clients[name].get("/metrics")).text, topic) < at_least:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not consume the users before the timeout")
            await asyncio.sleep(0.25)


Request = tuple[str, str, Any]  # method, path, JSON body


async def drive(
    client: httpx.AsyncClient, requests: Iterable[Request], concurrency: int, total: int = 0
) -> tuple[float, list[float]]:
    """Send every request, `concurrency` in flight; (wall seconds, latency of each in ms).
    Any answer other than 2xx stops the run with its text. With `total`, says how far it
    got at every tenth."""
    latencies: list[float] = []
    pending = iter(requests)
    step = max(1, total // 10) if total >= 1000 else 0

    async def worker() -> None:
        for method, path, body in pending:
            sent = time.perf_counter()
            answer = await client.request(method, path, json=body)
            latencies.append((time.perf_counter() - sent) * 1000)
            if step and len(latencies) % step == 0:
                say(f"  {len(latencies):,} of {total:,}")
            if answer.status_code >= 300:
                raise RuntimeError(f"{method} {path}: {answer.status_code} {answer.text[:500]}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def settle(s: ProcessStack, deadline: float, quiet_s: float = 1.0) -> None:
    """Until every service's bus counters stand still for `quiet_s`."""
    last = await s.bus_counts()
    since = time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            raise TimeoutError("the services did not settle before the timeout")
        await asyncio.sleep(0.25)
        current = await s.bus_counts()
        if current != last:
            last, since = current, time.monotonic()


def service_usage(s: ProcessStack) -> dict[str, tuple[float | None, float | None]]:
    """(peak RSS MB, CPU s) of each running service process."""
    out: dict[str, tuple[float | None, float | None]] = {}
    for name, proc in s.stack.procs.items():
        peak = cpu = None
        if proc.pid is not None and proc.running():
            with contextlib.suppress(OSError, ValueError, IndexError):
                kb = proc_status_kb(Path(f"/proc/{proc.pid}/status").read_text(), "VmHWM")
                peak = None if kb is None else round(kb / 1024, 1)
                cpu = round(proc_cpu_s(Path(f"/proc/{proc.pid}/stat").read_text()), 2)
        out[name] = (peak, cpu)
    return out


def services_cpu(s: ProcessStack) -> float:
    """CPU seconds the four service processes have used so far."""
    return sum(cpu or 0.0 for _, cpu in service_usage(s).values())


async def launch_wave(s: ProcessStack) -> dict[str, Any]:
    plan = await json_of(await s.clients["scheduling"].get(f"/v1/promotions/{PROMOTION}/plan"))
    for wave in plan["waves"]:
        if wave["wave"] == "launch":
            return dict(wave)
    return {"planned": 0, "pending": 0, "dispatched": 0, "sent": 0, "failed": 0, "suppressed": {}}


async def scenario(
    s: ProcessStack,
    provider: Recorder,
    args: argparse.Namespace,
    start: datetime,
    prefix: str,
    url: str,
) -> dict[str, Any]:
    n = args.participants
    deadline = time.monotonic() + args.timeout
    seg = s.clients["segmentation"]
    f: dict[str, Any] = {"participants": n}

    put = min(n, args.put_users)
    bulk = n - put
    users_topic = f"{prefix}users"
    f["bulk_users"] = bulk
    if bulk:
        say(f"bulk users: {bulk:,} with COPY into the services' tables (not through the API)")
        started = time.perf_counter()
        await bulk_load_users(url, put, n, start)
        seconds = time.perf_counter() - started
        f.update(bulk_s=round(seconds, 2), bulk_users_per_s=bulk / seconds)

    say(f"users: {put:,} PUT /v1/users, {args.concurrency} in flight")
    f["put_users"] = put
    cpu = services_cpu(s)
    seconds, lat = await drive(
        seg,
        (("PUT", f"/v1/users/{user_id(i)}", user_body(i)) for i in range(put)),
        args.concurrency,
        put,
    )
    f.update(
        users_s=round(seconds, 2),
        users_per_s=put / seconds,
        users_p50_ms=percentile(lat, 0.5),
        users_p99_ms=percentile(lat, 0.99),
    )
    await users_consumed(s, users_topic, put, deadline)
    await settle(s, deadline)
    # Until every service has handled the user.updated events too: they are the cost of a user.
    f["users_cpu_ms_per_user"] = (services_cpu(s) - cpu) / put * 1e3

    requests = math.ceil(n / args.ingest_batch)
    say(f"ingest: {n:,} purchases in {requests:,} POST /v1/activities")
    cpu = services_cpu(s)
    seconds, lat = await drive(
        seg,
        (("POST", "/v1/activities", b) for b in activity_batches(n, start, args.ingest_batch)),
        args.ingest_concurrency,
        requests,
    )
    f.update(
        ingest_requests=requests,
        ingest_activities=n,
        ingest_s=round(seconds, 2),
        ingest_requests_per_s=requests / seconds,
        ingest_activities_per_s=n / seconds,
        ingest_p50_ms=percentile(lat, 0.5),
        ingest_p99_ms=percentile(lat, 0.99),
    )
    await settle(s, deadline)
    f["ingest_cpu_us_per_activity"] = (services_cpu(s) - cpu) / n * 1e6

    say("participants")
    seconds, _ = await drive(
        seg,
        (
            (
                "POST",
                f"/v1/promotions/{PROMOTION}/participants",
                {"user_ids": [user_id(j) for j in range(i, min(i + PARTICIPANT_BATCH, n))]},
            )
            for i in range(0, n, PARTICIPANT_BATCH)
        ),
        2,
    )
    f["participants_s"] = round(seconds, 2)
    await settle(s, deadline)

    say("planning: the promotion ends an hour ahead of the clock")
    due = start + timedelta(hours=1)
    cpu = services_cpu(s)
    planning_started = time.perf_counter()
    answer = await s.clients["scheduling"].post(
        f"/v1/promotions/{PROMOTION}/end",
        json={"ended_at": due.isoformat(), "name": PROMOTION, "policy": "default"},
    )
    await json_of(answer)
    while consumed((await s.clients["scheduling"].get("/metrics")).text, f"{prefix}audience") < n:
        if time.monotonic() > deadline:
            raise TimeoutError("planning did not finish before the timeout")
        await asyncio.sleep(0.1)
    plan_s = time.perf_counter() - planning_started
    plan = await json_of(await s.clients["scheduling"].get(f"/v1/promotions/{PROMOTION}/plan"))
    planned = sum(w["planned"] for w in plan["waves"])
    launch = await launch_wave(s)
    f.update(
        touches_planned=planned,
        plan_s=round(plan_s, 2),
        planned_per_s=planned / plan_s,
        launch_due=launch["planned"],
    )
    await settle(s, deadline)
    # With the relay of touch.planned and what the other services do with it.
    f["plan_cpu_us_per_touch"] = (services_cpu(s) - cpu) / planned * 1e6 if planned else math.nan

    # What the four services spend doing nothing (polling), to judge the CPU figures by.
    cpu = services_cpu(s)
    await asyncio.sleep(2.0)
    f["idle_cpu_pct"] = (services_cpu(s) - cpu) / 2.0 * 100

    say(f"dispatch: {launch['planned']:,} launch touches due at once")
    cpu = services_cpu(s)
    body = {"now": due.isoformat()}
    for name in ("segmentation", "delivery", "metrics"):
        await json_of(await s.clients[name].put("/v1/admin/clock", json=body))
    due_mono = time.monotonic()
    s.timeline.add(due_mono, due)
    await json_of(await s.clients["scheduling"].put("/v1/admin/clock", json=body))
    told = time.monotonic()
    while True:
        asked = time.monotonic()
        launch = await launch_wave(s)
        if launch["pending"] == 0 and launch["dispatched"] == 0:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"dispatch did not finish before the timeout: {launch}")
        if time.monotonic() - told >= 30:
            told = time.monotonic()
            unsettled = launch["pending"] + launch["dispatched"]
            say(f"  {len(provider.arrivals):,} provider calls, {unsettled:,} touches not final")
        # The plan counts every touch (2,000,000 at 1,000,000 participants: 1.2 s of
        # PostgreSQL on parallel workers): asked back to back, it took 40% of the rate at
        # which scheduling settled delivery's results. At most a tenth of the time asking.
        await asyncio.sleep(max(0.25, 9 * (time.monotonic() - asked)))
    settled_s = time.monotonic() - due_mono
    cpu = services_cpu(s) - cpu
    calls = len(provider.arrivals)
    lat = [(at - due_mono) * 1000 for at in provider.arrivals]
    dispatch_s = (max(provider.arrivals) - due_mono) if calls else math.nan
    f.update(
        provider_calls=calls,
        provider_repeats=provider.repeats,
        dispatch_s=round(dispatch_s, 2),
        dispatched_per_s=calls / dispatch_s if calls else 0.0,
        dispatch_settled_s=round(settled_s, 2),
        due_first_ms=min(lat) if lat else math.nan,
        due_p50_ms=percentile(lat, 0.5),
        due_p99_ms=percentile(lat, 0.99),
        due_max_ms=max(lat) if lat else math.nan,
        launch_sent=launch["sent"],
        launch_suppressed=sum(launch["suppressed"].values()),
        launch_failed=launch["failed"],
        launch_pending=launch["pending"],
        dispatch_cpu_us_per_touch=cpu / calls * 1e6 if calls else math.nan,
    )
    for name, (peak, total_cpu) in service_usage(s).items():
        f[f"{name}_peak_rss_mb"] = peak
        f[f"{name}_cpu_s"] = total_cpu
    return f


def delivery_config(rate_per_s: float) -> str:
    """Every channel's rate limit at `rate_per_s`, so that the figures show what the
    services keep up with rather than the limit configured (1,000/s by default)."""
    burst = max(1, int(rate_per_s / 10))
    channels = {c: {"rate_per_s": rate_per_s, "burst": burst} for c in CHANNELS}
    return json.dumps({"channels": channels})


def say(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = os.environ.get("AFTERGLOW_DATABASE_URL", "")
    bootstrap = os.environ.get("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", "")
    if not base.startswith("postgresql") or not bootstrap:
        raise SystemExit("set AFTERGLOW_DATABASE_URL (PostgreSQL) and the Kafka servers: make up")
    suffix = uuid.uuid4().hex[:8]
    prefix = f"bstk{suffix}."
    # 15:00 UTC tomorrow: the manual clocks start at the wall time and only go forward,
    # and 15:00-16:00 UTC is outside the default quiet hours for users in UTC.
    start = (datetime.now(UTC) + timedelta(days=1)).replace(
        hour=15, minute=0, second=0, microsecond=0
    )
    load_start = round(os.getloadavg()[0], 2)
    try:
        async with (
            fresh_database(base, f"bench_stack_{suffix}") as url,
            Recorder(args.latency_ms / 1000).running() as provider,
        ):
            with tempfile.TemporaryDirectory(prefix="bench-stack-") as workdir:
                async with process_stack(
                    bootstrap,
                    url,
                    provider.url,
                    Path(args.logs or workdir),
                    start=start,
                    topic_prefix=prefix,
                    extra_env={"AFTERGLOW_DELIVERY_CONFIG": delivery_config(args.channel_rate)},
                    ready_timeout_s=120,
                ) as s:
                    say("the four services are ready")
                    figures = await scenario(s, provider, args, start, prefix, url)
    finally:
        say("services stopped, database dropped; deleting the topics")
        with contextlib.suppress(Exception):
            await delete_topics(bootstrap, prefix)
    figures["driver_peak_rss_mb"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
    )
    figures["load_1m_start"] = load_start
    figures["load_1m_end"] = round(os.getloadavg()[0], 2)
    return figures


async def bounded(args: argparse.Namespace) -> dict[str, Any]:
    """`run` within the timeout (plus time to start and clean up); SIGTERM cancels it, which
    unwinds through the finally blocks: the services stop, the database is dropped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await asyncio.wait_for(run(args), args.timeout + 300)


def finite(figures: dict[str, Any]) -> dict[str, Any]:
    """NaN (a figure with nothing to measure) as null, so that the JSON is strict."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in figures.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--participants", type=int, default=10_000)
    parser.add_argument(
        "--put-users",
        type=int,
        default=10_000,
        help="users through PUT /v1/users (the rest are COPY-loaded into the services' tables)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="user PUTs in flight")
    parser.add_argument(
        "--ingest-concurrency", type=int, default=4, help="POST /v1/activities in flight"
    )
    parser.add_argument(
        "--ingest-batch", type=int, default=100, help="activities per POST /v1/activities"
    )
    parser.add_argument("--latency-ms", type=float, default=20.0, help="provider latency")
    parser.add_argument(
        "--channel-rate",
        type=float,
        default=1e6,
        help="delivery's rate limit per channel, calls/s (default: high enough not to bind)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    parser.add_argument("--logs", default=None, help="keep the services' logs in this folder")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.participants < 1:
        parser.error("--participants: at least 1")
    if args.put_users < 1:
        parser.error("--put-users: at least 1")
    if args.concurrency < 1 or args.ingest_concurrency < 1:
        parser.error("--concurrency and --ingest-concurrency: at least 1")
    if not 1 <= args.ingest_batch <= 1000:
        parser.error("--ingest-batch: from 1 to 1000 (the API's limit per request)")
    try:
        figures = asyncio.run(bounded(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: services stopped, database dropped", file=sys.stderr)
        return 130
    print(f"stack: {args.participants:,} participants, four services on Kafka and PostgreSQL")
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps(finite(figures), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
