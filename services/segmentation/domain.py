"""Segmentation rules: RFM, LTV, age bands, value layers, tags, silence, abuse, channel order.

Pure Python over plain data. The store ranks the whole population in SQL with
exactly the formulas of `score_population` (which the tests compare against),
and keeps the cut points of the last ranking so that a user whose activity
changed since is scored against them (`Cuts.score`), without a new ranking.

Quintiles are rank based: score = 1 + floor(5 * (rank - 1) / n), where rank is
1 + the number of users with a strictly smaller value. Ties share a score, the
score never decreases when the value grows, and it is always 1..5. Value
layers split by position instead (ties broken by user id), so that their
shares are exact to one user whatever the ties.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from services.segmentation.config import ALL_CHANNELS, SegmentationConfig, TagRule
from shared.events import Channel

QUINTILES = 5
UNKNOWN_AGE = "unknown"
# Activity kinds; "interaction" kinds end silence.
KINDS = ("purchase", "visit", "click", "open", "refund")
INTERACTIONS = frozenset({"purchase", "visit", "click", "open"})
ENGAGEMENT_KINDS = frozenset({"opened", "clicked"})


# -- activities folded into per-user changes ----------------------------------------


@dataclass(frozen=True)
class Activity:
    id: str
    user_id: str
    kind: str
    occurred_at: datetime
    amount: float | None = None
    item_id: str | None = None
    promotion_id: str | None = None
    currency: str | None = None
    category: str | None = None


@dataclass
class UserDelta:
    """What a batch of new activities adds to one user's aggregates."""

    user_id: str
    purchases: int = 0
    monetary: float = 0.0
    ltv: float = 0.0
    visits: int = 0
    last_purchase_at: datetime | None = None
    last_interaction_at: datetime | None = None


def month_start(when: datetime) -> date:
    return date(when.year, when.month, 1)


def ltv_window_start(now: datetime, months: int) -> date:
    """First day of the oldest month in the LTV window (the current month counts as one)."""
    index = now.year * 12 + (now.month - 1) - (months - 1)
    return date(index // 12, index % 12 + 1, 1)


def signed_amount(activity: Activity) -> float:
    amount = activity.amount or 0.0
    if activity.kind == "purchase":
        return amount
    if activity.kind == "refund":
        return -amount
    return 0.0


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def fold_activities(activities: Iterable[Activity], window_start: date) -> list[UserDelta]:
    """Per-user deltas of new activities, sorted by user id (a stable lock order for upserts)."""
    deltas: dict[str, UserDelta] = {}
    for a in activities:
        d = deltas.get(a.user_id)
        if d is None:
            d = deltas[a.user_id] = UserDelta(a.user_id)
        amount = signed_amount(a)
        d.monetary += amount
        if month_start(a.occurred_at) >= window_start:
            d.ltv += amount
        if a.kind == "purchase":
            d.purchases += 1
            d.last_purchase_at = _later(d.last_purchase_at, a.occurred_at)
        if a.kind == "visit":
            d.visits += 1
        if a.kind in INTERACTIONS:
            d.last_interaction_at = _later(d.last_interaction_at, a.occurred_at)
    return [deltas[k] for k in sorted(deltas)]


def month_amounts(activities: Iterable[Activity]) -> dict[tuple[str, date], tuple[float, int]]:
    """(user, month) -> (net amount, purchases), for the monthly buckets behind the LTV window."""
    buckets: dict[tuple[str, date], tuple[float, int]] = {}
    for a in activities:
        if a.kind not in ("purchase", "refund"):
            continue
        key = (a.user_id, month_start(a.occurred_at))
        amount, count = buckets.get(key, (0.0, 0))
        buckets[key] = (amount + signed_amount(a), count + (a.kind == "purchase"))
    return dict(sorted(buckets.items()))


def abuse_detected(
    purchase_times: Iterable[datetime], *, threshold: int, window: timedelta
) -> bool:
    """`threshold` purchases of one item within any `window` (inclusive)."""
    times = sorted(purchase_times)
    start = 0
    for end, when in enumerate(times):
        while when - times[start] > window:
            start += 1
        if end - start + 1 >= threshold:
            return True
    return False


# -- ranking --------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregates:
    """One user's kept aggregates."""

    user_id: str
    purchases: int = 0
    monetary: float = 0.0
    ltv: float = 0.0
    last_purchase_at: datetime | None = None
    last_interaction_at: datetime | None = None
    abuse_review: bool = False


@dataclass(frozen=True)
class Scores:
    r: int
    f: int
    m: int
    value_layer: str


def rank_quintiles(values: Sequence[Any]) -> list[int]:
    """Rank-based quintiles of `values` (None ranks lowest), in input order."""
    n = len(values)
    keyed = sorted(range(n), key=lambda i: _sort_key(values[i]))
    scores = [0] * n
    rank = 1
    for position, index in enumerate(keyed):
        if position and _sort_key(values[index]) != _sort_key(values[keyed[position - 1]]):
            rank = position + 1
        scores[index] = 1 + (QUINTILES * (rank - 1)) // n
    return scores


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, 0) if value is None else (1, value)


def layer_for_position(position: int, n: int, shares: tuple[int, int, int]) -> str:
    """Position 1..n in ascending value order -> base, core or head."""
    base, core, _ = shares
    if 100 * position <= base * n:
        return "base"
    if 100 * position <= (base + core) * n:
        return "core"
    return "head"


def value_layers(
    users: Sequence[tuple[str, float]], shares: tuple[int, int, int]
) -> dict[str, str]:
    """(user id, value) -> layer by position in ascending (value, user id) order."""
    ordered = sorted(users, key=lambda u: (u[1], u[0]))
    n = len(ordered)
    return {uid: layer_for_position(i + 1, n, shares) for i, (uid, _) in enumerate(ordered)}


def score_population(
    users: Sequence[Aggregates], shares: tuple[int, int, int] = (60, 25, 15)
) -> dict[str, Scores]:
    """The full ranking, as the store's SQL does it."""
    r = rank_quintiles([u.last_purchase_at for u in users])
    f = rank_quintiles([u.purchases for u in users])
    m = rank_quintiles([u.monetary for u in users])
    layers = value_layers([(u.user_id, u.ltv) for u in users], shares)
    return {u.user_id: Scores(r[i], f[i], m[i], layers[u.user_id]) for i, u in enumerate(users)}


def threshold_positions(n: int) -> list[int]:
    """1-based positions j_k = ceil((k - 1) n / 5), k = 2..5, in ascending value order.

    A value scores at least k exactly when it is greater than the value at j_k: the
    rank formula needs at least j_k users strictly below it.
    """
    return [-(-(k - 1) * n // QUINTILES) for k in range(2, QUINTILES + 1)]


def layer_positions(n: int, shares: tuple[int, int, int]) -> tuple[int, int]:
    """The last position in base and in core (0: the layer is empty)."""
    base, core, _ = shares
    return base * n // 100, (base + core) * n // 100


@dataclass(frozen=True)
class Cuts:
    """A ranking's thresholds: a value above `cuts[k-2]` scores at least k.

    None as a recency threshold means "no purchase": any purchase is above it.
    `base_max` / `core_max`: the value at the last position of the layer; a value
    tied with it stays in that layer; None: the layer is empty.
    """

    recency: tuple[datetime | None, ...] = ()
    frequency: tuple[float, ...] = ()
    monetary: tuple[float, ...] = ()
    base_max: float | None = None
    core_max: float | None = None

    @staticmethod
    def quintile(value: Any, cuts: Sequence[Any]) -> int:
        if value is None:
            return 1
        return 1 + sum(1 for c in cuts if c is None or value > c)

    def layer(self, value: float) -> str:
        if self.core_max is None or value > self.core_max:
            return "head"
        if self.base_max is None or value > self.base_max:
            return "core"
        return "base"

    def score(self, agg: Aggregates) -> Scores:
        return Scores(
            self.quintile(agg.last_purchase_at, self.recency),
            self.quintile(agg.purchases, self.frequency),
            self.quintile(agg.monetary, self.monetary),
            self.layer(agg.ltv),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "recency": [None if c is None else c.isoformat() for c in self.recency],
            "frequency": list(self.frequency),
            "monetary": list(self.monetary),
            "base_max": self.base_max,
            "core_max": self.core_max,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Cuts:
        return cls(
            recency=tuple(
                None if c is None else aware(datetime.fromisoformat(c))
                for c in raw.get("recency", [])
            ),
            frequency=tuple(float(c) for c in raw.get("frequency", [])),
            monetary=tuple(float(c) for c in raw.get("monetary", [])),
            base_max=raw.get("base_max"),
            core_max=raw.get("core_max"),
        )


def aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def cuts_of(users: Sequence[Aggregates], shares: tuple[int, int, int] = (60, 25, 15)) -> Cuts:
    """The thresholds of a ranking of `users` (the store finds the same with row_number)."""
    n = len(users)
    positions = threshold_positions(n)

    def at(values: list[Any]) -> tuple[Any, ...]:
        ordered = sorted(values, key=_sort_key)
        return tuple(ordered[j - 1] for j in positions)

    by_value = sorted(users, key=lambda u: (u.ltv, u.user_id))
    p1, p2 = layer_positions(n, shares)
    return Cuts(
        recency=at([u.last_purchase_at for u in users]),
        frequency=at([float(u.purchases) for u in users]),
        monetary=at([u.monetary for u in users]),
        base_max=by_value[p1 - 1].ltv if p1 else None,
        core_max=by_value[p2 - 1].ltv if p2 else None,
    )


# -- tiers, bands, tags, channels ------------------------------------------------------


def rfm_tier(scores: Scores, config: SegmentationConfig) -> str:
    for rule in config.rfm_tiers:
        if rule.r.holds(scores.r) and rule.f.holds(scores.f) and rule.m.holds(scores.m):
            return rule.name
    return config.rfm_default_tier


def ltv_tier(ltv: float, config: SegmentationConfig) -> str:
    if ltv > config.ltv.high_potential_above:
        return "high_potential"
    if ltv >= config.ltv.potential_churn_from:
        return "potential_churn"
    return "silent"


def age_band(
    birth_year: int | None, now: datetime, config: SegmentationConfig
) -> tuple[str, list[Channel]]:
    """The band's name and default channel order (age counted in calendar years)."""
    if birth_year is not None:
        age = now.year - birth_year
        for band in config.age_bands:
            if age >= band.min_age and (band.max_age is None or age <= band.max_age):
                return band.name, list(band.channel_order)
    return UNKNOWN_AGE, list(config.unknown_age_channel_order)


def channel_order(
    default: Sequence[Channel],
    engagement: Mapping[Channel, tuple[int, int]],
    *,
    click_weight: int = 2,
) -> list[Channel]:
    """Channels the user opened or clicked on come first, most engaged first; then the default.

    `engagement`: channel -> (opens, clicks). Channels missing from `default` follow it.
    """
    base = [*default, *(c for c in ALL_CHANNELS if c not in default)]
    weight = {c: opens + click_weight * clicks for c, (opens, clicks) in engagement.items()}
    return sorted(base, key=lambda c: (-weight.get(c, 0), base.index(c)))


def is_silent(last_interaction_at: datetime | None, now: datetime, days: int) -> bool:
    return last_interaction_at is None or now - last_interaction_at >= timedelta(days=days)


TAG_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}


@dataclass(frozen=True)
class WindowCounts:
    """Activity counts within one window of days."""

    purchases: int = 0
    spend: float = 0.0
    visits: int = 0


def tag_windows(config: SegmentationConfig) -> list[int]:
    return sorted({rule.within_days for rule in config.tags if rule.within_days is not None})


def tags_for(
    agg: Aggregates,
    scores: Scores | None,
    windows: Mapping[int, WindowCounts],
    rules: Sequence[TagRule],
) -> list[str]:
    """The names of the tag rules the user meets, in configuration order."""
    found: list[str] = []
    for rule in rules:
        value: float | None
        if rule.within_days is not None:
            counts = windows.get(rule.within_days, WindowCounts())
            value = {"purchases": counts.purchases, "spend": counts.spend, "visits": counts.visits}[
                rule.metric
            ]
        elif rule.metric in ("r", "f", "m"):
            value = None if scores is None else getattr(scores, rule.metric)
        else:
            value = {"purchases": agg.purchases, "spend": agg.monetary, "ltv": agg.ltv}.get(
                rule.metric
            )
        if value is not None and TAG_OPS[rule.op](value, rule.value):
            found.append(rule.name)
    return found


# -- the segment of one user -------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    user_id: str
    scores: Scores | None
    rfm_tier: str | None
    ltv: float
    ltv_tier: str
    age_band: str
    value_layer: str | None
    silent: bool
    tags: list[str]
    channel_order: list[Channel]
    abuse_review: bool
    scored_at: datetime | None
    extra: dict[str, Any] = field(default_factory=dict)


def segment_of(
    agg: Aggregates,
    *,
    birth_year: int | None,
    engagement: Mapping[Channel, tuple[int, int]],
    windows: Mapping[int, WindowCounts],
    cuts: Cuts | None,
    ranked: tuple[str, float] | None,
    scored_at: datetime | None,
    now: datetime,
    config: SegmentationConfig,
) -> Segment:
    """Everything known about one user, scored against the last ranking's cut points.

    `ranked`: the layer and value the last ranking gave the user; it stands while the
    value is unchanged (cut points cannot split ties the way the ranking did).
    """
    scores = cuts.score(agg) if cuts is not None else None
    if scores is not None and ranked is not None and ranked[1] == agg.ltv:
        scores = Scores(scores.r, scores.f, scores.m, ranked[0])
    band, default_order = age_band(birth_year, now, config)
    return Segment(
        user_id=agg.user_id,
        scores=scores,
        rfm_tier=rfm_tier(scores, config) if scores is not None else None,
        ltv=round(agg.ltv, 2),
        ltv_tier=ltv_tier(agg.ltv, config),
        age_band=band,
        value_layer=scores.value_layer if scores is not None else None,
        silent=is_silent(agg.last_interaction_at, now, config.silence_days),
        tags=tags_for(agg, scores, windows, config.tags),
        channel_order=channel_order(default_order, engagement, click_weight=config.click_weight),
        abuse_review=agg.abuse_review,
        scored_at=scored_at,
    )
