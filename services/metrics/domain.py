"""Funnel arithmetic: pure functions over summed measures."""

from __future__ import annotations

from collections.abc import Mapping

COUNTS = (
    "planned",
    "suppressed",
    "sent",
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
)
MONEY = ("revenue", "cost", "holdout_revenue")
GROUPS = ("wave", "channel", "segment", "variant")

# Health index targets: a click rate of 10% and a conversion rate of 5% score full marks.
HEALTH_CLICK_TARGET = 0.10
HEALTH_CONVERSION_TARGET = 0.05
HEALTH_WEIGHTS = {"reach": 0.25, "click": 0.25, "conversion": 0.3, "aov": 0.2}


def rate(numerator: float, denominator: float) -> float | None:
    """A fraction, or None where the denominator is zero."""
    return numerator / denominator if denominator else None


def _cap(value: float | None, target: float) -> float | None:
    return None if value is None else min(value / target, 1.0)


def health_index(
    reach: float | None, click: float | None, conversion: float | None, aov_ratio: float | None
) -> float | None:
    """0..100: the weighted mean of the components that are defined (None if none is).

    reach_rate, click_rate / 10% and conversion_rate / 5% (each capped at 1), and the
    group's AOV over the whole promotion's AOV (capped at 1).
    """
    parts = {
        "reach": None if reach is None else min(reach, 1.0),
        "click": _cap(click, HEALTH_CLICK_TARGET),
        "conversion": _cap(conversion, HEALTH_CONVERSION_TARGET),
        "aov": None if aov_ratio is None else min(aov_ratio, 1.0),
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
    aov_ratio = None if aov is None or not promotion_aov else aov / promotion_aov
    row["health_index"] = health_index(reach, click, conversion, aov_ratio)
    return row
