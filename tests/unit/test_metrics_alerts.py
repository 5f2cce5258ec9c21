"""Business alerts by hand: deviations from the trailing mean and the traffic light."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from services.metrics.alerts import Rules, deviations, traffic_light

D1 = date(2026, 3, 1)
RULES = Rules(threshold=0.15, trailing_days=7, min_history_days=3, min_sample=30)


def day(k: int) -> date:
    return D1 + timedelta(days=k - 1)


def conversions(*rates: float | None, sent: float = 100) -> dict[date, dict[str, float]]:
    """Day k+1 converts rates[k] of `sent` (None: nothing sent that day)."""
    return {
        day(k + 1): {"sent": sent, "converted": rate * sent}
        for k, rate in enumerate(rates)
        if rate is not None
    }


def test_a_day_more_than_15_percent_under_its_trailing_mean_is_a_warning() -> None:
    series = {("p-1", "launch", "email"): conversions(0.10, 0.10, 0.10, 0.10, 0.08, 0.11)}
    found = deviations(series, [day(k) for k in range(1, 7)], RULES)
    assert len(found) == 1
    (f,) = found
    assert (f.metric, f.day, f.wave, f.channel) == ("conversion_rate", day(5), "launch", "email")
    assert f.value == pytest.approx(0.08)
    assert f.baseline == pytest.approx(0.10)
    assert f.change == pytest.approx(-0.2)
    assert f.severity == "warning"
    # Day 6: 11% against the mean of days 1..5 (9.6%) is +14.6%: within 15%.


def test_no_alert_without_enough_history_or_sample() -> None:
    # Two days of history only (min 3), then a small day (10 sent < 30) that has no value.
    series = {
        ("p-1", "day3", "sms"): {
            **conversions(0.10, 0.10, 0.02),
            day(4): {"sent": 10, "converted": 0},
        }
    }
    assert deviations(series, [day(k) for k in range(1, 5)], RULES) == []


def test_complaints_up_warn_and_down_inform_and_aov_is_revenue_per_order() -> None:
    base = {"sent": 100.0, "orders": 40.0}  # AOV needs 30 orders a day too
    daily = {
        day(k): {**base, "complained": 2.0, "revenue": 2000.0, "unsubscribed": 1.0}
        for k in (1, 2, 3)
    }
    daily[day(4)] = {**base, "complained": 3.0, "revenue": 1600.0, "unsubscribed": 0.5}
    found = {f.metric: f for f in deviations({("p", "launch", "push"): daily}, [day(4)], RULES)}
    assert set(found) == {"complaint_rate", "aov", "unsubscribe_rate"}
    assert found["complaint_rate"].severity == "warning"
    assert found["complaint_rate"].change == pytest.approx(0.5)
    assert found["aov"].value == pytest.approx(40.0)
    assert found["aov"].baseline == pytest.approx(50.0)
    assert found["aov"].severity == "warning"
    assert found["unsubscribe_rate"].severity == "info"


def test_traffic_light_counts_days_in_a_row_under_the_baseline() -> None:
    # Baseline: trailing mean of the promotion's daily conversion (3 days of history needed).
    history = [0.10, 0.10, 0.10]
    assert traffic_light(conversions(*history), day(3), RULES).light == "green"
    one = traffic_light(conversions(*history, 0.09), day(4), RULES)
    assert (one.light, one.streak, one.day) == ("yellow", 1, day(4))
    assert one.conversion == pytest.approx(0.09)
    assert one.baseline == pytest.approx(0.10)
    two = traffic_light(conversions(*history, 0.09, 0.08), day(5), RULES)
    assert (two.light, two.streak) == ("yellow", 2)
    assert two.baseline == pytest.approx(0.0975)
    three = conversions(*history, 0.09, 0.08, 0.07)
    assert traffic_light(three, day(6), RULES).light == "red"
    # A day without sends neither extends nor breaks the streak.
    quiet = conversions(*history, 0.09, 0.08, 0.07, None)
    assert traffic_light(quiet, day(7), RULES).streak == 3
    # Back above the baseline: green again.
    back = conversions(*history, 0.09, 0.08, 0.07, None, 0.12)
    assert (
        traffic_light(back, day(8), RULES).light,
        traffic_light(back, day(8), RULES).streak,
    ) == (
        "green",
        0,
    )
    # Only days up to the evaluated one count.
    assert traffic_light(back, day(6), RULES).light == "red"
