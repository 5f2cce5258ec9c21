"""Segmentation's pure rules: scoring properties (hypothesis) and each named rule."""

from __future__ import annotations

import json
import random
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.segmentation import domain
from services.segmentation.config import SegmentationConfig, TagRule, load_config

NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
CONFIG = SegmentationConfig()

spend = st.floats(min_value=0, max_value=5000, allow_nan=False, allow_infinity=False)
when = st.none() | st.integers(min_value=0, max_value=400).map(lambda d: NOW - timedelta(days=d))


@st.composite
def populations(draw: st.DrawFn, min_size: int = 1, max_size: int = 300) -> list[domain.Aggregates]:
    n = draw(st.integers(min_value=min_size, max_value=max_size))
    # A few distinct values make heavy ties, which is what real populations have.
    coarse = draw(st.booleans())
    money = st.sampled_from([0.0, 10.0, 99.5, 500.0]) if coarse else spend
    return [
        domain.Aggregates(
            user_id=f"u-{i:05d}",
            purchases=draw(st.integers(min_value=0, max_value=3 if coarse else 60)),
            monetary=draw(money),
            ltv=draw(money),
            last_purchase_at=draw(when),
        )
        for i in range(n)
    ]


@settings(max_examples=60, deadline=None)
@given(populations())
def test_scores_are_always_between_1_and_5(users: list[domain.Aggregates]) -> None:
    for scores in domain.score_population(users).values():
        assert all(1 <= s <= 5 for s in (scores.r, scores.f, scores.m))
        assert scores.value_layer in {"base", "core", "head"}


@st.composite
def large_populations(draw: st.DrawFn) -> list[domain.Aggregates]:
    """1,000 to 20,000 users; values from a seeded generator keep the example small."""
    n = draw(st.integers(min_value=1000, max_value=20_000))
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32)))
    distinct = draw(st.sampled_from([1, 2, 5, 50, 10**9]))
    return [
        domain.Aggregates(f"u-{i:05d}", ltv=float(rng.randrange(distinct)) * 3.5) for i in range(n)
    ]


@settings(max_examples=25, deadline=None)
@given(large_populations())
def test_layer_shares_are_within_a_point_of_60_25_15(users: list[domain.Aggregates]) -> None:
    scores = domain.score_population(users)
    n = len(users)
    for layer, share in (("base", 60), ("core", 25), ("head", 15)):
        held = sum(1 for s in scores.values() if s.value_layer == layer)
        assert abs(100 * held / n - share) <= 1, (layer, held, n)


@settings(max_examples=60, deadline=None)
@given(populations(min_size=2))
def test_more_spend_frequency_and_recency_never_score_lower(
    users: list[domain.Aggregates],
) -> None:
    scores = domain.score_population(users)
    order = {"base": 0, "core": 1, "head": 2}
    for a in users:
        for b in users[:20]:
            sa, sb = scores[a.user_id], scores[b.user_id]
            if a.monetary > b.monetary:
                assert sa.m >= sb.m
            if a.purchases > b.purchases:
                assert sa.f >= sb.f
            if (a.last_purchase_at or datetime.min.replace(tzinfo=UTC)) > (
                b.last_purchase_at or datetime.min.replace(tzinfo=UTC)
            ):
                assert sa.r >= sb.r
            if a.ltv > b.ltv:
                assert order[sa.value_layer] >= order[sb.value_layer]


@settings(max_examples=60, deadline=None)
@given(populations(min_size=2), st.data())
def test_one_user_spending_more_never_loses_score(
    users: list[domain.Aggregates], data: st.DataObject
) -> None:
    i = data.draw(st.integers(min_value=0, max_value=len(users) - 1))
    extra = data.draw(st.floats(min_value=0.01, max_value=1000))
    before = domain.score_population(users)[users[i].user_id]
    u = users[i]
    richer = domain.Aggregates(
        user_id=u.user_id,
        purchases=u.purchases + 1,
        monetary=u.monetary + extra,
        ltv=u.ltv + extra,
        last_purchase_at=NOW + timedelta(days=1),
    )
    after = domain.score_population([*users[:i], richer, *users[i + 1 :]])[u.user_id]
    assert after.m >= before.m and after.f >= before.f and after.r >= before.r


@settings(max_examples=60, deadline=None)
@given(populations())
def test_cut_points_reproduce_the_ranking(users: list[domain.Aggregates]) -> None:
    scores = domain.score_population(users)
    cuts = domain.Cuts.from_json(json.loads(json.dumps(domain.cuts_of(users).to_json())))
    for u in users:
        again = cuts.score(u)
        ranked = scores[u.user_id]
        assert (again.r, again.f, again.m) == (ranked.r, ranked.f, ranked.m)


def test_cut_layers_keep_ties_in_the_lower_layer() -> None:
    users = [domain.Aggregates(f"u-{i:03d}", ltv=0.0 if i < 70 else float(i)) for i in range(100)]
    cuts = domain.cuts_of(users)
    assert cuts.layer(0.0) == "base"
    assert cuts.layer(80.0) == "core" and cuts.layer(99.0) == "head"
    assert cuts.layer(10_000.0) == "head"


def test_rfm_tiers_follow_the_configured_rules() -> None:
    tier = lambda r, f, m: domain.rfm_tier(domain.Scores(r, f, m, "base"), CONFIG)  # noqa: E731
    assert tier(5, 5, 5) == "high_value_regular"
    assert tier(5, 1, 1) == "new"
    assert tier(1, 4, 2) == "at_risk"
    assert tier(1, 1, 1) == "silent"
    assert tier(3, 3, 3) == "potential_churn"
    assert len(CONFIG.tier_names()) == 5


def test_ltv_tiers_at_their_boundaries() -> None:
    assert domain.ltv_tier(500.01, CONFIG) == "high_potential"
    assert domain.ltv_tier(500, CONFIG) == "potential_churn"
    assert domain.ltv_tier(200, CONFIG) == "potential_churn"
    assert domain.ltv_tier(199.99, CONFIG) == "silent"


def test_ltv_window_counts_whole_months() -> None:
    assert domain.ltv_window_start(NOW, 12) == date(2025, 4, 1)
    assert domain.ltv_window_start(NOW, 1) == date(2026, 3, 1)
    assert domain.ltv_window_start(datetime(2026, 1, 31, tzinfo=UTC), 3) == date(2025, 11, 1)


@pytest.mark.parametrize(
    ("birth_year", "band", "first"),
    [
        (2004, "18-24", "social"),
        (1995, "25-34", "push"),
        (1970, "35+", "sms"),
        (2015, "unknown", "push"),
        (None, "unknown", "push"),
    ],
)
def test_age_bands_and_their_channel_order(birth_year: int | None, band: str, first: str) -> None:
    name, order = domain.age_band(birth_year, NOW, CONFIG)
    assert name == band and order[0] == first


def test_history_of_opens_and_clicks_overrides_the_band_order() -> None:
    default = ["sms", "email", "push", "in_app"]
    assert domain.channel_order(default, {}) == ["sms", "email", "push", "in_app", "social"]
    learnt = domain.channel_order(default, {"push": (1, 0), "email": (0, 1)})
    assert learnt == ["email", "push", "sms", "in_app", "social"], "a click weighs two opens"


def test_silence_after_30_days_without_interaction() -> None:
    assert domain.is_silent(None, NOW, 30)
    assert not domain.is_silent(NOW - timedelta(days=29, hours=23), NOW, 30)
    assert domain.is_silent(NOW - timedelta(days=30), NOW, 30)


def test_the_same_item_ten_times_within_three_hours_is_abuse() -> None:
    window = timedelta(hours=3)
    ten = [NOW + timedelta(minutes=20 * i) for i in range(10)]  # 3 h exactly
    assert domain.abuse_detected(ten, threshold=10, window=window)
    assert not domain.abuse_detected(ten[:9], threshold=10, window=window)
    spread = [NOW + timedelta(minutes=21 * i) for i in range(10)]
    assert not domain.abuse_detected(spread, threshold=10, window=window)


def test_tags_from_rules() -> None:
    agg = domain.Aggregates("u-1", purchases=8, monetary=900.0, ltv=900.0)
    windows = {30: domain.WindowCounts(purchases=6)}
    assert domain.tags_for(agg, None, windows, CONFIG.tags) == ["social_layer"]
    assert domain.tags_for(agg, None, {30: domain.WindowCounts(5)}, CONFIG.tags) == []
    rules = [
        TagRule(name="big", metric="ltv", op=">=", value=900),
        TagRule(name="top_m", metric="m", op="==", value=5),
    ]
    scores = domain.Scores(1, 1, 5, "head")
    assert domain.tags_for(agg, scores, {}, rules) == ["big", "top_m"]


def test_activities_fold_into_per_user_deltas() -> None:
    acts = [
        domain.Activity("1", "u-b", "purchase", NOW, 100.0),
        domain.Activity("2", "u-b", "refund", NOW, 30.0),
        domain.Activity("3", "u-a", "visit", NOW - timedelta(days=1)),
        domain.Activity("4", "u-b", "purchase", datetime(2024, 1, 1, tzinfo=UTC), 50.0),
    ]
    a, b = domain.fold_activities(acts, date(2025, 4, 1))
    assert (a.user_id, a.visits, a.purchases, a.last_interaction_at) == (
        "u-a",
        1,
        0,
        NOW - timedelta(days=1),
    )
    assert (b.purchases, b.monetary, b.ltv, b.last_purchase_at) == (2, 120.0, 70.0, NOW)
    months = domain.month_amounts(acts)
    assert months[("u-b", date(2026, 3, 1))] == (70.0, 1)


def test_config_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config() == SegmentationConfig()
    monkeypatch.setenv(
        "AFTERGLOW_SEGMENTATION_CONFIG",
        json.dumps({"silence_days": 14, "ltv": {"high_potential_above": 800}}),
    )
    config = load_config()
    assert config.silence_days == 14 and config.ltv.high_potential_above == 800
    assert config.ltv.window_months == 12
    monkeypatch.setenv("AFTERGLOW_SEGMENTATION_CONFIG", json.dumps({"value_layers": {"base": 50}}))
    with pytest.raises(ValidationError, match="add up to 100"):
        load_config()
