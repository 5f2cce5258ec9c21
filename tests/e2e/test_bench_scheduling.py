"""`make bench-scheduling` at a tiny size: the promotions end, two planning replica processes
share the audience and plan each participant once, and the day's due touches all reach
Kafka as touch.due (or are suppressed at dispatch), with their figures reported."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.scheduling import run

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.timeout(180)]


async def test_two_replicas_plan_every_participant_once_and_the_day_is_dispatched(
    kafka_bootstrap: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AFTERGLOW_DATABASE_URL", postgres_url)
    monkeypatch.setenv("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    args = argparse.Namespace(
        # Seven batches of 500 (the last one short), shared by the two replicas.
        participants=3_300,
        replicas=2,
        partitions=2,
        rate=3_000.0,
        batch=500,
        dispatchers=1,
        plan_only=False,
        profile=None,
    )
    figures = await run(args)

    assert figures["replicas"] == 2
    assert figures["touches_planned"] == 5 * 3_300
    assert figures["planned_per_s"] > 0 and figures["plan_cpu_us_per_touch"] > 0
    # The launch wave of the played day: each due touch went out once, or was suppressed.
    assert figures["due_today"] > 0
    assert figures["dispatched"] + figures["suppressed"] == figures["due_today"]
    assert 0 < figures["due_p50_ms"] <= figures["due_p99_ms"] <= figures["due_max_ms"]
