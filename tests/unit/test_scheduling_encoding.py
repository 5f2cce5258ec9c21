"""The hand-built events of planning and dispatch are valid CloudEvents of the registry."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from services.scheduling import dispatcher, domain
from services.scheduling.planning import _plan_one
from services.scheduling.policy import default_policy
from services.scheduling.state import FastEncoder
from shared.events import (
    AudienceMemberResolved,
    SegmentSnapshot,
    TouchDue,
    TouchPlanned,
    TouchSuppressed,
    default_registry,
)

NOW = datetime(2026, 3, 6, 12, tzinfo=UTC)


def encoder() -> FastEncoder:
    ctx: Any = SimpleNamespace(
        topic=lambda name: f"t.{name}", outbox=SimpleNamespace(source="afterglow/x", lanes=8)
    )
    return FastEncoder(ctx, NOW)


def test_planned_and_suppressed_events_decode() -> None:
    enc = encoder()
    rows: list[tuple[Any, ...]] = []
    for i in range(40):
        member = AudienceMemberResolved(
            user_id=f"u-{i}",
            promotion_id="p-1",
            ended_at=NOW,
            segment=SegmentSnapshot(ltv_tier="silent", channel_order=["sms"]),
        )
        _plan_one(member, default_policy(), NOW, rows, enc)
    registry = default_registry()
    decoded = [registry.decode(row[3]) for row in enc.rows]
    assert {type(e.data) for e in decoded} == {TouchPlanned, TouchSuppressed}
    assert all(row[1] == "t.touches" for row in enc.rows)
    planned = [e.data for e in decoded if isinstance(e.data, TouchPlanned)]
    assert len(planned) == len(rows) == 80
    assert {p.wave for p in planned} == {"launch", "day3"}


def test_touch_due_data_matches_the_schema() -> None:
    policy = default_policy()
    promotion = dispatcher._Promotion("Spring sale", NOW, False, policy)
    touch = domain.DueTouch(
        touch_id="t-1",
        promotion_id="p-1",
        wave="day7",
        variant="B",
        due_at=NOW,
        deadline=NOW,
        parallel=2,
        rank=2,
        essential=True,
        promotion_ended_at=NOW,
    )
    # A claimed row, by position as the dispatcher reads it.
    row: list[Any] = [None] * len(dispatcher._CLAIM_COLUMNS)
    row[dispatcher._DUE], row[dispatcher._COUPON] = NOW, True
    row[dispatcher._SEGMENT], row[dispatcher._VARIANT] = "silent", "B"
    data = dispatcher._touch_due("u-1", row, ["sms", "push"], promotion, touch)
    due = TouchDue.model_validate(data)
    assert (due.touch_id, due.user_id, due.wave, due.variant) == ("t-1", "u-1", "day7", "B")
    assert due.channels == ["sms", "push"] and due.parallel == 2
    assert due.content["push"].body.startswith("[day7/B]")
    assert due.variables["coupon_code"].startswith("AG-")
