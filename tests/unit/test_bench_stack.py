"""The pure parts of the end-to-end benchmark (benchmarks/stack.py): the figures it derives
from latencies, /metrics and /proc, and what it sends the services."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from benchmarks.report import Run, table
from benchmarks.stack import (
    activity_batches,
    consumed,
    delivery_config,
    percentile,
    proc_cpu_s,
    proc_status_kb,
)
from benchmarks.stack import table as stack_table
from services.delivery.config import DeliveryConfig


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(list(reversed(values)), 0.0) == 1.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_consumed_sums_one_topic_over_groups_and_ignores_the_rest() -> None:
    text = "\n".join(
        [
            "# HELP afterglow_bus_messages_consumed_total Messages handled and committed",
            'afterglow_bus_messages_consumed_total{group="a",service="s",topic="b1.audience"} 40.0',
            'afterglow_bus_messages_consumed_total{group="b",service="s",topic="b1.audience"} 2.0',
            'afterglow_bus_messages_consumed_total{group="a",service="s",topic="b1.touches"} 9.0',
            'afterglow_bus_messages_produced_total{service="s",topic="b1.audience"} 100.0',
        ]
    )
    assert consumed(text, "b1.audience") == 42.0
    assert consumed(text, "b1.users") == 0.0


def test_proc_fields_are_read_from_status_and_stat() -> None:
    status = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n"
    assert proc_status_kb(status, "VmHWM") == 123456
    assert proc_status_kb(status, "VmSwap") is None
    # The command name may hold spaces and parentheses; utime and stime are fields 14 and 15.
    ticks = __import__("os").sysconf("SC_CLK_TCK")
    rest = " ".join(["S", *["0"] * 10, str(3 * ticks), str(ticks), *["0"] * 30])
    assert proc_cpu_s(f"4242 (python (x) y) {rest}") == pytest.approx(4.0)


def test_activity_batches_give_one_purchase_per_user_within_the_api_limit() -> None:
    start = datetime(2026, 3, 1, 15, tzinfo=UTC)
    batches = list(activity_batches(250, start, 100))
    assert [len(b["activities"]) for b in batches] == [100, 100, 50]
    items = [a for b in batches for a in b["activities"]]
    assert len({a["id"] for a in items}) == len({a["user_id"] for a in items}) == 250
    assert all(a["kind"] == "purchase" and a["amount"] >= 0 for a in items)
    assert all(datetime.fromisoformat(a["occurred_at"]) < start for a in items)


def test_the_rate_limit_the_benchmark_sets_is_a_valid_delivery_config() -> None:
    config = DeliveryConfig.model_validate_json(delivery_config(50_000))
    assert config.channel("email").rate_per_s == 50_000
    assert config.channel("sms").burst == 5_000


def test_the_figures_print_as_aligned_lines() -> None:
    printed = stack_table({"participants": 10_000, "due_p99_ms": 1234.56, "ratio": 0.5})
    lines = printed.splitlines()
    assert [line.split() for line in lines] == [
        ["participants", "10,000"],
        ["due_p99_ms", "1,234.6"],
        ["ratio", "0.5"],
    ]
    assert len({len(line) for line in lines}) == 1  # values aligned on the right
    assert "nan" in stack_table({"due_p50_ms": math.nan})


def test_the_report_shows_each_services_peak_memory_in_a_section_of_its_own() -> None:
    runs = [
        Run("stack", 10, status="ok", figures={"planned_per_s": 9.0, "delivery_peak_rss_mb": 88.5}),
        Run("stack", 100, status="ok", figures={"delivery_peak_rss_mb": 140.0}),
    ]
    lines = table(runs, [10, 100]).splitlines()
    memory = next(i for i, line in enumerate(lines) if line.startswith("memory"))
    assert lines[memory].split()[1:] == ["segmentation", "peak", "RSS", "MB", "-", "-"]
    delivery = next(line for line in lines if "delivery peak RSS MB" in line)
    assert delivery.split()[-2:] == ["88.5", "140"]
    # Not repeated among the stack's other figures.
    assert not any("delivery_peak_rss_mb" in line for line in lines)
