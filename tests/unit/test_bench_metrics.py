"""The metrics benchmark's event stream (benchmarks/metrics.py): both publishing orders carry
the same events, and the send-time order publishes them by send minute, as topics fill."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from benchmarks.metrics import MEASURES, build, participant_order


@pytest.mark.parametrize("participants", [0, 5, 1440, 3000])
def test_both_orders_publish_every_participant_once(participants: int) -> None:
    for order in ("send-time", "participant"):
        assert sorted(participant_order(participants, order)) == list(range(participants))


def _stream(order: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    expected = dict.fromkeys(MEASURES, 0)
    batches = build(3000, "p", lambda name: f"t.{name}", expected, 500, order)
    return [orjson.loads(m.value) for part in batches for m in part], expected


def _ids(stream: list[dict[str, Any]]) -> set[str]:
    return {e["data"].get("touch_id") or e["data"]["id"] for e in stream}


def _launch_send_times(stream: list[dict[str, Any]]) -> list[str]:
    return [
        e["data"]["at"]
        for e in stream
        if e["type"].endswith("delivery.sent.v1") and e["data"]["wave"] == "launch"
    ]


def test_send_time_order_publishes_the_sends_by_minute_and_the_same_events() -> None:
    by_time, expected_by_time = _stream("send-time")
    by_number, expected_by_number = _stream("participant")
    assert expected_by_time == expected_by_number
    assert Counter(e["type"] for e in by_time) == Counter(e["type"] for e in by_number)
    assert _ids(by_time) == _ids(by_number)
    launch = _launch_send_times(by_time)
    assert launch == sorted(launch)
    shuffled = _launch_send_times(by_number)
    assert shuffled != sorted(shuffled)
