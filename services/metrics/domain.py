"""Funnel arithmetic: pure functions over counts."""

from __future__ import annotations

MEASURES = ("planned", "suppressed", "sent", "delivered", "opened", "clicked", "converted")


def rate(numerator: int, denominator: int) -> float | None:
    """A fraction, or None where the denominator is zero."""
    return numerator / denominator if denominator else None


def funnel_row(counts: dict[str, int]) -> dict[str, int | float | None]:
    row: dict[str, int | float | None] = {m: counts.get(m, 0) for m in MEASURES}
    sent = counts.get("sent", 0)
    row["reach_rate"] = rate(sent, counts.get("planned", 0))
    row["open_rate"] = rate(counts.get("opened", 0), sent)
    row["click_rate"] = rate(counts.get("clicked", 0), sent)
    row["conversion_rate"] = rate(counts.get("converted", 0), sent)
    return row
