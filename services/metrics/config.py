"""Metrics' own settings (prefix AFTERGLOW_METRICS_), beside the shared ones."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERGLOW_METRICS_", extra="ignore")

    # A purchase is credited to the user's last exposure (touch sent, or holdout) this recent.
    attribution_window_days: float = Field(7.0, gt=0)

    @property
    def attribution_window(self) -> timedelta:
        return timedelta(days=self.attribution_window_days)
