"""Two overlapping promotions through the four services as separate OS processes, on real
Kafka and PostgreSQL, driven only through the public REST API and the manual clock,
with the provider on loopback. PRODUCT.md's invariants are checked from what the
provider received: caps per rolling window, one accepted call per Idempotency-Key, no
send in quiet hours, without consent, after an unsubscribe, a complaint or an erasure;
every planned touch ends sent, suppressed or failed with a reason; waves on their days.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.e2e.scenario import (
    P1,
    P2,
    Driver,
    Scenario,
    check_invariants,
    end_promotion,
    enrol,
    next_start,
    react,
)
from tests.e2e.stack import ProcessStack, json_of, process_stack
from tests.support.provider_server import ProviderServer

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.timeout(280)]

USERS = 150


@pytest.fixture
async def stack(
    kafka_bootstrap: str,
    fresh_postgres_url: str,
    provider: ProviderServer,
    tmp_path: Path,
    unique: str,
) -> AsyncIterator[tuple[ProcessStack, Scenario]]:
    start = next_start()
    async with process_stack(
        kafka_bootstrap,
        fresh_postgres_url,
        provider.url,
        tmp_path,
        start=start,
        topic_prefix=f"e2e{unique}.",
    ) as running:
        yield running, Scenario(start=start)


async def test_two_promotions_on_four_processes_keep_every_invariant(
    stack: tuple[ProcessStack, Scenario], provider: ProviderServer
) -> None:
    running, scenario = stack
    d = Driver(running, provider, scenario)
    rng = random.Random(2026)
    policy = (await json_of(await d.c["scheduling"].get("/v1/policies/default")))["policy"]

    await enrol(d, rng, USERS)
    await end_promotion(d, P1)
    await d.settle()
    # Steps at 03:00 and 15:00 UTC (daytime somewhere in each of the three zones) through
    # the launch, day 3 and day 14 waves of both promotions and the deferrals that follow,
    # one jump over the quiet days 18 to 29 (what fell due there goes out late, still before
    # its deadline), then the day 30 waves.
    for half_day in (*range(1, 2 * 18 + 1), *range(2 * 29 + 1, 2 * 33 + 1)):
        await d.move(scenario.start + timedelta(hours=12 * half_day))
        if half_day == 4:
            await end_promotion(d, P2)
            await d.settle()
        if half_day % 2 == 0:
            await react(d, rng, half_day // 2)
    # Well past every deadline: whatever was deferred is sent or suppressed by now.
    for hours in (75 * 24, 75 * 24 + 12):
        await d.move(scenario.start + timedelta(hours=hours))

    outcome = await check_invariants(d, policy)
    assert outcome.touches_sent, "the provider received nothing"
    statuses, plans = outcome.statuses, outcome.plans
    sent_waves = {message["wave"] for _, message in outcome.touches_sent.values()}

    outcome.assert_clean()
    # The plans count as sent exactly the waves the provider received (the default
    # policy's tier intensities leave some waves out), the launch and day 3 among them.
    planned_sent = {w["wave"] for plan in plans.values() for w in plan["waves"] if w["sent"]}
    assert sent_waves == planned_sent, (sent_waves, planned_sent)
    assert {"launch", "day3"} <= sent_waves, sent_waves
    assert statuses["sent"] > USERS, dict(statuses)
    assert statuses["suppressed"] > 0, dict(statuses)
    assert any(why == "unsubscribed" for v in scenario.stopped.values() for _, _, why in v)
    assert any(why == "complained" for v in scenario.stopped.values() for _, _, why in v)
