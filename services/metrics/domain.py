"""Funnel arithmetic: pure functions over summed measures."""

from __future__ import annotations

import math
from collections.abc import Mapping

COUNTS = (
    "planned",
    "suppressed",
    "sent",
    "sends",
    "failed",
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "complained",
    "unsubscribed",
    "converted",
    "orders",
    "holdout",
    "holdout_converted",
    "holdout_orders",
    "ltv_touches",
)
MONEY = ("revenue", "cost", "holdout_revenue", "ltv")
GROUPS = ("wave", "channel", "segment", "variant")

# Health index targets: a click rate of 10%, a conversion rate of 5% and participants whose
# mean LTV is that of DOMAIN.md's "high potential" tier (over 500) score full marks.
HEALTH_CLICK_TARGET = 0.10
HEALTH_CONVERSION_TARGET = 0.05
HEALTH_LTV_TARGET = 500.0
HEALTH_WEIGHTS = {"reach": 0.2, "click": 0.2, "conversion": 0.3, "aov": 0.15, "ltv": 0.15}


def rate(numerator: float, denominator: float) -> float | None:
    """A fraction, or None where the denominator is zero."""
    return numerator / denominator if denominator else None


def _cap(value: float | None, target: float) -> float | None:
    return None if value is None else min(value / target, 1.0)


def health_index(
    reach: float | None,
    click: float | None,
    conversion: float | None,
    aov_ratio: float | None,
    ltv: float | None = None,
) -> float | None:
    """0..100: the weighted mean of the components that are defined (None if none is).

    reach_rate, click_rate / 10% and conversion_rate / 5% (each capped at 1), the group's
    AOV over the whole promotion's AOV (capped at 1), and the mean LTV of the group's
    participants (per planned touch) over 500 (capped at 1).
    """
    parts = {
        "reach": None if reach is None else min(reach, 1.0),
        "click": _cap(click, HEALTH_CLICK_TARGET),
        "conversion": _cap(conversion, HEALTH_CONVERSION_TARGET),
        "aov": None if aov_ratio is None else min(aov_ratio, 1.0),
        "ltv": _cap(ltv, HEALTH_LTV_TARGET),
    }
    weight = sum(HEALTH_WEIGHTS[k] for k, v in parts.items() if v is not None)
    if not weight:
        return None
    score = sum(HEALTH_WEIGHTS[k] * v for k, v in parts.items() if v is not None)
    return round(100 * score / weight, 2)


def totals(measures: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Raw measures (with `suppressed.<reason>`) to a row's sums and suppressions by reason."""
    out: dict[str, float] = dict.fromkeys((*COUNTS, *MONEY), 0.0)
    reasons: dict[str, float] = {}
    for name, value in measures.items():
        if name.startswith("suppressed."):
            reason = name.removeprefix("suppressed.")
            reasons[reason] = reasons.get(reason, 0.0) + value
        elif name in out:
            out[name] += value
    out["suppressed"] = sum(reasons.values())
    out["holdout"] = reasons.get("holdout", 0.0)
    return out, reasons


def funnel_row(
    measures: Mapping[str, float], promotion_aov: float | None = None
) -> dict[str, object]:
    t, reasons = totals(measures)
    row: dict[str, object] = {name: round(t[name]) for name in COUNTS}
    row["suppressed_by_reason"] = {k: round(v) for k, v in sorted(reasons.items()) if v}
    for name in MONEY:
        row[name] = round(t[name], 6)
    sent, planned = t["sent"], t["planned"]
    reach = row["reach_rate"] = rate(sent, planned)
    row["open_rate"] = rate(t["opened"], sent)
    click = row["click_rate"] = rate(t["clicked"], sent)
    conversion = row["conversion_rate"] = rate(t["converted"], sent)
    aov = rate(t["revenue"], t["orders"])
    row["aov"] = aov
    row["revenue_per_touch"] = rate(t["revenue"], sent)
    row["cost_per_conversion"] = rate(t["cost"], t["converted"])
    row["roi"] = rate(t["revenue"] - t["cost"], t["cost"])
    row["holdout_conversion_rate"] = rate(t["holdout_converted"], t["holdout"])
    # Mean LTV (segmentation's, at the promotion's end) of the participants planned here.
    ltv = row["ltv"] = rate(t["ltv"], t["ltv_touches"])
    aov_ratio = None if aov is None or not promotion_aov else aov / promotion_aov
    row["health_index"] = health_index(reach, click, conversion, aov_ratio, ltv)
    return row


# -- experiments ----------------------------------------------------------------

Z_95 = 1.959963984540054  # two-sided alpha 0.05
Z_POWER_80 = 0.8416212335729143  # one-sided 80% power


def diff_ci(
    x1: int, n1: int, x0: int, n0: int, z: float = Z_95
) -> tuple[float, float, float] | None:
    """Difference of proportions x1/n1 - x0/n0 with its Wald interval (normal approximation).

    se = sqrt(p1(1-p1)/n1 + p0(1-p0)/n0), interval = d -/+ z*se. None if a group is empty.
    """
    if not n1 or not n0:
        return None
    p1, p0 = x1 / n1, x0 / n0
    d = p1 - p0
    se = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
    return d, d - z * se, d + z * se


def sample_per_group(
    p1: float, p0: float, z_alpha: float = Z_95, z_beta: float = Z_POWER_80
) -> int | None:
    """Participants needed in each group to detect p1 vs p0 (alpha 0.05 two-sided, 80% power).

    n = (z_a*sqrt(2*pb*(1-pb)) + z_b*sqrt(p1(1-p1) + p0(1-p0)))^2 / (p1-p0)^2, pb = (p1+p0)/2,
    rounded up; None when the effect is 0.
    """
    effect = p1 - p0
    if effect == 0:
        return None
    pb = (p1 + p0) / 2
    root = z_alpha * math.sqrt(2 * pb * (1 - pb)) + z_beta * math.sqrt(
        p1 * (1 - p1) + p0 * (1 - p0)
    )
    return math.ceil(round(root * root / (effect * effect), 9))


def comparison(x1: int, n1: int, x0: int, n0: int) -> dict[str, object]:
    """Group 1 against group 0: uplift with its 95% interval and the sample still needed."""
    ci = diff_ci(x1, n1, x0, n0)
    out: dict[str, object] = {
        "uplift": None,
        "ci_low": None,
        "ci_high": None,
        "significant": None,
        "sample_needed_per_group": None,
        "still_needed": None,
        "still_needed_baseline": None,
    }
    if ci is None:
        return out
    d, low, high = ci
    needed = sample_per_group(x1 / n1, x0 / n0)
    out.update(
        uplift=d,
        ci_low=low,
        ci_high=high,
        significant=low > 0 or high < 0,
        sample_needed_per_group=needed,
        still_needed=None if needed is None else max(0, needed - n1),
        still_needed_baseline=None if needed is None else max(0, needed - n0),
    )
    return out


def group_row(name: str, exposed: int, converted: int) -> dict[str, object]:
    return {
        "name": name,
        "exposed": exposed,
        "converted": converted,
        "conversion_rate": rate(converted, exposed),
    }
