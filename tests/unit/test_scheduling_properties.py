"""Property test over the pure rules: random populations, policies and receipt streams,
played through the same decisions the dispatcher makes, in time order.

Whatever happens: no user over a cap in any 7- or 30-day window, no touch in quiet hours,
and no touch suppressed for a cap while a free, non-quiet slot existed before its deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.scheduling import domain
from services.scheduling.policy import Caps, Policy, QuietHours, default_policy

START = datetime(2026, 3, 1, tzinfo=UTC)
ZONES = [
    "UTC",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/New_York",
    "Australia/Adelaide",
    "Europe/Berlin",
    "Asia/Shanghai",
]
CONSENT = {"sms": True, "email": True, "push": True, "in_app": True, "social": True}


@dataclass
class Sim:
    policy: Policy
    users: dict[str, domain.UserView]
    pending: dict[str, tuple[domain.DueTouch, datetime]] = field(default_factory=dict)
    sends: dict[str, list[datetime]] = field(default_factory=dict)
    suppressed: list[tuple[str, domain.DueTouch, datetime, str]] = field(default_factory=list)
    engagements: list[tuple[datetime, str, str, str]] = field(default_factory=list)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    per_7d = draw(st.integers(1, 3))
    per_30d = draw(st.integers(per_7d, 6))
    start = draw(st.integers(18, 23))
    end = draw(st.integers(6, 10))
    return default_policy().model_copy(
        update={
            "caps": Caps(per_7d=per_7d, per_30d=per_30d),
            "quiet_hours": QuietHours(start=time(start), end=time(end)),
        }
    )


@st.composite
def worlds(draw: st.DrawFn) -> Sim:
    policy = draw(policies())
    n_users = draw(st.integers(1, 5))
    users = {
        f"u{i}": domain.UserView(
            timezone=draw(st.sampled_from(ZONES)), consent=dict(CONSENT), first_seen=START
        )
        for i in range(n_users)
    }
    sim = Sim(policy, users)
    for p in range(draw(st.integers(1, 4))):
        ended = START + timedelta(minutes=draw(st.integers(0, 20 * 24 * 60)))
        members = draw(st.lists(st.sampled_from(sorted(users)), min_size=1, unique=True))
        for user_id in members:
            member = domain.Member(
                user_id=user_id,
                promotion_id=f"p{p}",
                ended_at=ended,
                timezone=users[user_id].timezone,
                ltv_tier=draw(st.sampled_from([None, None, "silent", "potential_churn"])),
                silent=draw(st.booleans()),
            )
            for t in domain.plan_member(policy, member):
                if t.status != "planned":
                    continue
                due = domain.DueTouch(
                    touch_id=t.touch_id,
                    promotion_id=t.promotion_id,
                    wave=t.wave,
                    variant=t.variant,
                    due_at=t.due_at,
                    deadline=t.deadline,
                    parallel=t.parallel,
                    rank=t.rank,
                    essential=t.essential,
                    promotion_ended_at=ended,
                )
                sim.pending[t.touch_id] = (due, t.due_at)
    kinds = st.sampled_from(["opened", "clicked", "delivered", "unsubscribed", "complained"])
    for _ in range(draw(st.integers(0, 6))):
        sim.engagements.append(
            (
                START + timedelta(minutes=draw(st.integers(0, 60 * 24 * 60))),
                draw(st.sampled_from(sorted(users))),
                draw(kinds),
                draw(st.sampled_from(["sms", "email", "push"])),
            )
        )
    sim.engagements.sort()
    return sim


def play(sim: Sim) -> None:
    user_of = {tid: tid_user(sim, tid) for tid in sim.pending}
    receipts = list(sim.engagements)
    for _ in range(10_000):
        if not sim.pending:
            return
        now = min(due for _, due in sim.pending.values())
        while receipts and receipts[0][0] <= now:
            at, user_id, kind, channel = receipts.pop(0)
            user = sim.users[user_id]
            user.fatigue, _ = domain.on_engagement(
                user.fatigue,
                kind,
                channel,  # type: ignore[arg-type]
                at,
                sim.policy.fatigue,
            )
        due_now: dict[str, list[domain.DueTouch]] = {}
        for tid, (touch, due) in sim.pending.items():
            if due <= now:
                due_now.setdefault(user_of[tid], []).append(touch)
        for user_id, touches in due_now.items():
            user = sim.users[user_id]
            user.fatigue, _ = domain.on_time(user.fatigue, now, user.first_seen, sim.policy.fatigue)
            for touch, decision in domain.decide_user(touches, user, now, lambda _: sim.policy):
                if isinstance(decision, domain.Defer):
                    assert decision.until > now
                    sim.pending[touch.touch_id] = (touch, decision.until)
                    continue
                del sim.pending[touch.touch_id]
                if isinstance(decision, domain.Send):
                    sim.sends.setdefault(user_id, []).append(now)
                else:
                    sim.suppressed.append((user_id, touch, now, decision.reason))
    raise AssertionError("the simulation did not settle")


def tid_user(sim: Sim, touch_id: str) -> str:
    for user_id in sim.users:
        for p in range(4):
            for wave in ("launch", "day3", "day7", "day14", "day30"):
                if domain.touch_id(f"p{p}", user_id, wave) == touch_id:
                    return user_id
    raise KeyError(touch_id)


def over_cap(sends: list[datetime], caps: Caps) -> bool:
    ordered = sorted(sends)
    for s in ordered:
        if sum(1 for x in ordered if s - domain.WEEK < x <= s) > caps.per_7d:
            return True
        if sum(1 for x in ordered if s - domain.MONTH < x <= s) > caps.per_30d:
            return True
    return False


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(worlds())
def test_caps_quiet_hours_and_deferral_hold(sim: Sim) -> None:
    play(sim)
    policy = sim.policy
    for user_id, sends in sim.sends.items():
        tz = domain.zone(sim.users[user_id].timezone)
        assert not over_cap(sends, policy.caps), (user_id, sends)
        for s in sends:
            assert not domain.is_quiet(s, tz, policy.quiet_hours), (user_id, s)
    for user_id, touch, _, reason in sim.suppressed:
        if reason not in ("cap_7d", "cap_30d"):
            continue
        tz = domain.zone(sim.users[user_id].timezone)
        sends = sim.sends.get(user_id, [])
        # Every moment a slot could open: the due time, when a past touch leaves a window,
        # and the end of quiet hours after each of those.
        moments = {touch.due_at}
        for s in sends:
            moments |= {s + domain.WEEK, s + domain.MONTH}
        candidates = {domain.next_allowed(m, tz, policy.quiet_hours) for m in moments}
        for m in candidates:
            if touch.due_at <= m <= touch.deadline:
                assert over_cap([*sends, m], policy.caps), (
                    f"{touch.wave} of {user_id} suppressed for {reason} but {m} was free"
                )
