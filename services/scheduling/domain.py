"""Scheduling's rules, pure: wave planning, quiet hours, rolling caps, deferral, priority,
holdout and variant assignment, and the fatigue state machine. No I/O here.

Times are aware UTC datetimes; a user's timezone is an IANA name resolved with zoneinfo,
so half-hour offsets and daylight-saving changes come out right.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta, tzinfo
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.scheduling.policy import WAVES, Fatigue, Policy, QuietHours, WaveSpec
from shared.events import Channel, Reason

WEEK = timedelta(days=7)
MONTH = timedelta(days=30)
CHANNELS: tuple[Channel, ...] = ("sms", "email", "push", "in_app", "social")
WAVE_RANK = {name: i for i, name in enumerate(WAVES)}
TOUCH_NAMESPACE = uuid.UUID("6f1b7a52-3c1e-4d8e-9a7e-1f0c2b9d4e11")


# SHA-1 with the namespace already fed: a copy per touch id (cheaper than hashing it again).
_TOUCH_NAMESPACE_SHA1 = hashlib.sha1(TOUCH_NAMESPACE.bytes, usedforsecurity=False)
_blake2b = hashlib.blake2b


def touch_id(promotion_id: str, user_id: str, wave: str) -> str:
    """Deterministic, so a redelivered audience event plans the same touch again (a no-op).

    `uuid.uuid5(TOUCH_NAMESPACE, "promotion\\x1fuser\\x1fwave")`, spelled out: planning
    computes millions of them and the UUID object in between costs more than the hash.
    """
    return _touch_id(f"{promotion_id}\x1f{user_id}\x1f{wave}".encode())


# The RFC 4122 variant bits (10xx) of the 17th hex digit: digit -> digit with them set.
_VARIANT_DIGIT = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


def _touch_id(name: bytes) -> str:
    """`touch_id` of the encoded name: SHA-1 of namespace and name, version 5, RFC variant."""
    digest = _TOUCH_NAMESPACE_SHA1.copy()
    digest.update(name)
    return _uuid5_text(digest.hexdigest())


def _uuid5_text(h: str) -> str:
    """The UUID text of a SHA-1 hex digest: its first 32 digits, version 5, RFC variant."""
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:32]}"


# -- stable assignment ------------------------------------------------------------


def unit(*parts: str) -> float:
    """A number in [0, 1) that depends only on `parts`: the same in every process and run."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_holdout(policy: Policy, user_id: str, promotion_id: str) -> bool:
    return unit("holdout", user_id, promotion_id) < policy.experiment.holdout_share


def in_wave_holdout(policy: Policy, user_id: str, promotion_id: str, wave: str) -> bool:
    return unit("wave-holdout", user_id, promotion_id, wave) < policy.experiment.wave_holdout_share


def variant_of(policy: Policy, user_id: str, promotion_id: str, wave: str) -> str:
    point = unit("variant", user_id, promotion_id, wave)
    total = 0.0
    for variant in policy.experiment.variants:
        total += variant.share
        if point < total:
            return variant.name
    return policy.experiment.variants[-1].name


def coupon_code(user_id: str, promotion_id: str, wave: str) -> str:
    digest = hashlib.blake2b(f"{user_id}\x1f{promotion_id}\x1f{wave}".encode(), digest_size=5)
    return "AG-" + digest.hexdigest().upper()


# -- time in the user's timezone --------------------------------------------------


@lru_cache(maxsize=1024)
def zone(name: str | None) -> tzinfo:
    """The user's zone; an unknown or missing name falls back to UTC."""
    if not name:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return UTC


def _local_at(day: datetime, at: time, tz: tzinfo) -> datetime:
    """`at` on the local calendar day of `day`, as UTC (zoneinfo resolves DST)."""
    return datetime.combine(day.date(), at, tzinfo=tz).astimezone(UTC)


def is_quiet(at: datetime, tz: tzinfo, quiet: QuietHours) -> bool:
    if quiet.start == quiet.end:
        return False
    local = at.astimezone(tz).time()
    if quiet.start < quiet.end:
        return quiet.start <= local < quiet.end
    return local >= quiet.start or local < quiet.end


def next_allowed(at: datetime, tz: tzinfo, quiet: QuietHours) -> datetime:
    """`at` itself when it is outside quiet hours, else the moment they end locally."""
    if not is_quiet(at, tz, quiet):
        return at
    local = at.astimezone(tz)
    end_today = _local_at(local, quiet.end, tz)
    candidate = end_today if end_today > at else _local_at(local + timedelta(days=1), quiet.end, tz)
    # A DST gap can land the end inside the quiet span by an hour; step until it is not.
    while is_quiet(candidate, tz, quiet):
        candidate += timedelta(minutes=30)
    return candidate


# -- planning ---------------------------------------------------------------------


@dataclass(slots=True)
class Member:
    """One participant of an ended promotion, as planning needs it."""

    user_id: str
    promotion_id: str
    ended_at: datetime
    timezone: str = "UTC"
    ltv_tier: str | None = None
    value_layer: str | None = None
    silent: bool = False
    abuse_review: bool = False
    channel_order: tuple[Channel, ...] = ()


# Not frozen: planning builds millions, and a frozen dataclass costs several times as much to
# construct. Nothing changes one after planning.
@dataclass(slots=True)
class PlannedTouch:
    touch_id: str
    user_id: str
    promotion_id: str
    wave: str
    variant: str
    due_at: datetime
    deadline: datetime
    coupon: bool
    parallel: int
    rank: int
    essential: bool
    status: Literal["planned", "suppressed"]
    reason: Reason | None = None


def wave_due(member: Member, wave: WaveSpec, tz: tzinfo) -> datetime:
    days = wave.after_days
    if member.silent and wave.silent_after_days is not None:
        days = wave.silent_after_days
    if wave.local_time is None:
        return member.ended_at + timedelta(days=days)
    local_end = member.ended_at.astimezone(tz)
    return _local_at(local_end + timedelta(days=days), wave.local_time, tz)


def waves_for(policy: Policy, ltv_tier: str | None) -> list[WaveSpec]:
    intensity = policy.intensity.get(ltv_tier or "")
    if intensity is None:
        return list(policy.waves)
    wanted = set(intensity.waves)
    return [w for w in policy.waves if w.name in wanted]


@dataclass(frozen=True, slots=True)
class _WavePlan:
    """What planning needs of one wave for one tier, read from the policy once."""

    spec: WaveSpec
    name: str
    days: int
    silent_days: int
    local_time: time | None
    deadline: timedelta
    coupon: bool
    rank: int
    essential: bool
    pair_value_layers: frozenset[str]
    # "\x1f" + name, encoded: the tail of the hashed names of `unit` and `touch_id`.
    tail: bytes = b""
    after: timedelta = timedelta(0)
    silent_after: timedelta = timedelta(0)


@dataclass(frozen=True, slots=True)
class _Experiment:
    """The experiment's figures as `member_draws` compares them: for each share, the bound
    below which a digest of `unit` falls exactly when its number is under the share."""

    holdout_below: bytes
    wave_holdout_below: bytes
    # (bound of the running total of the shares, variant): `variant_of`'s sums.
    variants: tuple[tuple[bytes, str], ...]
    last: str


@dataclass(frozen=True, slots=True)
class WaveSlot:
    """One wave of a participant's plan as everyone of the same shape has it (the promotion's
    end, zone, tier, value layer, silence, abuse review): all of the touch but its id, holdout
    and variant, which hash the user."""

    wave: _WavePlan
    due: datetime
    deadline: datetime
    parallel: int
    # A coupon wave of a participant under abuse review: suppressed (when not held out).
    abuse: bool


@dataclass(slots=True)
class _PolicyIndex:
    """What the hot paths read of one policy, derived once: planning and dispatch handle
    millions of touches under a handful of policies."""

    waves: dict[str, WaveSpec]
    plans: dict[str, tuple[_WavePlan, ...]] = field(default_factory=dict)
    # (wave, variant, segment's channel order) -> channels with content, in order
    channels: dict[tuple[str, str, tuple[Channel, ...]], tuple[Channel, ...]] = field(
        default_factory=dict
    )
    experiment: _Experiment | None = None
    # (tier, zone name, end, silent, value layer, abuse review) -> the waves' slots: a
    # promotion's participants share its end, and most of them a few zones and tiers.
    slots: dict[WaveSlotKey, tuple[WaveSlot, ...]] = field(default_factory=dict)


WaveSlotKey = tuple[str | None, str | None, float, bool, str | None, bool]
# About 3 KB an entry with planning's encodings of it (planning.py): at most some 12 MB.
SLOTS_CACHED = 4096
# id(policy) -> (policy, index); the policy is kept so that its id is never reused.
_INDEXES: dict[int, tuple[Policy, _PolicyIndex]] = {}


def _index(policy: Policy) -> _PolicyIndex:
    cached = _INDEXES.get(id(policy))
    if cached is None or cached[0] is not policy:
        if len(_INDEXES) > 256:
            _INDEXES.clear()
        cached = (policy, _PolicyIndex(waves={w.name: w for w in policy.waves}))
        _INDEXES[id(policy)] = cached
    return cached[1]


def wave_of(policy: Policy, name: str) -> WaveSpec | None:
    """`policy.wave(name)`, from the index."""
    return _index(policy).waves.get(name)


def _wave_plans(policy: Policy, ltv_tier: str | None) -> tuple[_WavePlan, ...]:
    plans = _index(policy).plans
    tier = ltv_tier or ""
    found = plans.get(tier)
    if found is None:
        intensity = policy.intensity.get(tier)
        coupon_waves = set(intensity.coupon_waves) if intensity else set()
        rank = {name: i for i, name in enumerate(policy.wave_priority)}
        found = tuple(
            _WavePlan(
                spec=w,
                name=w.name,
                days=w.after_days,
                silent_days=w.after_days if w.silent_after_days is None else w.silent_after_days,
                local_time=w.local_time,
                deadline=timedelta(hours=w.deadline_hours),
                coupon=w.coupon or w.name in coupon_waves,
                rank=rank.get(w.name, len(rank)),
                essential=w.essential,
                pair_value_layers=frozenset(w.pair_value_layers),
                tail=f"\x1f{w.name}".encode(),
                after=timedelta(days=w.after_days),
                silent_after=timedelta(
                    days=w.after_days if w.silent_after_days is None else w.silent_after_days
                ),
            )
            for w in waves_for(policy, ltv_tier)
        )
        plans[tier] = found
    return found


def _experiment(policy: Policy) -> _Experiment:
    index = _index(policy)
    found = index.experiment
    if found is None:
        experiment = policy.experiment
        running, total = [], 0.0
        for variant in experiment.variants:
            total += variant.share
            running.append((_below(total), variant.name))
        found = _Experiment(
            _below(experiment.holdout_share),
            _below(experiment.wave_holdout_share),
            tuple(running),
            experiment.variants[-1].name,
        )
        index.experiment = found
    return found


_TWO64 = 2**64


def _below(share: float) -> bytes:
    """The bound of `share` for 8-byte digests: `d < bound` (bytes compare as big-endian
    numbers do) exactly when `int.from_bytes(d, "big") / 2**64 < share`, as `unit` compares.
    The smallest x whose quotient reaches the share, by bisection on that same float test;
    2**64 (every digest is below) as nine bytes, which every 8-byte digest sorts under."""
    low, high = 0, _TWO64
    while low < high:
        middle = (low + high) // 2
        if middle / _TWO64 >= share:
            high = middle
        else:
            low = middle + 1
    return b"\xff" * 9 if low == _TWO64 else low.to_bytes(8, "big")


def wave_slots(
    policy: Policy,
    ended_at: datetime,
    timezone: str | None,
    ltv_tier: str | None,
    value_layer: str | None,
    silent: bool,
    abuse_review: bool,
) -> tuple[WaveSlot, ...]:
    """The slots of a participant of this shape, one per wave of their tier (cached)."""
    cache = _index(policy).slots
    # The end as its POSIX timestamp, distinct for each microsecond until 2242: a
    # decoded end is a new datetime with a zone object of its own, and hashing one and
    # comparing it with another took 1.8 us, the timestamp 0.4. Equal ends in other offsets
    # share the entry: every time planned is in UTC.
    key = (ltv_tier, timezone, ended_at.timestamp(), silent, value_layer, abuse_review)
    found = cache.get(key)
    if found is not None:
        return found
    waves = _wave_plans(policy, ltv_tier)
    if ended_at.tzinfo is not UTC:
        # Every time planned is in datetime.UTC (a decoded "Z" carries pydantic's own zone
        # object).
        ended_at = ended_at.astimezone(UTC)
    tz = zone(timezone)
    local_day = ended_at.astimezone(tz).date()
    dues = [
        ended_at + (w.silent_after if silent else w.after)
        if w.local_time is None
        # The local time on the local calendar day (zoneinfo resolves DST), as UTC.
        else datetime.combine(
            local_day + timedelta(days=w.silent_days if silent else w.days),
            w.local_time,
            tzinfo=tz,
        ).astimezone(UTC)
        for w in waves
    ]
    slots = []
    last = len(waves) - 1
    for i, wave in enumerate(waves):
        due = dues[i]
        deadline = ended_at + wave.deadline
        if i < last and dues[i + 1] < deadline:
            # Never later than the user's next wave of the same promotion.
            deadline = dues[i + 1]
        if deadline < due:
            deadline = due
        parallel = 2 if value_layer in wave.pair_value_layers else 1
        slots.append(WaveSlot(wave, due, deadline, parallel, wave.coupon and abuse_review))
    if len(cache) >= SLOTS_CACHED:
        cache.clear()
    found = cache[key] = tuple(slots)
    return found


def member_draws(
    policy: Policy, user_id: str, promotion_id: str, slots: Sequence[WaveSlot]
) -> list[tuple[str, str, Reason | None]]:
    """Touch id, variant and reason of suppression of each slot: "holdout" (of the whole
    plan or of the wave) before "abuse", None when planned. The figures of `touch_id`,
    `variant_of`, `in_holdout` and `in_wave_holdout`, with the hashed names put together
    once per participant (planning runs this millions of times)."""
    experiment = _experiment(policy)
    # unit(kind, user, promotion[, wave]) hashes "kind\x1fuser\x1fpromotion[\x1fwave]";
    # touch_id "promotion\x1fuser\x1fwave".
    user_promotion = f"\x1f{user_id}\x1f{promotion_id}".encode()
    held_out = (
        _blake2b(b"holdout" + user_promotion, digest_size=8).digest() < experiment.holdout_below
    )
    # Each wave's names end in its tail: the hashes of what they share, copied per wave
    # (cheaper than hashing the whole name again).
    variant_hash = _blake2b(b"variant" + user_promotion, digest_size=8)
    wave_hash = None if held_out else _blake2b(b"wave-holdout" + user_promotion, digest_size=8)
    touch_hash = _TOUCH_NAMESPACE_SHA1.copy()
    touch_hash.update(f"{promotion_id}\x1f{user_id}".encode())
    wave_below, variants, variant_last = (
        experiment.wave_holdout_below,
        experiment.variants,
        experiment.last,
    )
    draws: list[tuple[str, str, Reason | None]] = []
    for slot in slots:
        tail = slot.wave.tail
        h = variant_hash.copy()
        h.update(tail)
        point = h.digest()
        variant = variant_last
        for below, name in variants:
            if point < below:
                variant = name
                break
        held = held_out
        if wave_hash is not None:
            h = wave_hash.copy()
            h.update(tail)
            held = h.digest() < wave_below
        t = touch_hash.copy()
        t.update(tail)
        reason: Reason | None = "holdout" if held else "abuse" if slot.abuse else None
        draws.append((_uuid5_text(t.hexdigest()), variant, reason))
    return draws


def plan_member(policy: Policy, member: Member) -> list[PlannedTouch]:
    """Every touch of one participant: due time in their zone, deadline, variant, holdout."""
    return [PlannedTouch(*t) for t in plan_member_rows(policy, member)]


# PlannedTouch's fields, in order: touch_id, user_id, promotion_id, wave, variant, due_at,
# deadline, coupon, parallel, rank, essential, status, reason.
PlannedRow = tuple[
    str,
    str,
    str,
    str,
    str,
    datetime,
    datetime,
    bool,
    int,
    int,
    bool,
    Literal["planned", "suppressed"],
    Reason | None,
]


def plan_member_rows(policy: Policy, member: Member) -> list[PlannedRow]:
    """`plan_member` as plain tuples (PlannedTouch's fields in order), for bulk planning."""
    user_id, promotion_id = member.user_id, member.promotion_id
    slots = wave_slots(
        policy,
        member.ended_at,
        member.timezone,
        member.ltv_tier,
        member.value_layer,
        member.silent,
        member.abuse_review,
    )
    touches: list[PlannedRow] = []
    for slot, (touch, variant, reason) in zip(
        slots, member_draws(policy, user_id, promotion_id, slots), strict=True
    ):
        wave = slot.wave
        status: Literal["planned", "suppressed"] = "planned" if reason is None else "suppressed"
        touches.append(
            (
                touch,
                user_id,
                promotion_id,
                wave.name,
                variant,
                slot.due,
                slot.deadline,
                wave.coupon,
                slot.parallel,
                wave.rank,
                wave.essential,
                status,
                reason,
            )
        )
    return touches


# -- caps -------------------------------------------------------------------------


def _earliest_under(
    history: Sequence[datetime], at: datetime, window: timedelta, cap: int
) -> datetime:
    """The earliest t >= at when fewer than `cap` of `history` fall in (t - window, t]."""
    inside = sorted(s for s in history if at - window < s <= at)
    if len(inside) < cap:
        return at
    # The (n - cap + 1)-th oldest has to leave the window: s <= t - window.
    return inside[len(inside) - cap] + window


def cap_reason(
    history: Sequence[datetime], at: datetime, per_7d: int, per_30d: int
) -> Reason | None:
    """Which cap a touch at `at` would break, given the touches already sent."""
    if not history:
        return None
    if sum(1 for s in history if at - WEEK < s <= at) >= per_7d:
        return "cap_7d"
    if sum(1 for s in history if at - MONTH < s <= at) >= per_30d:
        return "cap_30d"
    return None


@dataclass(slots=True)
class Slot:
    """The earliest allowed moment from `at`, and what pushed it there."""

    at: datetime
    cap: Reason | None
    quiet: bool


def earliest_slot(history: Sequence[datetime], at: datetime, tz: tzinfo, policy: Policy) -> Slot:
    caps, quiet = policy.caps, policy.quiet_hours
    if not history and not is_quiet(at, tz, quiet):
        return Slot(at, None, False)  # most touches: nothing sent yet, not at night
    cap: Reason | None = None
    was_quiet = False
    t = at
    for _ in range(64):
        reason = cap_reason(history, t, caps.per_7d, caps.per_30d)
        if reason is not None:
            cap = cap or reason
            t = max(
                _earliest_under(history, t, WEEK, caps.per_7d),
                _earliest_under(history, t, MONTH, caps.per_30d),
            )
            if t == at:  # defensive: never loop on the same instant
                t = at + timedelta(seconds=1)
            continue
        allowed = next_allowed(t, tz, quiet)
        if allowed != t:
            was_quiet = True
            t = allowed
            continue
        break
    return Slot(t, cap, was_quiet)


# -- fatigue state machine --------------------------------------------------------

FatigueName = Literal["normal", "low_frequency", "suppressed"]


@dataclass(frozen=True, slots=True)
class FatigueState:
    state: FatigueName = "normal"
    paused: frozenset[Channel] = frozenset()
    unanswered: int = 0
    last_engaged_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class FatigueChange:
    at: datetime
    signal: str
    channel: Channel | None
    from_state: str
    to_state: str


def _label(state: FatigueState) -> str:
    if state.paused:
        return f"{state.state}; paused: {','.join(sorted(state.paused))}"
    return state.state


def fire(
    state: FatigueState, signal: str, channel: Channel | None, at: datetime, fatigue: Fatigue
) -> tuple[FatigueState, FatigueChange | None]:
    """Apply the policy's first transition that matches `signal` in the current state."""
    for transition in fatigue.transitions:
        if transition.signal != signal:
            continue
        if transition.from_states and state.state not in transition.from_states:
            continue
        if transition.to == "paused":
            if channel is None or channel in state.paused:
                return state, None
            new = replace(state, paused=state.paused | {channel})
        elif transition.to == state.state:
            return state, None
        else:
            new = replace(state, state=transition.to)
        return new, FatigueChange(at, signal, channel, _label(state), _label(new))
    return state, None


def on_engagement(
    state: FatigueState, kind: str, channel: Channel | None, at: datetime, fatigue: Fatigue
) -> tuple[FatigueState, FatigueChange | None]:
    """A receipt: opens and clicks reset the ignored streak and the silence clock."""
    if kind in ("opened", "clicked"):
        last = state.last_engaged_at
        state = replace(state, unanswered=0, last_engaged_at=at if last is None else max(last, at))
    if kind in ("complained", "unsubscribed", "opened", "clicked"):
        return fire(state, kind, channel, at, fatigue)
    return state, None


def on_time(
    state: FatigueState, now: datetime, first_seen: datetime | None, fatigue: Fatigue
) -> tuple[FatigueState, list[FatigueChange]]:
    """The signals that time produces: an ignored streak, and silence."""
    changes: list[FatigueChange] = []
    if state.unanswered >= fatigue.ignored_streak:
        state, change = fire(state, "ignored_streak", None, now, fatigue)
        changes += [change] if change else []
    quiet_since = state.last_engaged_at or first_seen
    if quiet_since is not None and now - quiet_since >= timedelta(days=fatigue.silence_days):
        state, change = fire(state, "silence", None, now, fatigue)
        changes += [change] if change else []
    return state, changes


# -- dispatch decisions -----------------------------------------------------------


@dataclass(slots=True)
class DueTouch:
    """A planned touch whose time has come, with what the decision needs."""

    touch_id: str
    promotion_id: str
    wave: str
    variant: str
    due_at: datetime
    deadline: datetime
    parallel: int
    rank: int
    essential: bool
    promotion_ended_at: datetime
    channel_order: tuple[Channel, ...] = ()
    cancelled: bool = False


@dataclass(slots=True)
class UserView:
    """One user's state under the per-user lock."""

    timezone: str = "UTC"
    consent: dict[str, bool] = field(default_factory=dict)
    erased: bool = False
    fatigue: FatigueState = field(default_factory=FatigueState)
    first_seen: datetime | None = None
    history: list[datetime] = field(default_factory=list)


@dataclass(slots=True)
class Send:
    channels: tuple[Channel, ...]


@dataclass(slots=True)
class Defer:
    until: datetime
    reason: Reason


@dataclass(slots=True)
class Suppress:
    reason: Reason


Decision = Send | Defer | Suppress


def channels_for(
    touch: DueTouch, wave: WaveSpec, user: UserView, policy: Policy | None = None
) -> tuple[tuple[Channel, ...], Reason | None]:
    """The segment's order, then the wave's; only consented, unpaused channels with content.

    `policy`: the policy `wave` belongs to, to reuse the order computed for earlier touches.
    """
    key = (wave.name, touch.variant, touch.channel_order)
    cache = _index(policy).channels if policy is not None else {}
    order = cache.get(key)
    if order is None:
        with_content = set(wave.content.get(touch.variant, {}))
        order = tuple(
            c for c in dict.fromkeys((*touch.channel_order, *wave.channels)) if c in with_content
        )
        cache[key] = order
    consent, paused = user.consent, user.fatigue.paused
    consented = [c for c in order if consent.get(c) is True]
    allowed = tuple(c for c in consented if c not in paused) if paused else tuple(consented)
    if allowed:
        return allowed, None
    return (), ("unsubscribed" if consented else "no_consent")


def decide_user(
    touches: Iterable[DueTouch],
    user: UserView,
    now: datetime,
    policy_of: Callable[[DueTouch], Policy],
) -> list[tuple[DueTouch, Decision]]:
    """Decide every due touch of one user, best priority first; sends join `user.history`.

    Priority: the policy's wave order, then the promotion that ended first.
    """
    ordered = sorted(touches, key=lambda t: (t.rank, t.promotion_ended_at, t.due_at, t.touch_id))
    tz = zone(user.timezone)
    out: list[tuple[DueTouch, Decision]] = []
    for touch in ordered:
        policy = policy_of(touch)
        out.append((touch, _decide(touch, user, now, policy, tz)))
    return out


def _decide(touch: DueTouch, user: UserView, now: datetime, policy: Policy, tz: tzinfo) -> Decision:
    if touch.cancelled:
        return Suppress("cancelled")
    if user.erased:
        return Suppress("erased")
    if user.fatigue.state == "suppressed":
        return Suppress("complained")
    wave = wave_of(policy, touch.wave)
    if wave is None:
        return Suppress("cancelled")
    if user.fatigue.state == "low_frequency" and not wave.essential:
        return Suppress("fatigue")
    channels, refused = channels_for(touch, wave, user, policy)
    if refused is not None:
        return Suppress(refused)
    slot = earliest_slot(user.history, now, tz, policy)
    if slot.at <= now:
        user.history.append(now)
        f = user.fatigue
        user.fatigue = FatigueState(f.state, f.paused, f.unanswered + 1, f.last_engaged_at)
        return Send(channels)
    reason: Reason = slot.cap or "quiet_hours"
    if slot.at <= touch.deadline:
        return Defer(slot.at, reason)
    return Suppress(reason)
