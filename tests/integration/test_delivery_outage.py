"""Delivery when things break under a batch: the database goes away while provider calls
are in flight, and one call of a batch raises something nobody expected.

The database is the real PostgreSQL, reached through a TCP relay on loopback that the
test cuts (every connection reset, new ones refused, as while a server restarts) and
opens again; providers are real HTTP servers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from services.delivery import handlers, store
from services.delivery.providers.fast import FastTransport, ProviderAnswer, RawRequest
from shared.events import default_registry, encode
from tests.conftest import fresh_database
from tests.integration.test_delivery_service import (
    START,
    channels,
    delivery,
    eventually,
    touch,
    user,
)
from tests.support.provider_server import ProviderServer

pytestmark = [pytest.mark.postgres]


class Relay:
    """A TCP relay to PostgreSQL that can be cut and opened again."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()
        # Armed: the next COMMIT reaches the server, its answer never reaches the client,
        # whose connection is then reset (the commit took place; the client cannot know).
        self.lose_commit_answer = False
        self.lost_commit_answers = 0

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """New connections are refused, open ones are reset."""
        assert self.server is not None
        self.server.close()
        for writer in list(self.pipes):
            writer.transport.abort()
        self.pipes.clear()
        await self.server.wait_closed()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.pipes |= {writer, up_writer}
        muted = asyncio.Event()

        async def reset_after_commit() -> None:
            await asyncio.sleep(0.3)  # the server has committed by now
            writer.transport.abort()
            up_writer.transport.abort()

        async def pump(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool
        ) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if not upstream and muted.is_set():
                        continue
                    dst.write(data)
                    await dst.drain()
                    if upstream and self.lose_commit_answer and b"COMMIT;" in data:
                        self.lose_commit_answer = False
                        self.lost_commit_answers += 1
                        muted.set()
                        asyncio.get_running_loop().create_task(reset_after_commit())
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False))
        self.pipes -= {writer, up_writer}


@contextlib.asynccontextmanager
async def relayed_database(postgres_url: str, unique: str) -> AsyncIterator[tuple[str, Relay]]:
    async with fresh_database(postgres_url, f"t_{unique}") as url:
        parsed = make_url(url)
        relay = Relay(parsed.host or "127.0.0.1", parsed.port or 5432)
        await relay.open()
        try:
            yield (
                parsed.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False),
                relay,
            )
        finally:
            if relay.server is not None:
                await relay.cut()


def _settle_retries(stack: Any, outcome: str) -> float:
    value = stack.ctx.metrics.registry.get_sample_value(
        "afterglow_delivery_settle_retries_total", {"outcome": outcome}
    )
    return float(value or 0.0)


async def calls_in_flight(stack: Any, sms: ProviderServer, count: int) -> list[Any]:
    """`count` touches published and their calls under way (the provider has them)."""
    await stack.users(*(user(f"u-{i}", "sms") for i in range(count)))
    dues = [touch(f"t-{i}", f"u-{i}", "sms") for i in range(count)]
    await stack.publish(*dues)
    await eventually(lambda: _now(len(sms.keys_seen) == count))
    return dues


async def test_answers_of_calls_in_flight_when_the_database_goes_away_are_kept(
    postgres_url: str, unique: str
) -> None:
    """Every touch is called once: the answers wait for the database, nothing is re-sent."""
    async with (
        relayed_database(postgres_url, unique) as (url, relay),
        ProviderServer(latency_s=1.0) as sms,
        delivery(url, channels(sms={"base_url": sms.url})) as stack,
    ):
        dues = await calls_in_flight(stack, sms, 8)
        await relay.cut()  # the calls are in flight; their answers come in during the outage
        await eventually(lambda: _now(_settle_retries(stack, "retried") >= 2))
        assert len(sms.calls) == 8
        await relay.open()

        outcomes = await stack.settled(8)
        assert sorted(e.touch_id for e in outcomes) == sorted(d.touch_id for d in dues)
        assert {type(e).__name__ for e in outcomes} == {"DeliverySent"}
        assert dict(sms.keys_seen) == {d.touch_id: 1 for d in dues}, "a touch was called again"
        async with stack.ctx.db.connect() as conn:
            rows = (await conn.execute(select(store.deliveries))).all()
            spent = (await conn.execute(select(store.spend.c.sent))).scalars().all()
        assert {(r.status, r.attempts) for r in rows} == {("sent", 1)}
        assert sum(spent) == 8, "the settlement was applied more than once"
        assert _settle_retries(stack, "gave_up") == 0


async def test_a_settlement_whose_commit_answer_is_lost_is_applied_once(
    postgres_url: str, unique: str
) -> None:
    """The commit of the answers goes through but its acknowledgement is lost: delivery
    finds the round stored and neither writes it again nor calls again."""
    async with (
        relayed_database(postgres_url, unique) as (url, relay),
        ProviderServer(latency_s=0.5) as sms,
        delivery(url, channels(sms={"base_url": sms.url})) as stack,
    ):
        dues = await calls_in_flight(stack, sms, 8)
        relay.lose_commit_answer = True  # the next commit is the settlement's

        outcomes = await stack.settled(8)
        await asyncio.sleep(0.5)
        assert relay.lost_commit_answers == 1 and _settle_retries(stack, "retried") >= 1
        assert len(stack.outcomes()) == 8, "delivery.sent was written twice"
        assert {type(e).__name__ for e in outcomes} == {"DeliverySent"}
        assert dict(sms.keys_seen) == {d.touch_id: 1 for d in dues}, "a touch was called again"
        async with stack.ctx.db.connect() as conn:
            spent = (await conn.execute(select(store.spend.c.sent))).scalars().all()
        assert sum(spent) == 8, "the settlement was applied more than once"


async def _now(value: bool) -> bool:
    return value


class FaultyTransport:
    """The real transport, except that sends for some touches raise what no httpx
    transport is meant to: a bug under one call."""

    def __init__(self, real: FastTransport, failing: dict[str, int]) -> None:
        self.real = real
        self.failing = failing  # Idempotency-Key -> how many sends raise (then real calls)

    async def send(self, request: RawRequest, *, since: float | None = None) -> ProviderAnswer:
        key = request.header("Idempotency-Key") or ""
        if self.failing.get(key, 0) > 0:
            self.failing[key] -= 1
            raise RuntimeError("a bug in the transport")
        return await self.real.send(request, since=since)

    async def aclose(self) -> None:
        await self.real.aclose()


async def test_an_unexpected_error_in_one_call_fails_that_call_alone(
    postgres_url: str, unique: str
) -> None:
    """One touch's call raises once (retried: sent), another's always (falls back to
    email); the rest of the batch is sent as usual, each call once."""
    async with (
        fresh_database(postgres_url, f"t_{unique}") as url,
        ProviderServer() as sms,
        ProviderServer() as email,
        delivery(url, channels(sms={"base_url": sms.url}, email={"base_url": email.url})) as stack,
    ):
        await stack.users(*(user(f"u-{i}", "sms", "email") for i in range(6)))
        rt = stack.ctx.extras["delivery"]
        provider = rt.providers["sms"]
        provider._transport = FaultyTransport(provider._transport, {"t-1": 1, "t-2": 99})
        dues = [touch(f"t-{i}", f"u-{i}", "sms", "email") for i in range(6)]
        registry = default_registry()
        events = [registry.decode(encode(d, source="test", time=START)) for d in dues]
        await handlers.on_touches_due(stack.ctx, rt, events)

        outcomes = {e.touch_id: e for e in await stack.settled(6)}
        assert {type(e).__name__ for e in outcomes.values()} == {"DeliverySent"}
        assert outcomes["t-2"].channel == "email"
        assert {k: e.channel for k, e in outcomes.items() if k != "t-2"} == {
            f"t-{i}": "sms" for i in (0, 1, 3, 4, 5)
        }
        assert outcomes["t-1"].attempts == 2
        assert dict(sms.keys_seen) == {f"t-{i}": 1 for i in (0, 1, 3, 4, 5)}
        assert dict(email.keys_seen) == {"t-2": 1}
