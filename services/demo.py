"""`afterglow demo`: the embedded mode end to end, with a printed report.

A few thousand synthetic users (ages, timezones, consent choices and purchase
histories that put them in every tier) take part in two overlapping promotions.
The manual clock then plays 34 days in 12-hour steps while the four services plan,
dispatch, deliver (to a sandbox provider on loopback that fails now and then) and
count. After every step some users react to what they received, through the
services' own doors: signed provider receipts to delivery (delivered, opened,
clicked, unsubscribed, complained) and purchases to segmentation. The report shows
each wave's funnel, the experiment against its holdout, and checks from the
provider's log that no user went over a cap or was touched in quiet hours.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson

from services.embedded import Embedded, embedded
from services.sandbox import Accepted, SandboxProvider
from shared.bus.memory import InProcessBus
from shared.clock import ManualClock
from shared.settings import CHANNELS, DEFAULT_PORTS, DEV_TOKEN, SERVICES, ClockKind, Settings

START = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
DAYS = 34
STEP = timedelta(hours=12)
RECEIPT_SECRET = "demo-receipt-secret"
WAVES = ("launch", "day3", "day7", "day14", "day30")
# (timezone, share of users)
TIMEZONES = (
    ("Asia/Shanghai", 0.45),
    ("Asia/Tokyo", 0.1),
    ("Asia/Kolkata", 0.1),
    ("Europe/Paris", 0.15),
    ("America/New_York", 0.15),
    ("UTC", 0.05),
)
# Share of users who consent to each channel.
CONSENT = {"sms": 0.6, "email": 0.85, "push": 0.5, "in_app": 0.7, "social": 0.3}
CATEGORIES = ("beauty", "fashion", "home", "food", "electronics")
# What a user does with a message, per message accepted by the provider.
REACTIONS = {"delivered": 0.93, "opened": 0.32, "clicked": 0.35, "buy": 0.3}
UNSUBSCRIBE, COMPLAIN = 0.012, 0.004
# Chance per user and half-day of a purchase without any message (the baseline).
ORGANIC = 0.004
RECEIPTS_PER_POST = 500
SETTLE_PAUSE_S = 0.005


@dataclass(frozen=True)
class Promotion:
    id: str
    name: str
    ends_after: timedelta
    share: float  # of all users who take part


PROMOTIONS = (
    Promotion("spring-sale", "Spring sale", timedelta(0), 0.8),
    Promotion("member-week", "Member week", timedelta(days=4), 0.5),
)


@dataclass
class Outcome:
    segments: dict[str, Any]
    users: int
    participants: dict[str, int]
    plans: dict[str, dict[str, Any]]
    funnels: dict[str, dict[str, Any]]
    experiments: dict[str, dict[str, Any] | None]
    provider: dict[str, Any]
    caps_over: list[str]
    quiet_hours: list[str]
    after_stop: list[str]
    reactions: dict[str, int]
    seconds: float


@dataclass
class World:
    """The synthetic users and what happened to them (to check the provider's log)."""

    rng: random.Random
    tz: dict[str, str] = field(default_factory=dict)
    # user -> {channel: since} for unsubscribes, {"*": since} for complaints
    stopped: dict[str, dict[str, datetime]] = field(default_factory=lambda: defaultdict(dict))
    reactions: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seen: int = 0  # sandbox messages already reacted to
    activity: int = 0


def demo_settings(workdir: Path, provider_url: str) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{workdir / 'afterglow.db'}?inline=1",
        "clock": ClockKind.MANUAL,
        "api_tokens": {DEV_TOKEN: frozenset({"*"})},
        "receipt_secret": RECEIPT_SECRET,
        "log_level": "ERROR",
    }
    values.update({f"provider_{channel}_url": provider_url for channel in CHANNELS})
    return Settings.model_validate(values)


def user_id(index: int) -> str:
    return f"u-{index:05d}"


def profile(rng: random.Random, index: int) -> dict[str, Any]:
    user = user_id(index)
    timezone = rng.choices([tz for tz, _ in TIMEZONES], [w for _, w in TIMEZONES])[0]
    # Ages 18 to 65, some unknown.
    birth_year = None if rng.random() < 0.08 else START.year - rng.randint(18, 65)
    consent = {channel: rng.random() < share for channel, share in CONSENT.items()}
    if rng.random() < 0.03:
        consent = dict.fromkeys(CHANNELS, False)
    body: dict[str, Any] = {
        "timezone": timezone,
        "locale": "zh-CN" if timezone == "Asia/Shanghai" else "en-US",
        "addresses": {
            "sms": f"+86138{index:08d}",
            "email": f"{user}@example.com",
            "push": f"device-{user}",
            "in_app": user,
            "social": f"open-{user}",
        },
        "consent": consent,
    }
    if birth_year is not None:
        body["birth_year"] = birth_year
    return body


def history(rng: random.Random, index: int) -> list[dict[str, Any]]:
    """Purchases of the last year: many small buyers, a few frequent big spenders."""
    kind = rng.random()
    if kind < 0.2:
        return []  # never bought: silent
    count, scale, recent = (
        (rng.randint(8, 20), 600.0, 30) if kind > 0.9 else (rng.randint(1, 6), 150.0, 200)
    )
    return [
        {
            "id": f"h-{index}-{n}",
            "user_id": user_id(index),
            "kind": "purchase",
            "occurred_at": (START - timedelta(days=rng.randint(1, recent + 160))).isoformat(),
            "amount": round(rng.lognormvariate(0, 0.6) * scale, 2),
            "currency": "CNY",
            "item_id": f"sku-{rng.randint(1, 80)}",
            "category": rng.choice(CATEGORIES),
        }
        for n in range(count)
    ]


async def check_operations(stack: Embedded) -> list[str]:
    lines = []
    for name in SERVICES:
        client = stack.clients[name]
        statuses = [(await client.get(path)).status_code for path in ("/healthz", "/readyz")]
        metrics = await client.get("/metrics")
        if statuses != [200, 200] or metrics.status_code != 200:
            raise RuntimeError(f"{name} is not healthy: {statuses}")
        lines.append(
            f"  {name:<13} healthz 200  readyz 200  metrics 200 "
            f"({len(metrics.text.splitlines())} lines)"
        )
    return lines


async def ok(answer: Awaitable[httpx.Response]) -> Any:
    response = await answer
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text}"
        )
    return response.json()


async def bounded(calls: Iterable[Awaitable[Any]], limit: int = 16) -> None:
    """Run the calls with at most `limit` in flight (they wait on the databases)."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[Any]) -> None:
        async with gate:
            await call

    await asyncio.gather(*(one(call) for call in calls))


async def idle(stack: Embedded, bus: InProcessBus) -> bool:
    """No event waiting on the bus, no outbox row to relay, no touch due and unsent."""
    from services.scheduling.dispatcher import next_due

    if bus.backlog():
        return False
    for app in stack.apps.values():
        ctx = app.state.ctx
        if ctx is None or await ctx.outbox.pending():
            return False
    due = await next_due(stack.apps["scheduling"].state.ctx)
    return due is None or due > stack.clock.now()


async def settle(stack: Embedded, bus: InProcessBus, timeout_s: float = 60.0) -> None:
    """Until everything this moment set off has been handled (idle twice in a row): wait
    for the bus to drain (woken by the last commit), give what the last handlers set off
    (outbox relays, dispatcher) a moment to start, then look."""
    try:
        async with asyncio.timeout(timeout_s):
            quiet = 0
            while quiet < 2:
                await bus.drained()
                await asyncio.sleep(SETTLE_PAUSE_S)
                quiet = quiet + 1 if await idle(stack, bus) else 0
    except TimeoutError:
        raise RuntimeError(f"the services did not settle at {stack.clock.now()}") from None


async def enrol(stack: Embedded, users: int, world: World) -> dict[str, int]:
    rng = world.rng
    segmentation = stack.clients["segmentation"]
    profiles = [profile(rng, i) for i in range(users)]
    world.tz = {user_id(i): body["timezone"] for i, body in enumerate(profiles)}
    await bounded(
        ok(segmentation.put(f"/v1/users/{user_id(i)}", json=body))
        for i, body in enumerate(profiles)
    )
    purchases = [p for i in range(users) for p in history(rng, i)]
    for first in range(0, len(purchases), 1000):
        await ok(
            segmentation.post(
                "/v1/activities", json={"activities": purchases[first : first + 1000]}
            )
        )
    participants = {}
    for promotion in PROMOTIONS:
        members = [user_id(i) for i in range(users) if rng.random() < promotion.share]
        participants[promotion.id] = len(members)
        await ok(
            segmentation.post(
                f"/v1/promotions/{promotion.id}/participants", json={"user_ids": members}
            )
        )
    return participants


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(RECEIPT_SECRET.encode(), body, hashlib.sha256).hexdigest()


async def post_receipts(stack: Embedded, receipts: list[dict[str, str]]) -> None:
    """Signed batches of receipts (a JSON array each), as a webhook provider sends them."""
    for first in range(0, len(receipts), RECEIPTS_PER_POST):
        body = orjson.dumps(receipts[first : first + RECEIPTS_PER_POST])
        headers = {"content-type": "application/json", "X-Afterglow-Signature": sign(body)}
        answer = await ok(
            stack.clients["delivery"].post("/v1/receipts", content=body, headers=headers)
        )
        if answer["unknown"]:
            raise RuntimeError(f"receipts for unknown touches: {answer['unknown'][:5]}")


async def react(stack: Embedded, sandbox: SandboxProvider, world: World, users: int) -> None:
    """Users answer the messages just sent (receipts come back at once, as the clock
    stands still, in signed batches), and some buy without being asked during the last
    step (everyone, the holdout too: the baseline of the experiment)."""
    rng, now = world.rng, stack.clock.now()
    fresh = sandbox.messages[world.seen :]
    world.seen = len(sandbox.messages)
    receipts: list[dict[str, str]] = []
    stamp = now.isoformat()
    purchases: list[dict[str, Any]] = []
    for message in fresh:
        if rng.random() >= REACTIONS["delivered"]:
            continue
        receipts.append({"id": message.touch_id, "event": "delivered", "at": stamp})
        world.reactions["delivered"] += 1
        roll = rng.random()
        if roll < UNSUBSCRIBE + COMPLAIN:
            event = "unsubscribed" if roll < UNSUBSCRIBE else "complained"
            receipts.append({"id": message.touch_id, "event": event, "at": stamp})
            key = "*" if event == "complained" else message.channel
            world.stopped[message.user_id].setdefault(key, now)
            world.reactions[event] += 1
            continue
        if rng.random() >= REACTIONS["opened"]:
            continue
        receipts.append({"id": message.touch_id, "event": "opened", "at": stamp})
        world.reactions["opened"] += 1
        if rng.random() >= REACTIONS["clicked"]:
            continue
        receipts.append({"id": message.touch_id, "event": "clicked", "at": stamp})
        world.reactions["clicked"] += 1
        if rng.random() < REACTIONS["buy"]:
            purchases.append(purchase(world, message.user_id, now, message.promotion_id))
    for index in range(users):
        if rng.random() < ORGANIC:
            at = now - timedelta(seconds=rng.uniform(0, STEP.total_seconds()))
            purchases.append(purchase(world, user_id(index), at, None))
    await post_receipts(stack, receipts)
    if purchases:
        body = {"activities": purchases}
        await ok(stack.clients["segmentation"].post("/v1/activities", json=body))
        world.reactions["purchases"] += len(purchases)


def purchase(world: World, user: str, at: datetime, promotion: str | None) -> dict[str, Any]:
    world.activity += 1
    found: dict[str, Any] = {
        "id": f"demo-{world.activity}",
        "user_id": user,
        "kind": "purchase",
        "occurred_at": at.isoformat(),
        "amount": round(world.rng.lognormvariate(0, 0.5) * 180, 2),
        "currency": "CNY",
        "item_id": f"sku-{world.rng.randint(1, 80)}",
        "category": world.rng.choice(CATEGORIES),
    }
    if promotion is not None:
        found["promotion_id"] = promotion
    return found


def over_caps(messages: list[Accepted]) -> list[str]:
    """Users with more than 2 touches in any 7 days or 5 in any 30, from the provider's log
    (a touch sent on two channels at once counts once, as the caps count touches)."""
    touches: dict[str, dict[str, datetime]] = defaultdict(dict)
    for m in messages:
        if m.at is not None:
            touches[m.user_id].setdefault(m.touch_id, m.at)
    over = []
    for user, by_touch in touches.items():
        times = sorted(by_touch.values())
        for i, first in enumerate(times):
            in_7 = sum(1 for t in times[i:] if t - first < timedelta(days=7))
            in_30 = sum(1 for t in times[i:] if t - first < timedelta(days=30))
            if in_7 > 2 or in_30 > 5:
                over.append(user)
                break
    return over


def in_quiet_hours(messages: list[Accepted], tz: dict[str, str]) -> list[str]:
    found = []
    for m in messages:
        if m.at is not None:
            hour = m.at.astimezone(ZoneInfo(tz[m.user_id])).hour
            if hour >= 21 or hour < 9:
                found.append(m.touch_id)
    return found


def after_stop(messages: list[Accepted], world: World) -> list[str]:
    """Messages accepted after the user unsubscribed from that channel or complained."""
    found = []
    for m in messages:
        stops = world.stopped.get(m.user_id, {})
        since = min(
            (at for key, at in stops.items() if key in ("*", m.channel)),
            default=None,
        )
        if since is not None and m.at is not None and m.at > since:
            found.append(m.touch_id)
    return found


async def play(
    stack: Embedded, bus: InProcessBus, sandbox: SandboxProvider, clock: ManualClock, users: int
) -> Outcome:
    started = time.monotonic()
    world = World(random.Random(7))
    print("Afterglow embedded demo: four services, one in-process bus, SQLite\n")
    print("Operations endpoints:")
    print("\n".join(await check_operations(stack)))
    print(f"\nEnrolling {users} users (profiles, consent, purchase histories) ...", flush=True)
    participants = await enrol(stack, users, world)
    print(f"  ready after {time.monotonic() - started:.1f} s; playing {DAYS} days", flush=True)

    ended: set[str] = set()
    moment = START
    while moment <= START + timedelta(days=DAYS):
        if moment > clock.now():
            clock.set(moment)
        for promotion in PROMOTIONS:
            if promotion.id not in ended and START + promotion.ends_after <= moment:
                body = {"ended_at": moment.isoformat(), "name": promotion.name}
                path = f"/v1/promotions/{promotion.id}/end"
                await ok(stack.clients["scheduling"].post(path, json=body))
                ended.add(promotion.id)
        await settle(stack, bus)
        await react(stack, sandbox, world, users)
        if (moment - START) % timedelta(days=7) == timedelta(0) and moment > START:
            print(
                f"  day {(moment - START).days:>2}: {len(sandbox.messages)} messages sent so far "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )
        moment += STEP
    await settle(stack, bus)

    plans, funnels, experiments = {}, {}, {}
    for promotion in PROMOTIONS:
        plans[promotion.id] = await ok(
            stack.clients["scheduling"].get(f"/v1/promotions/{promotion.id}/plan")
        )
        funnels[promotion.id] = await ok(
            stack.clients["metrics"].get(
                "/v1/funnel", params={"promotion_id": promotion.id, "group_by": "wave"}
            )
        )
        answer = await stack.clients["metrics"].get(f"/v1/experiments/{promotion.id}")
        experiments[promotion.id] = answer.json() if answer.status_code == 200 else None
    segments = await ok(stack.clients["segmentation"].get("/v1/segments"))
    messages = sandbox.messages
    return Outcome(
        segments=segments,
        users=users,
        participants=participants,
        plans=plans,
        funnels=funnels,
        experiments=experiments,
        provider=sandbox.stats(),
        caps_over=over_caps(messages),
        quiet_hours=in_quiet_hours(messages, world.tz),
        after_stop=after_stop(messages, world),
        reactions=dict(world.reactions),
        seconds=time.monotonic() - started,
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}" if value < 0 else f"{value:.1%}"


def report(outcome: Outcome) -> int:
    print(
        f"\n{outcome.users} users; {DAYS} days played on the manual clock in 12-hour steps; "
        f"participants: " + ", ".join(f"{p} {n}" for p, n in outcome.participants.items())
    )
    for name in ("ltv_tier", "rfm", "value_layer", "age_band"):
        counts = outcome.segments.get(name) or {}
        print(f"  {name + ':':<13}" + ", ".join(f"{k} {v}" for k, v in counts.items()))
    agree = True
    for promotion in PROMOTIONS:
        plan = {w["wave"]: w for w in outcome.plans[promotion.id]["waves"]}
        funnel = {r["wave"]: r for r in outcome.funnels[promotion.id]["rows"]}
        print(f"\n{promotion.name} ({promotion.id}), ended day {promotion.ends_after.days}")
        print(
            f"  {'wave':<7}{'planned':>8}{'sent':>6}{'failed':>7}{'deliv':>7}{'opened':>7}"
            f"{'clicked':>8}{'conv':>6}{'revenue':>10}  suppressed"
        )
        for name in WAVES:
            wave, row = plan.get(name), funnel.get(name)
            if wave is None:
                continue
            row = row or {}
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(wave["suppressed"].items()))
            print(
                f"  {name:<7}{wave['planned']:>8}{wave['sent']:>6}{wave['failed']:>7}"
                f"{row.get('delivered', 0):>7}{row.get('opened', 0):>7}{row.get('clicked', 0):>8}"
                f"{row.get('converted', 0):>6}{row.get('revenue', 0) or 0:>10.2f}  {reasons or '-'}"
            )
            agree = agree and row.get("sent", 0) == wave["sent"]
        experiment = outcome.experiments[promotion.id]
        if experiment is None:
            print("  experiment: no touches yet")
            continue
        holdout = experiment["holdout"]
        print(
            f"  holdout: {holdout['exposed']} users, {holdout['converted']} converted "
            f"({_pct(holdout['conversion_rate'])})"
        )
        for variant in experiment["variants"]:
            interval = (
                f"95% CI [{_pct(variant['ci_low'])}, {_pct(variant['ci_high'])}]"
                if variant.get("ci_low") is not None
                else "CI -"
            )
            print(
                f"  variant {variant['name']}: {variant['exposed']} users, "
                f"{variant['converted']} converted ({_pct(variant['conversion_rate'])}), "
                f"uplift vs holdout {_pct(variant.get('uplift'))} {interval}"
            )
    p = outcome.provider
    r = outcome.reactions
    print(
        f"\nSandbox provider: {p['calls']} calls, {p['accepted']} accepted, "
        f"{p['failed']} failed on purpose (retried), {p['duplicates']} repeated keys"
    )
    print(
        "Users reacted: "
        + ", ".join(
            f"{r.get(k, 0)} {k}"
            for k in ("delivered", "opened", "clicked", "unsubscribed", "complained", "purchases")
        )
    )
    checks = {
        "no user over a cap (2 per 7 days, 5 per 30 days)": not outcome.caps_over,
        "nothing sent in a user's quiet hours (21:00-09:00 local)": not outcome.quiet_hours,
        "nothing sent after an unsubscribe or a complaint": not outcome.after_stop,
        "no Idempotency-Key accepted twice": p["duplicates"] == 0,
        "metrics and scheduling agree on sent touches": agree,
    }
    print("\nChecks from the provider's log:")
    for what, held in checks.items():
        print(f"  [{'ok' if held else 'FAILED'}] {what}")
    if outcome.caps_over:
        print(f"    over a cap: {', '.join(outcome.caps_over[:10])}")
    if outcome.quiet_hours:
        print(f"    in quiet hours: {', '.join(outcome.quiet_hours[:10])}")
    if outcome.after_stop:
        print(f"    after a stop: {', '.join(outcome.after_stop[:10])}")
    print(f"\n{p['accepted']} messages sent in {outcome.seconds:.1f} s")
    return 0 if all(checks.values()) and p["accepted"] > 0 else 1


async def serve_forever(stack: Embedded) -> None:
    import uvicorn

    servers = [
        uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=DEFAULT_PORTS[name],
                lifespan="off",
                log_config=None,
                access_log=False,
            )
        )
        for name, app in stack.apps.items()
    ]
    where = "\n".join(
        f"  {name:<13} http://127.0.0.1:{DEFAULT_PORTS[name]}/docs" for name in stack.apps
    )
    print(f"\nServing (token {DEV_TOKEN!r}); Ctrl-C to stop:\n{where}")
    print(
        f"  dashboard     http://127.0.0.1:{DEFAULT_PORTS['metrics']}/dashboard#token={DEV_TOKEN}"
    )
    print(
        "  e.g. curl -H 'Authorization: Bearer dev-token' "
        "'http://127.0.0.1:8004/v1/funnel?promotion_id=spring-sale&group_by=wave'"
    )
    await asyncio.gather(*(server.serve() for server in servers))


async def run_demo(*, users: int, serve: bool, workdir: str | None) -> int:
    with contextlib.ExitStack() as files:
        path = (
            Path(workdir) if workdir else Path(files.enter_context(tempfile.TemporaryDirectory()))
        )
        path.mkdir(parents=True, exist_ok=True)
        clock = ManualClock(START)
        async with SandboxProvider(fail_share=0.05, seed=11, clock=clock.now) as sandbox:
            settings = demo_settings(path, sandbox.url)
            bus = InProcessBus(partitions=settings.kafka_partitions)
            async with embedded(settings, bus=bus, clock=clock, token=DEV_TOKEN) as stack:
                status = report(await play(stack, bus, sandbox, clock, users))
                if serve:
                    await serve_forever(stack)
        return status
