"""`afterglow demo`: the embedded mode end to end, with a printed report.

Synthetic users across ages, timezones and consent choices take part in a
promotion; the manual clock then plays 32 days while the four services plan,
dispatch, deliver (to a sandbox provider on loopback that fails now and then)
and count. The report shows each wave and checks the caps from the touches.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.embedded import Embedded, embedded
from services.sandbox import SandboxProvider
from shared.clock import ManualClock
from shared.settings import CHANNELS, DEFAULT_PORTS, DEV_TOKEN, SERVICES, ClockKind, Settings

PROMOTION = "spring-sale"
START = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
DAYS = 32
STEP = timedelta(hours=12)
TIMEZONES = ("Asia/Shanghai", "Asia/Kolkata", "Europe/Paris", "America/New_York", "UTC")
WAVES = ("launch", "day3", "day7", "day14", "day30")


def demo_settings(workdir: Path, provider_url: str) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{workdir / 'afterglow.db'}",
        "clock": ClockKind.MANUAL,
        "api_tokens": {DEV_TOKEN: frozenset({"*"})},
        "receipt_secret": "demo-receipt-secret",
        "log_level": "ERROR",
        "outbox_poll_s": 0.05,
    }
    values.update({f"provider_{channel}_url": provider_url for channel in CHANNELS})
    return Settings.model_validate(values)


def profile(rng: random.Random, index: int) -> dict[str, Any]:
    user = f"u-{index:05d}"
    return {
        "birth_year": rng.choice([1975, 1985, 1992, 1998, 2003]),
        "timezone": rng.choice(TIMEZONES),
        "locale": "zh-CN",
        "addresses": {
            "sms": f"+86138{index:08d}",
            "email": f"{user}@example.com",
            "push": f"device-{user}",
            "in_app": user,
            "social": f"open-{user}",
        },
        "consent": {channel: rng.random() < 0.8 for channel in CHANNELS},
    }


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


async def settle(stack: Embedded) -> dict[str, Any]:
    """Wait until the plan stops changing: every event of this moment has been handled."""
    previous: Any = None
    while True:
        plan = (await stack.clients["scheduling"].get(f"/v1/promotions/{PROMOTION}/plan")).json()
        if plan == previous:
            result: dict[str, Any] = plan
            return result
        previous = plan
        await asyncio.sleep(0.15)


async def enrol(stack: Embedded, users: int, rng: random.Random) -> None:
    for index in range(users):
        answer = await stack.clients["segmentation"].put(
            f"/v1/users/u-{index:05d}", json=profile(rng, index)
        )
        answer.raise_for_status()
    for index in range(users):
        if rng.random() < 0.7:
            purchase = {
                "id": f"a-{index}",
                "user_id": f"u-{index:05d}",
                "kind": "purchase",
                "occurred_at": (START - timedelta(days=rng.randint(1, 90))).isoformat(),
                "amount": round(rng.uniform(20, 900), 2),
                "currency": "CNY",
                "item_id": f"sku-{rng.randint(1, 40)}",
                "category": rng.choice(["beauty", "fashion", "home"]),
            }
            answer = await stack.clients["segmentation"].post(
                "/v1/activities", json={"activities": [purchase]}
            )
            answer.raise_for_status()
    user_ids = [f"u-{i:05d}" for i in range(users)]
    answer = await stack.clients["segmentation"].post(
        f"/v1/promotions/{PROMOTION}/participants", json={"user_ids": user_ids}
    )
    answer.raise_for_status()


async def caps_held(stack: Embedded, users: int) -> tuple[bool, int]:
    """From every user's touches: no more than 2 in any 7 days and 5 in any 30."""
    over = 0
    for index in range(users):
        touches = (
            await stack.clients["scheduling"].get(f"/v1/users/u-{index:05d}/touches")
        ).json()["touches"]
        sent = sorted(
            datetime.fromisoformat(t["due_at"]) for t in touches if t["status"] in ("sent",)
        )
        for i, first in enumerate(sent):
            in_7 = sum(1 for t in sent[i:] if t - first < timedelta(days=7))
            in_30 = sum(1 for t in sent[i:] if t - first < timedelta(days=30))
            if in_7 > 2 or in_30 > 5:
                over += 1
                break
    return over == 0, over


async def play(stack: Embedded, sandbox: SandboxProvider, clock: ManualClock, users: int) -> int:
    started = time.monotonic()
    rng = random.Random(7)
    print("Afterglow embedded demo: four services, one in-process bus, SQLite\n")
    print("Operations endpoints:")
    print("\n".join(await check_operations(stack)))

    await enrol(stack, users, rng)
    answer = await stack.clients["scheduling"].post(
        f"/v1/promotions/{PROMOTION}/end",
        json={"ended_at": START.isoformat(), "name": "Spring sale", "policy": "default"},
    )
    answer.raise_for_status()
    await settle(stack)
    moment = START
    while moment < START + timedelta(days=DAYS):
        moment += STEP
        clock.set(moment)
        await settle(stack)
    plan = await settle(stack)
    funnel = (
        await stack.clients["metrics"].get("/v1/funnel", params={"promotion_id": PROMOTION})
    ).json()

    print(
        f"\nPromotion {PROMOTION!r}: {users} participants, {DAYS} days played on the manual clock"
    )
    print(f"\n{'wave':<8}{'planned':>9}{'sent':>7}{'failed':>8}{'pending':>9}  suppressed")
    waves = {w["wave"]: w for w in plan["waves"]}
    for name in WAVES:
        wave = waves.get(name)
        if wave is None:
            continue
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(wave["suppressed"].items())) or "-"
        print(
            f"{name:<8}{wave['planned']:>9}{wave['sent']:>7}{wave['failed']:>8}"
            f"{wave['pending']:>9}  {reasons}"
        )
    counted = {row["wave"]: row for row in funnel["rows"]}
    print(f"\n{'wave':<8}{'planned':>9}{'sent':>7}{'reach':>8}   (metrics funnel)")
    for name in WAVES:
        row = counted.get(name)
        if row is not None:
            reach = "-" if row["reach_rate"] is None else f"{row['reach_rate']:.0%}"
            print(f"{name:<8}{row['planned']:>9}{row['sent']:>7}{reach:>8}")
    stats = sandbox.stats()
    print(
        f"\nSandbox provider: {stats['calls']} calls, {stats['accepted']} accepted, "
        f"{stats['failed']} failed on purpose, {stats['duplicates']} repeated keys"
    )
    ok, over = await caps_held(stack, users)
    print(f"Caps (2 per 7 days, 5 per 30 days): {'held for every user' if ok else f'{over} over'}")
    sent = sum(w["sent"] for w in plan["waves"])
    agree = all(counted.get(w, {}).get("sent") == waves[w]["sent"] for w in waves)
    print(f"Metrics agree with scheduling on sent touches: {'yes' if agree else 'no'}")
    print(f"\n{sent} touches sent in {time.monotonic() - started:.1f} s")
    return 0 if ok and agree and sent > 0 else 1


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
    where = ", ".join(f"{name} http://127.0.0.1:{DEFAULT_PORTS[name]}" for name in stack.apps)
    print(f"\nServing on {where} (token {DEV_TOKEN!r}); Ctrl-C to stop.")
    await asyncio.gather(*(server.serve() for server in servers))


async def run_demo(*, users: int, serve: bool, workdir: str | None) -> int:
    with contextlib.ExitStack() as files:
        path = (
            Path(workdir) if workdir else Path(files.enter_context(tempfile.TemporaryDirectory()))
        )
        path.mkdir(parents=True, exist_ok=True)
        clock = ManualClock(START)
        async with SandboxProvider(fail_share=0.05, seed=11) as sandbox:
            settings = demo_settings(path, sandbox.url)
            async with embedded(settings, clock=clock, token=DEV_TOKEN) as stack:
                status = await play(stack, sandbox, clock, users)
                if serve:
                    await serve_forever(stack)
        return status
