"""Funnel arithmetic: rates, money figures and the health index."""

from __future__ import annotations

import pytest

from services.metrics import domain


def test_rates_are_null_without_a_denominator() -> None:
    row = domain.funnel_row({})
    for name in (
        "reach_rate",
        "open_rate",
        "click_rate",
        "conversion_rate",
        "aov",
        "revenue_per_touch",
        "cost_per_conversion",
        "roi",
        "health_index",
    ):
        assert row[name] is None, name
    assert row["planned"] == 0
    assert row["suppressed_by_reason"] == {}


def test_row_figures() -> None:
    row = domain.funnel_row(
        {
            "planned": 10,
            "sent": 8,
            "opened": 4,
            "clicked": 2,
            "converted": 1,
            "orders": 2,
            "revenue": 60.0,
            "cost": 0.4,
            "suppressed.cap_7d": 1,
            "suppressed.holdout": 1,
            "holdout_converted": 1,
        },
        promotion_aov=60.0,
    )
    assert row["suppressed"] == 2
    assert row["holdout"] == 1
    assert row["suppressed_by_reason"] == {"cap_7d": 1, "holdout": 1}
    assert row["reach_rate"] == 0.8
    assert row["open_rate"] == 0.5
    assert row["click_rate"] == 0.25
    assert row["conversion_rate"] == 0.125
    assert row["aov"] == 30.0
    assert row["revenue_per_touch"] == 7.5
    assert row["cost_per_conversion"] == pytest.approx(0.4)
    assert row["roi"] == pytest.approx((60 - 0.4) / 0.4)
    assert row["holdout_conversion_rate"] == 1.0
    # reach 0.8, click min(0.25/0.1, 1) = 1, conversion min(0.125/0.05, 1) = 1, aov 30/60 = 0.5;
    # no LTV known: the other weights are scaled up to 1.
    expected = (0.2 * 0.8 + 0.2 + 0.3 + 0.15 * 0.5) / 0.85
    assert row["ltv"] is None
    assert row["health_index"] == pytest.approx(100 * expected, abs=0.005)


def test_health_index_counts_the_participants_ltv() -> None:
    row = domain.funnel_row(
        {"planned": 10, "sent": 10, "clicked": 1, "converted": 1, "ltv": 2500.0, "ltv_touches": 10}
    )
    assert row["ltv"] == 250.0
    # reach 1, click 1, conversion 1, no AOV, ltv 250/500 = 0.5
    expected = (0.2 + 0.2 + 0.3 + 0.15 * 0.5) / 0.85
    assert row["health_index"] == pytest.approx(100 * expected, abs=0.005)
    assert domain.health_index(None, None, None, None, 900.0) == 100.0


def test_health_index_uses_only_defined_parts() -> None:
    assert domain.health_index(None, None, None, None) is None
    assert domain.health_index(0.5, None, None, None) == 50.0
    assert domain.health_index(1.0, 0.2, 0.1, 2.0) == 100.0


def test_parallel_sends_are_shown_beside_sent() -> None:
    row = domain.funnel_row({"planned": 2, "sent": 2, "sends": 3})
    assert (row["sent"], row["sends"], row["reach_rate"]) == (2, 3, 1.0)


def test_wald_interval_by_hand() -> None:
    # 2/5 against 1/4: d = 0.15, se = sqrt(0.4*0.6/5 + 0.25*0.75/4) = sqrt(0.094875)
    ci = domain.diff_ci(2, 5, 1, 4)
    assert ci is not None
    se = 0.094875**0.5
    assert ci == pytest.approx((0.15, 0.15 - 1.959964 * se, 0.15 + 1.959964 * se), abs=1e-6)
    assert ci[1] == pytest.approx(-0.453704, abs=1e-6)
    assert ci[2] == pytest.approx(0.753704, abs=1e-6)
    # p = 0 and p = 1 have no variance: the interval collapses to the difference.
    assert domain.diff_ci(0, 10, 10, 10) == pytest.approx((-1.0, -1.0, -1.0))
    assert domain.diff_ci(1, 0, 1, 4) is None
    assert domain.diff_ci(1, 4, 0, 0) is None


def test_sample_size_by_hand() -> None:
    # The textbook case: 10% against 5%, alpha 0.05 two-sided, 80% power -> 435 per group
    # ((1.96*sqrt(2*0.075*0.925) + 0.8416*sqrt(0.09 + 0.0475))^2 / 0.05^2 = 434.43).
    assert domain.sample_per_group(0.10, 0.05) == 435
    assert domain.sample_per_group(0.05, 0.10) == 435
    # 0.4 against 0.25: (1.959964*sqrt(0.43875) + 0.841621*sqrt(0.4275))^2 / 0.0225 = 151.87
    assert domain.sample_per_group(0.4, 0.25) == 152
    assert domain.sample_per_group(0.3, 0.3) is None


def test_comparison() -> None:
    c = domain.comparison(2, 5, 1, 4)
    assert c["uplift"] == pytest.approx(0.15)
    assert c["significant"] is False
    assert (c["sample_needed_per_group"], c["still_needed"], c["still_needed_baseline"]) == (
        152,
        147,
        148,
    )
    flat = domain.comparison(1, 4, 1, 4)
    assert flat["uplift"] == 0 and flat["sample_needed_per_group"] is None
    assert flat["still_needed"] is None
    empty = domain.comparison(1, 4, 0, 0)
    assert empty["uplift"] is None and empty["ci_low"] is None
    strong = domain.comparison(90, 100, 10, 100)
    assert strong["significant"] is True and strong["still_needed"] == 0
    assert domain.group_row("holdout", 4, 1) == {
        "name": "holdout",
        "exposed": 4,
        "converted": 1,
        "conversion_rate": 0.25,
    }
