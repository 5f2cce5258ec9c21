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
    # reach 0.8, click min(0.25/0.1, 1) = 1, conversion min(0.125/0.05, 1) = 1, aov 30/60 = 0.5
    assert row["health_index"] == pytest.approx(100 * (0.25 * 0.8 + 0.25 + 0.3 + 0.2 * 0.5))


def test_health_index_uses_only_defined_parts() -> None:
    assert domain.health_index(None, None, None, None) is None
    assert domain.health_index(0.5, None, None, None) == 50.0
    assert domain.health_index(1.0, 0.2, 0.1, 2.0) == 100.0
