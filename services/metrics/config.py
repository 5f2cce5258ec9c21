"""Metrics' own settings (prefix AFTERGLOW_METRICS_), beside the shared ones."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERGLOW_METRICS_", extra="ignore")

    # A purchase is credited to the user's last exposure (touch sent, or holdout) this recent.
    attribution_window_days: float = Field(7.0, gt=0)

    # Business alerts (see services/metrics/alerts.py and the README): a day's value more
    # than `alert_threshold` (a fraction) away from the mean of the same series' values on
    # the `alert_trailing_days` days before it, when at least `alert_min_history_days` of
    # them have a value; a day has a value when its denominator reaches `alert_min_sample`.
    alert_threshold: float = Field(0.15, gt=0)
    alert_trailing_days: int = Field(7, ge=1, le=60)
    alert_min_history_days: int = Field(3, ge=1, le=60)
    alert_min_sample: int = Field(30, ge=1)
    # Days evaluated back from the last complete one (late events can still change them).
    alert_lookback_days: int = Field(14, ge=1, le=90)
    # How often alerts are evaluated (service clock; a manual clock's move wakes it at once).
    alert_interval_s: float = Field(60.0, gt=0)

    # Counted event ids are kept this long (by the events' own time), so that a redelivered
    # or replayed event counts once; an event older than that is not counted at all (its id
    # may be gone), and shows in afterglow_metrics_stale_events_total. Keep it above the
    # retention of the topics metrics consumes (Kafka's default: 7 days).
    seen_retention_days: float = Field(30.0, gt=0)
    # How often the ids older than that are deleted (service clock).
    seen_prune_interval_s: float = Field(3600.0, gt=0)

    # Transactions counting at once per process on PostgreSQL, each for its own share of the
    # users (one connection each): while one lane's statements run in the database, another
    # lane counts in Python. SQLite always counts in one lane.
    counting_lanes: int = Field(2, ge=1, le=8)

    @property
    def attribution_window(self) -> timedelta:
        return timedelta(days=self.attribution_window_days)

    @property
    def seen_retention(self) -> timedelta:
        return timedelta(days=self.seen_retention_days)
