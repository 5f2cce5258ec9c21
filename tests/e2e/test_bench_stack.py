"""`make bench`'s end-to-end benchmark (benchmarks/stack.py) at a tiny size: it drives the
four services as processes through one promotion and reports a figure for each step, and
what the provider received matches what scheduling says it sent, for users created through
the API and users loaded in bulk alike."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.stack import run
from shared.settings import SERVICES

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.timeout(150)]


async def test_a_small_run_reports_every_figure_and_sends_each_launch_touch_once(
    kafka_bootstrap: str, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AFTERGLOW_DATABASE_URL", postgres_url)
    monkeypatch.setenv("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    args = argparse.Namespace(
        participants=200,
        # Half of the users through PUT /v1/users, the other half loaded with COPY.
        put_users=100,
        concurrency=8,
        ingest_batch=50,
        ingest_concurrency=2,
        latency_ms=20.0,
        channel_rate=1e6,
        timeout=120.0,
        logs=str(tmp_path / "logs"),
    )
    figures = await run(args)

    assert figures["participants"] == 200
    assert figures["put_users"] == figures["bulk_users"] == 100
    assert figures["ingest_requests"] == 4
    assert figures["touches_planned"] >= 200
    assert figures["launch_due"] > 0
    # Every launch touch ended; the provider got each one it was told about once.
    assert figures["launch_pending"] == 0
    assert figures["provider_calls"] == figures["launch_sent"] > 0
    assert figures["provider_repeats"] == 0
    assert (
        figures["launch_sent"] + figures["launch_suppressed"] + figures["launch_failed"]
        == figures["launch_due"]
    )
    for key in (
        "planned_per_s",
        "dispatched_per_s",
        "ingest_requests_per_s",
        "users_per_s",
        "plan_cpu_us_per_touch",
        "dispatch_cpu_us_per_touch",
    ):
        assert figures[key] > 0, key
    assert 0 < figures["due_first_ms"] <= figures["due_p50_ms"] <= figures["due_p99_ms"]
    for name in SERVICES:
        assert figures[f"{name}_peak_rss_mb"] > 20, name
    assert "load_1m_start" in figures  # what the machine was doing besides
