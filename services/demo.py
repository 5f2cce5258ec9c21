"""`afterglow demo`: the embedded mode end to end, with a printed report."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.embedded import Embedded, embedded
from shared.clock import ManualClock
from shared.settings import DEFAULT_PORTS, DEV_TOKEN, SERVICES, ClockKind, Settings

PROMOTION = "spring-sale"


def demo_settings(workdir: Path) -> Settings:
    return Settings(
        database_url=f"sqlite+aiosqlite:///{workdir / 'afterglow.db'}",
        clock=ClockKind.MANUAL,
        api_tokens={DEV_TOKEN: frozenset({"*"})},
        log_level="WARNING",
        outbox_poll_s=0.05,
    )


async def check_operations(stack: Embedded) -> list[str]:
    lines = []
    for name in SERVICES:
        client = stack.clients[name]
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        metrics = await client.get("/metrics")
        ok = health.status_code == ready.status_code == metrics.status_code == 200
        lines.append(
            f"  {name:<13} healthz {health.status_code}  readyz {ready.status_code}  "
            f"metrics {metrics.status_code} ({len(metrics.text.splitlines())} lines)"
            + ("" if ok else "  <-- NOT OK")
        )
        if not ok:
            raise RuntimeError(f"{name} is not healthy: {ready.text}")
    return lines


async def wait_for(
    stack: Embedded, promotion_id: str, expected: int, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        funnel = (
            await stack.clients["metrics"].get("/v1/funnel", params={"promotion_id": promotion_id})
        ).json()
        sent = sum(row["sent"] for row in funnel["rows"])
        if sent >= expected or time.monotonic() > deadline:
            result: dict[str, Any] = funnel
            return result
        await asyncio.sleep(0.05)


async def play(stack: Embedded, users: int) -> int:
    started = time.monotonic()
    print("Afterglow embedded demo: four services, one in-process bus, SQLite\n")
    print("Operations endpoints:")
    print("\n".join(await check_operations(stack)))

    user_ids = [f"u-{i:06d}" for i in range(users)]
    for chunk in range(0, users, 1000):
        response = await stack.clients["segmentation"].post(
            f"/v1/promotions/{PROMOTION}/participants",
            json={"user_ids": user_ids[chunk : chunk + 1000]},
        )
        response.raise_for_status()
    ended_at = stack.clock.now()
    response = await stack.clients["scheduling"].post(
        f"/v1/promotions/{PROMOTION}/end",
        json={"ended_at": ended_at.isoformat(), "name": "Spring sale", "policy": "default"},
    )
    response.raise_for_status()
    funnel = await wait_for(stack, PROMOTION, users, timeout_s=45)
    plan = (await stack.clients["scheduling"].get(f"/v1/promotions/{PROMOTION}/plan")).json()

    print(f"\nPromotion {PROMOTION!r} ended with {users} participants.")
    print("Event flow: scheduling -> promotions -> segmentation -> audience -> scheduling")
    print("           -> touches -> delivery -> deliveries -> metrics\n")
    print(f"{'wave':<8}{'planned':>9}{'pending':>9}{'sent':>9}{'failed':>9}   (scheduling)")
    for wave in plan["waves"]:
        print(
            f"{wave['wave']:<8}{wave['planned']:>9}{wave['pending']:>9}"
            f"{wave['sent']:>9}{wave['failed']:>9}"
        )
    print(f"\n{'wave':<8}{'planned':>9}{'sent':>9}{'reach':>9}   (metrics funnel)")
    for row in funnel["rows"]:
        reach = "-" if row["reach_rate"] is None else f"{row['reach_rate']:.0%}"
        print(f"{row['wave']:<8}{row['planned']:>9}{row['sent']:>9}{reach:>9}")
    sent = sum(row["sent"] for row in funnel["rows"])
    ok = sent == users
    print(
        f"\n{'OK' if ok else 'INCOMPLETE'}: {sent}/{users} touches went through all four "
        f"services in {time.monotonic() - started:.1f} s"
    )
    return 0 if ok else 1


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
    print(
        "\nServing on "
        + ", ".join(f"{name} http://127.0.0.1:{DEFAULT_PORTS[name]}" for name in stack.apps)
        + f" (token {DEV_TOKEN!r}); Ctrl-C to stop."
    )
    await asyncio.gather(*(server.serve() for server in servers))


async def run_demo(*, users: int, serve: bool, workdir: str | None) -> int:
    with contextlib.ExitStack() as files:
        path = (
            Path(workdir) if workdir else Path(files.enter_context(tempfile.TemporaryDirectory()))
        )
        path.mkdir(parents=True, exist_ok=True)
        settings = demo_settings(path)
        clock = ManualClock(datetime(2026, 3, 8, 12, 0, tzinfo=UTC))
        async with embedded(settings, clock=clock, token=DEV_TOKEN) as stack:
            status = await play(stack, users)
            if serve:
                await serve_forever(stack)
        return status
