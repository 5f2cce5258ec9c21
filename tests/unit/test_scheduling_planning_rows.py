"""Bulk planning computes what the one-at-a-time rules say: the same touch ids, holdouts,
variants and due times, and the same touch.planned / touch.suppressed events."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import orjson

from services.scheduling import domain, planning
from services.scheduling.planning import _plan_one
from services.scheduling.policy import default_policy
from services.scheduling.state import FastEncoder
from shared.events import AudienceMemberResolved, SegmentSnapshot, TouchPlanned, TouchSuppressed

POLICY = default_policy()
NOW = datetime(2026, 3, 6, 12, 0, 0, 250000, tzinfo=UTC)
ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "Nope/Zone", ""]
TIERS = [None, "high_potential", "potential_churn", "silent", "unknown"]


def members(count: int) -> list[AudienceMemberResolved]:
    rng = random.Random(11)
    out = []
    for i in range(count):
        ended = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(300 * 86400))
        if i % 3 == 0:
            # An end stated in another offset: its times are planned in UTC all the same.
            ended = ended.astimezone(timezone(timedelta(hours=1)))
        out.append(
            AudienceMemberResolved(
                # Characters that JSON escapes, in the ids the events repeat.
                user_id=f'u-{i}"é\\' if i % 17 == 0 else f"u-{i}",
                promotion_id=f"p-{i % 5}",
                ended_at=ended,
                timezone=rng.choice(ZONES),
                segment=SegmentSnapshot(
                    ltv_tier=rng.choice(TIERS),
                    silent=rng.random() < 0.3,
                    abuse_review=rng.random() < 0.2,
                    value_layer=rng.choice([None, "core"]),
                    channel_order=rng.choice([[], ["sms", "push"]]),
                ),
            )
        )
    return out


def as_member(m: AudienceMemberResolved) -> domain.Member:
    s = m.segment
    return domain.Member(
        m.user_id,
        m.promotion_id,
        m.ended_at,
        m.timezone,
        s.ltv_tier,
        s.value_layer,
        s.silent,
        s.abuse_review,
        tuple(s.channel_order),
    )


def test_each_touch_is_what_the_single_rules_say() -> None:
    seen_holdout = seen_planned = 0
    for event in members(2000):
        member = as_member(event)
        tz = domain.zone(member.timezone)
        waves = {w.name: w for w in domain.waves_for(POLICY, member.ltv_tier)}
        plan = domain.plan_member(POLICY, member)
        assert [t.wave for t in plan] == list(waves)
        held = domain.in_holdout(POLICY, member.user_id, member.promotion_id)
        for touch in plan:
            name = f"{member.promotion_id}\x1f{member.user_id}\x1f{touch.wave}"
            assert touch.touch_id == str(uuid.uuid5(domain.TOUCH_NAMESPACE, name))
            assert touch.variant == domain.variant_of(
                POLICY, member.user_id, member.promotion_id, touch.wave
            )
            assert touch.due_at == domain.wave_due(member, waves[touch.wave], tz)
            assert touch.due_at.tzinfo is UTC and touch.deadline.tzinfo is UTC
            assert touch.due_at <= touch.deadline
            if held or domain.in_wave_holdout(
                POLICY, member.user_id, member.promotion_id, touch.wave
            ):
                assert (touch.status, touch.reason) == ("suppressed", "holdout")
                seen_holdout += 1
            else:
                assert touch.status == "planned" or touch.reason == "abuse"
                seen_planned += 1
    assert seen_holdout and seen_planned


def test_events_are_those_fast_encoder_writes() -> None:
    ctx: Any = SimpleNamespace(
        topic=lambda name: f"t.{name}", outbox=SimpleNamespace(source="afterglow/x", lanes=8)
    )
    built, expected = FastEncoder(ctx, NOW), FastEncoder(ctx, NOW)
    rows: list[tuple[Any, ...]] = []
    for event in members(500):
        _plan_one(event, POLICY, NOW, rows, built)
        lane = expected.lane(event.user_id)
        for touch in domain.plan_member(POLICY, as_member(event)):
            common = {
                "user_id": touch.user_id,
                "touch_id": touch.touch_id,
                "promotion_id": touch.promotion_id,
                "wave": touch.wave,
                "channel": None,
                "variant": touch.variant,
            }
            expected.add(
                TouchPlanned.event_type(),
                touch.user_id,
                f"{touch.touch_id}.planned",
                {
                    **common,
                    "due_at": touch.due_at,
                    "deadline": touch.deadline,
                    "segment": event.segment.ltv_tier,
                },
                lane,
            )
            if touch.status == "suppressed":
                expected.add(
                    TouchSuppressed.event_type(),
                    touch.user_id,
                    f"{touch.touch_id}.suppressed",
                    {**common, "reason": touch.reason, "at": expected.time},
                    lane,
                )
    assert len(built.rows) == len(expected.rows) > len(rows)
    for got, want in zip(built.rows, expected.rows, strict=True):
        assert got[:3] == want[:3] and got[4] == want[4]
        assert orjson.loads(got[3]) == orjson.loads(want[3])


def test_a_decoded_end_plans_its_times_in_utc() -> None:
    """An end decoded from JSON ("Z" or another offset) gives the same instants, written in
    UTC: what a promotion's participants share, whatever zone object the decoder made."""
    ctx: Any = SimpleNamespace(
        topic=lambda name: f"t.{name}", outbox=SimpleNamespace(source="afterglow/x", lanes=8)
    )
    for ended in ("2026-03-02T21:15:00Z", "2026-03-03T02:45:00+05:30"):
        member = AudienceMemberResolved.model_validate_json(
            orjson.dumps(
                {"user_id": "u-1", "promotion_id": "p-1", "ended_at": ended, "timezone": "UTC"}
            )
        )
        assert member.ended_at.tzinfo is not UTC
        encoder = FastEncoder(ctx, NOW)
        _plan_one(member, POLICY, NOW, [], encoder)
        events = [orjson.loads(row[3]) for row in encoder.rows]
        planned = [e["data"] for e in events if e["type"] == TouchPlanned.event_type()]
        assert len(planned) == len(POLICY.waves)
        launch = next(d for d in planned if d["wave"] == "launch")
        assert launch["due_at"] == "2026-03-02T21:15:00+00:00"
        for data in planned:
            assert data["due_at"].endswith("+00:00") and data["deadline"].endswith("+00:00")


def test_the_caches_of_planned_shapes_stay_bounded() -> None:
    # Each promotion's end, zone and tier make a shape whose times and bytes are kept: a
    # service that plans many promotions keeps no more than the bound of them.
    ctx: Any = SimpleNamespace(
        topic=lambda name: f"t.{name}", outbox=SimpleNamespace(source="afterglow/x", lanes=8)
    )
    encoder = FastEncoder(ctx, NOW)
    index = domain._index(POLICY)
    for i in range(domain.SLOTS_CACHED + 500):
        ended = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=i)
        member = AudienceMemberResolved(user_id="u-1", promotion_id=f"p-{i}", ended_at=ended)
        _plan_one(member, POLICY, NOW, [], encoder)
    assert 0 < len(index.slots) <= domain.SLOTS_CACHED
    assert 0 < len(planning._slot_parts) <= domain.SLOTS_CACHED
