"""The four services as separate OS processes on real Kafka and PostgreSQL, for tests.

    async with process_stack(kafka, db_url, provider.url, tmp_path, start=START,
                             topic_prefix="e2e-1.") as s:
        await s.set_clock(START + timedelta(hours=1))        # PUT /v1/admin/clock on each
        await s.clients["scheduling"].get("/v1/promotions/p-1/plan")
        s.kill("delivery"); await s.restart("delivery")   # fault injection: SIGKILL, start again

Every process runs `afterglow serve <name>` (services/stack.py) with its own port, a
topic prefix and consumer groups of its own, and the manual clock. The processes are
always stopped (SIGTERM, then SIGKILL to the process group) when the block ends.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from services.stack import Stack, dev_env, with_provider
from shared.settings import SERVICES
from tests.support.ports import free_ports

TOKEN = "e2e-token"
_BUS_SERIES = ("afterglow_bus_messages_produced_total{", "afterglow_bus_messages_consumed_total{")
RECEIPT_SECRET = "e2e-receipt-secret"


@dataclass
class Timeline:
    """Which manual time the services had at each moment of the test (monotonic clock)."""

    marks: list[float] = field(default_factory=list)
    times: list[datetime] = field(default_factory=list)

    def add(self, at: float, now: datetime) -> None:
        self.marks.append(at)
        self.times.append(now)

    def at(self, monotonic: float) -> datetime:
        """The manual time in force at `monotonic` (the last one set before it)."""
        index = bisect.bisect_right(self.marks, monotonic) - 1
        if index < 0:
            raise ValueError("that moment is before the clock was first set")
        return self.times[index]


@dataclass
class ProcessStack:
    stack: Stack
    clients: dict[str, httpx.AsyncClient]
    timeline: Timeline

    async def set_clock(self, now: datetime) -> None:
        """Move every service's manual clock; scheduling last, so that what it makes due
        meets services that already live at the new time."""
        self.timeline.add(time.monotonic(), now)
        body = {"now": now.astimezone(UTC).isoformat()}
        for name in ("segmentation", "delivery", "metrics", "scheduling"):
            if name in self.clients:
                answer = await self.clients[name].put("/v1/admin/clock", json=body)
                if answer.status_code != 200:
                    raise AssertionError(f"{name} refused the clock: {answer.text}")

    async def bus_counts(self) -> dict[str, float]:
        """Events produced and consumed so far per service (from /metrics): they move at
        every hop of the flow, so a settled stack is one where they stand still."""
        counts: dict[str, float] = {}
        for name, client in self.clients.items():
            total = 0.0
            with contextlib.suppress(httpx.HTTPError):
                for line in (await client.get("/metrics")).text.splitlines():
                    if line.startswith(_BUS_SERIES):
                        total += float(line.rsplit(" ", 1)[1])
            counts[name] = total
        return counts

    def kill(self, name: str) -> None:
        """SIGKILL one service's process group at once: no drain, no commit (fault injection)."""
        self.stack.procs[name].kill()

    async def restart(self, name: str, timeout_s: float = 60.0) -> None:
        """Start a killed or stopped service again, wait until it is ready, and bring its
        fresh manual clock (it starts at the wall time) to the time the others have."""
        self.stack.restart(name)
        await self.stack.wait_ready(timeout_s=timeout_s, names=[name])
        if self.timeline.times:
            body = {"now": self.timeline.times[-1].astimezone(UTC).isoformat()}
            answer = await self.clients[name].put("/v1/admin/clock", json=body)
            if answer.status_code != 200:
                raise AssertionError(f"{name} refused the clock: {answer.text}")


@contextlib.asynccontextmanager
async def process_stack(
    kafka: str,
    database_url: str,
    provider_url: str,
    workdir: Path,
    *,
    start: datetime,
    topic_prefix: str,
    extra_env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 90.0,
) -> AsyncIterator[ProcessStack]:
    """Start the four services, wait until ready, set their clocks to `start`; always stop."""
    env = dev_env(
        {
            **{k: v for k, v in os.environ.items() if not k.startswith("AFTERGLOW_")},
            "AFTERGLOW_DATABASE_URL": database_url,
            "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS": kafka,
            "AFTERGLOW_TOPIC_PREFIX": topic_prefix,
            "AFTERGLOW_CLOCK": "manual",
            "AFTERGLOW_API_TOKENS": f"{TOKEN}=*",
            "AFTERGLOW_RECEIPT_SECRET": RECEIPT_SECRET,
            "AFTERGLOW_OUTBOX_POLL_S": "0.05",
            "AFTERGLOW_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
    )
    env = with_provider(env, provider_url)
    ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
    stack = Stack(env, logs=workdir / "logs", ports=ports, token=TOKEN)
    try:
        stack.start()
        await stack.wait_ready(timeout_s=ready_timeout_s)
        async with contextlib.AsyncExitStack() as clients_stack:
            clients: dict[str, httpx.AsyncClient] = {}
            for name in SERVICES:
                clients[name] = await clients_stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=stack.url(name),
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        timeout=30.0,
                    )
                )
            running = ProcessStack(stack, clients, Timeline())
            await running.set_clock(start)
            yield running
    finally:
        await stack.stop(grace_s=10.0)


async def json_of(answer: httpx.Response) -> Any:
    if answer.status_code >= 400:
        raise AssertionError(f"{answer.request.method} {answer.request.url}: {answer.text}")
    return answer.json()
