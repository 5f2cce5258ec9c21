"""Scheduling's pure rules: waves in the user's zone, quiet hours, caps, deferral, priority,
holdout and variants, the fatigue state machine, and policy validation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta

import pytest
from pydantic import ValidationError

from services.scheduling import domain
from services.scheduling.policy import Policy, PolicyError, QuietHours, default_policy

POLICY = default_policy()
QUIET = POLICY.quiet_hours


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def member(user: str = "u-1", tz: str = "UTC", **kwargs: object) -> domain.Member:
    return domain.Member(
        user_id=user,
        promotion_id="p-1",
        ended_at=kwargs.pop("ended_at", utc(2026, 3, 6, 12)),  # type: ignore[arg-type]
        timezone=tz,
        **kwargs,  # type: ignore[arg-type]
    )


def by_wave(touches: list[domain.PlannedTouch]) -> dict[str, domain.PlannedTouch]:
    return {t.wave: t for t in touches}


def test_touch_ids_are_the_uuid5_of_promotion_user_and_wave() -> None:
    for promotion, user, wave in [("p-1", "u-1", "launch"), ("é", "ü\x00 x", "day30")]:
        expected = uuid.uuid5(domain.TOUCH_NAMESPACE, f"{promotion}\x1f{user}\x1f{wave}")
        assert domain.touch_id(promotion, user, wave) == str(expected)


def test_a_policy_change_plans_with_the_new_figures() -> None:
    """Planning reads a policy once per tier; a new policy object is read afresh."""
    changed = POLICY.model_copy(
        update={
            "waves": [
                w.model_copy(update={"after_days": 4}) if w.name == "day3" else w
                for w in POLICY.waves
            ]
        }
    )
    first = by_wave(domain.plan_member(POLICY, member()))
    second = by_wave(domain.plan_member(changed, member()))
    assert second["day3"].due_at - first["day3"].due_at == timedelta(days=1)


def test_the_default_policy_carries_the_domain_figures() -> None:
    assert [w.name for w in POLICY.waves] == ["launch", "day3", "day7", "day14", "day30"]
    assert (POLICY.caps.per_7d, POLICY.caps.per_30d) == (2, 5)
    assert (QUIET.start, QUIET.end) == (time(21), time(9))
    assert POLICY.wave("launch") is not None and POLICY.wave("launch").deadline_hours == 2  # type: ignore[union-attr]
    assert POLICY.experiment.holdout_share == 0.10
    assert POLICY.experiment.wave_holdout_share == 0.05
    assert POLICY.wave("day7").pair_value_layers == ["core"]  # type: ignore[union-attr]
    assert POLICY.intensity["silent"].waves == ["launch", "day3"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b["caps"].update(per_7d=0), "caps.per_7d"),
        (lambda b: b["caps"].update(per_30d=1), "caps.per_30d"),
        (lambda b: b["waves"][1].update(deadline_hours=48), "waves[1].deadline_hours"),
        (lambda b: b["waves"][2].update(after_days=1), "waves[2].after_days"),
        (lambda b: b["wave_priority"].append("day99"), None),
        (lambda b: b["experiment"]["variants"][0].update(share=0.9), "experiment.variants"),
    ],
)
def test_a_policy_that_makes_no_sense_is_refused_naming_the_field(
    change: object, field: str | None
) -> None:
    body = POLICY.model_dump(mode="json")
    change(body)  # type: ignore[operator]
    with pytest.raises(ValidationError) as info:
        Policy.model_validate(body)
    if field is not None:
        cause = info.value.errors()[0]["ctx"]["error"]
        assert isinstance(cause, PolicyError)
        assert cause.field == field


def test_an_unknown_channel_is_refused() -> None:
    body = POLICY.model_dump(mode="json")
    body["waves"][0]["channels"] = ["pigeon"]
    with pytest.raises(ValidationError) as info:
        Policy.model_validate(body)
    assert info.value.errors()[0]["loc"][:3] == ("waves", 0, "channels")


def test_waves_fall_on_local_calendar_days_with_half_hour_offsets() -> None:
    waves = by_wave(domain.plan_member(POLICY, member(tz="Asia/Kolkata")))
    assert waves["launch"].due_at == utc(2026, 3, 6, 12)
    assert waves["launch"].deadline == utc(2026, 3, 6, 14)
    # 10:00 in Kolkata (+05:30) is 04:30 UTC.
    assert waves["day3"].due_at == utc(2026, 3, 9, 4, 30)
    assert waves["day30"].due_at == utc(2026, 4, 5, 4, 30)
    assert waves["day3"].deadline <= waves["day7"].due_at


def test_waves_follow_a_daylight_saving_change() -> None:
    # New York moves to EDT on 2026-03-08: 10:00 local is 15:00 UTC before, 14:00 after.
    waves = by_wave(domain.plan_member(POLICY, member(tz="America/New_York")))
    assert waves["day3"].due_at == utc(2026, 3, 9, 14)
    early = by_wave(
        domain.plan_member(POLICY, member(tz="America/New_York", ended_at=utc(2026, 3, 1, 16)))
    )
    assert early["day3"].due_at == utc(2026, 3, 4, 15)
    assert early["day7"].due_at == utc(2026, 3, 8, 14)


def test_tiers_choose_their_waves_and_silence_moves_day3() -> None:
    high = domain.plan_member(POLICY, member(ltv_tier="high_potential"))
    assert [t.wave for t in high] == ["launch", "day30"]
    churn = domain.plan_member(POLICY, member(ltv_tier="potential_churn"))
    assert [t.wave for t in churn] == ["day7", "day14"]
    silent = by_wave(domain.plan_member(POLICY, member(ltv_tier="silent", silent=True)))
    assert list(silent) == ["launch", "day3"]
    assert silent["day3"].due_at == utc(2026, 3, 8, 10)
    assert silent["day3"].coupon
    core = by_wave(domain.plan_member(POLICY, member(value_layer="core")))
    assert core["day7"].parallel == 2 and core["day3"].parallel == 1
    # Every wave of the default policy reaches some tier.
    tiers = ("high_potential", "potential_churn", "silent")
    reached = {t.wave for tier in tiers for t in domain.plan_member(POLICY, member(ltv_tier=tier))}
    assert reached == {w.name for w in POLICY.waves}


def test_holdout_and_variants_are_stable_and_near_their_shares() -> None:
    users = [f"u-{i}" for i in range(20_000)]
    held = sum(domain.in_holdout(POLICY, u, "p-1") for u in users) / len(users)
    wave_held = sum(domain.in_wave_holdout(POLICY, u, "p-1", "day3") for u in users) / len(users)
    b = sum(domain.variant_of(POLICY, u, "p-1", "day3") == "B" for u in users) / len(users)
    assert 0.09 < held < 0.11
    assert 0.04 < wave_held < 0.06
    assert 0.48 < b < 0.52
    assert domain.variant_of(POLICY, "u-7", "p-1", "day3") == domain.variant_of(
        POLICY, "u-7", "p-1", "day3"
    )
    held_out = next(u for u in users if domain.in_holdout(POLICY, u, "p-1"))
    plan = domain.plan_member(POLICY, member(user=held_out))
    assert {(t.status, t.reason) for t in plan} == {("suppressed", "holdout")}


@pytest.mark.parametrize("share", [0.0, 0.05, 0.1, 1 / 3, 0.5, 0.999999, 1.0, 1.5])
def test_bulk_planning_splits_the_digests_where_the_single_rules_do(share: float) -> None:
    """Bulk planning compares raw digests with a bound instead of their quotient with the
    share: around the bound, and at the ends, both put each digest on the same side."""
    below = domain._below(share)
    bound = int.from_bytes(below[:8], "big") if len(below) == 8 else 2**64
    for x in {0, 1, 2**64 - 1, *range(max(bound - 3, 0), min(bound + 3, 2**64))}:
        digest = x.to_bytes(8, "big")
        assert (digest < below) == (x / 2**64 < share), (share, x)


def test_quiet_hours_end_at_the_local_morning() -> None:
    kathmandu = domain.zone("Asia/Kathmandu")  # +05:45
    late = utc(2026, 3, 6, 16, 0)  # 21:45 local
    assert domain.is_quiet(late, kathmandu, QUIET)
    assert domain.next_allowed(late, kathmandu, QUIET) == utc(2026, 3, 7, 3, 15)
    assert domain.next_allowed(utc(2026, 3, 6, 12), kathmandu, QUIET) == utc(2026, 3, 6, 12)
    assert not domain.is_quiet(
        utc(2026, 3, 6, 12), domain.zone("UTC"), QuietHours(start=time(0), end=time(0))
    )


def test_caps_defer_to_the_moment_the_oldest_touch_leaves_the_window() -> None:
    history = [utc(2026, 3, 1, 10), utc(2026, 3, 4, 10)]
    assert domain.cap_reason(history, utc(2026, 3, 6, 10), 2, 5) == "cap_7d"
    slot = domain.earliest_slot(history, utc(2026, 3, 6, 10), domain.zone("UTC"), POLICY)
    assert slot == domain.Slot(utc(2026, 3, 8, 10), "cap_7d", False)
    # Freed at 22:00, inside quiet hours: the next morning.
    late = [utc(2026, 3, 1, 22), utc(2026, 3, 4, 10)]
    slot = domain.earliest_slot(late, utc(2026, 3, 6, 10), domain.zone("UTC"), POLICY)
    assert slot.at == utc(2026, 3, 9, 9) and slot.cap == "cap_7d"


def due_touch(wave: str = "day3", **kwargs: object) -> domain.DueTouch:
    values: dict[str, object] = {
        "touch_id": f"t-{wave}",
        "promotion_id": "p-1",
        "wave": wave,
        "variant": "A",
        "due_at": utc(2026, 3, 9, 10),
        "deadline": utc(2026, 3, 20, 12),
        "parallel": 1,
        "rank": domain.WAVE_RANK[wave],
        "essential": False,
        "promotion_ended_at": utc(2026, 3, 6, 12),
    }
    values.update(kwargs)
    return domain.DueTouch(**values)  # type: ignore[arg-type]


def decide(
    touches: list[domain.DueTouch], user: domain.UserView, now: datetime
) -> list[domain.Decision]:
    return [d for _, d in domain.decide_user(touches, user, now, lambda _: POLICY)]


CONSENT = {"sms": True, "email": True, "push": True}


def test_send_follows_the_segment_order_among_consented_channels() -> None:
    user = domain.UserView(consent={"sms": False, "email": True, "push": True})
    touch = due_touch(channel_order=("sms", "push"))
    [decision] = decide([touch], user, utc(2026, 3, 9, 10))
    assert decision == domain.Send(("push", "email"))
    assert user.history == [utc(2026, 3, 9, 10)]


def test_no_consent_unsubscribed_erased_and_complained_suppress() -> None:
    now = utc(2026, 3, 9, 10)
    assert decide([due_touch()], domain.UserView(), now) == [domain.Suppress("no_consent")]
    paused = domain.FatigueState(paused=frozenset({"sms", "email", "push"}))
    assert decide([due_touch()], domain.UserView(consent=CONSENT, fatigue=paused), now) == [
        domain.Suppress("unsubscribed")
    ]
    assert decide([due_touch()], domain.UserView(consent=CONSENT, erased=True), now) == [
        domain.Suppress("erased")
    ]
    complained = domain.FatigueState(state="suppressed")
    assert decide([due_touch()], domain.UserView(consent=CONSENT, fatigue=complained), now) == [
        domain.Suppress("complained")
    ]
    low = domain.FatigueState(state="low_frequency")
    assert decide([due_touch()], domain.UserView(consent=CONSENT, fatigue=low), now) == [
        domain.Suppress("fatigue")
    ]
    assert decide(
        [due_touch("day7", essential=True)], domain.UserView(consent=CONSENT, fatigue=low), now
    ) == [domain.Send(("sms", "push", "email"))]


def test_quiet_hours_defer_and_a_passed_deadline_suppresses() -> None:
    user = domain.UserView(consent=CONSENT, timezone="Asia/Shanghai")  # +08:00
    night = utc(2026, 3, 6, 15)  # 23:00 local
    launch = due_touch("launch", deadline=utc(2026, 3, 6, 17))
    assert decide([launch], user, night) == [domain.Suppress("quiet_hours")]
    day3 = due_touch("day3")
    assert decide([day3], user, night) == [domain.Defer(utc(2026, 3, 7, 1), "quiet_hours")]


def test_the_earlier_wave_of_the_promotion_that_ended_first_wins_the_slot() -> None:
    user = domain.UserView(consent=CONSENT, history=[utc(2026, 3, 5, 10)])
    now = utc(2026, 3, 9, 10)
    late = due_touch("day3", touch_id="late", promotion_ended_at=utc(2026, 3, 6, 12))
    early = due_touch("day3", touch_id="early", promotion_ended_at=utc(2026, 3, 5, 12))
    day7 = due_touch("day7", touch_id="d7", promotion_ended_at=utc(2026, 3, 1, 12))
    decided = dict(
        (t.touch_id, d)
        for t, d in domain.decide_user([late, day7, early], user, now, lambda _: POLICY)
    )
    assert isinstance(decided["early"], domain.Send)
    assert decided["late"] == domain.Defer(utc(2026, 3, 12, 10), "cap_7d")
    assert decided["d7"] == domain.Defer(utc(2026, 3, 12, 10), "cap_7d")


def test_fatigue_state_machine() -> None:
    f = POLICY.fatigue
    at = utc(2026, 3, 9, 10)
    state, change = domain.on_engagement(domain.FatigueState(), "unsubscribed", "sms", at, f)
    assert state.paused == {"sms"} and state.state == "normal"
    assert change is not None and change.to_state == "normal; paused: sms"
    state, _ = domain.on_engagement(state, "complained", "email", at, f)
    assert state.state == "suppressed"
    state, _ = domain.on_engagement(state, "opened", "email", at, f)
    assert state.state == "suppressed"  # a complaint is final

    ignored = domain.FatigueState(unanswered=3)
    state, changes = domain.on_time(ignored, at, at, f)
    assert state.state == "low_frequency" and [c.signal for c in changes] == ["ignored_streak"]
    state, _ = domain.on_engagement(state, "clicked", "push", at, f)
    assert state.state == "normal" and state.unanswered == 0
    state, changes = domain.on_time(state, at + timedelta(days=30), None, f)
    assert state.state == "low_frequency" and [c.signal for c in changes] == ["silence"]
