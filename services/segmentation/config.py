"""Segmentation's business settings, with DOMAIN.md's figures as defaults.

Loaded from `AFTERGLOW_SEGMENTATION_CONFIG` (a JSON object); keys it leaves out
keep their defaults, a key it gives replaces the default as a whole (a list of
rules is replaced, not merged).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.events import Channel

ALL_CHANNELS: tuple[Channel, ...] = ("sms", "email", "push", "in_app", "social")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ScoreRange(_Frozen):
    low: int = Field(1, ge=1, le=5)
    high: int = Field(5, ge=1, le=5)

    def holds(self, score: int) -> bool:
        return self.low <= score <= self.high


class RfmTierRule(_Frozen):
    """A tier takes the users whose r, f and m all fall in its ranges (first rule wins)."""

    name: str = Field(min_length=1, max_length=64)
    r: ScoreRange = ScoreRange()
    f: ScoreRange = ScoreRange()
    m: ScoreRange = ScoreRange()


class LtvConfig(_Frozen):
    """LTV is the net spend over the last `window_months` calendar months (this one included)."""

    window_months: int = Field(12, ge=1, le=120)
    high_potential_above: float = 500.0
    potential_churn_from: float = 200.0


class AgeBand(_Frozen):
    name: str = Field(min_length=1, max_length=16)
    min_age: int = Field(ge=0)
    max_age: int | None = None
    channel_order: list[Channel]


TagMetric = Literal["purchases", "spend", "visits", "ltv", "r", "f", "m"]


class TagRule(_Frozen):
    """`metric op value`, e.g. purchases within 30 days > 5; windowed metrics need `within_days`."""

    name: str = Field(min_length=1, max_length=64)
    metric: TagMetric
    op: Literal[">", ">=", "<", "<=", "=="] = ">"
    value: float
    within_days: int | None = Field(None, ge=1, le=3650)

    @model_validator(mode="after")
    def _window_only_for_activity_counts(self) -> TagRule:
        if self.within_days is not None and self.metric not in ("purchases", "spend", "visits"):
            raise ValueError(f"tag {self.name!r}: within_days applies to purchases, spend, visits")
        return self


class ValueLayers(_Frozen):
    """Shares of users by value, lowest first; they must add up to 100."""

    base: int = Field(60, ge=0, le=100)
    core: int = Field(25, ge=0, le=100)
    head: int = Field(15, ge=0, le=100)

    @model_validator(mode="after")
    def _hundred(self) -> ValueLayers:
        if self.base + self.core + self.head != 100:
            raise ValueError("value layer shares must add up to 100")
        return self


class AbuseRule(_Frozen):
    same_item_purchases: int = Field(10, ge=2)
    within_hours: float = Field(3.0, gt=0)


def _default_rfm_tiers() -> list[RfmTierRule]:
    return [
        RfmTierRule(
            name="high_value_regular", r=ScoreRange(low=3), f=ScoreRange(low=4), m=ScoreRange(low=4)
        ),
        RfmTierRule(name="new", r=ScoreRange(low=4), f=ScoreRange(high=2)),
        RfmTierRule(name="at_risk", r=ScoreRange(high=2), f=ScoreRange(low=3)),
        RfmTierRule(name="silent", r=ScoreRange(high=2), f=ScoreRange(high=2)),
    ]


def _default_age_bands() -> list[AgeBand]:
    return [
        AgeBand(
            name="18-24",
            min_age=18,
            max_age=24,
            channel_order=["social", "push", "in_app", "sms", "email"],
        ),
        AgeBand(
            name="25-34",
            min_age=25,
            max_age=34,
            channel_order=["push", "in_app", "email", "sms", "social"],
        ),
        AgeBand(
            name="35+", min_age=35, max_age=None, channel_order=["sms", "email", "push", "in_app"]
        ),
    ]


def _default_tags() -> list[TagRule]:
    return [TagRule(name="social_layer", metric="purchases", op=">", value=5, within_days=30)]


_UNKNOWN_AGE_ORDER: tuple[Channel, ...] = ("push", "sms", "email", "in_app", "social")


class SegmentationConfig(_Frozen):
    rfm_tiers: list[RfmTierRule] = Field(default_factory=_default_rfm_tiers, min_length=1)
    rfm_default_tier: str = Field("potential_churn", min_length=1, max_length=64)
    ltv: LtvConfig = LtvConfig()
    age_bands: list[AgeBand] = Field(default_factory=_default_age_bands)
    unknown_age_channel_order: list[Channel] = Field(
        default_factory=lambda: list(_UNKNOWN_AGE_ORDER)
    )
    value_layers: ValueLayers = ValueLayers()
    tags: list[TagRule] = Field(default_factory=_default_tags)
    silence_days: int = Field(30, ge=1)
    abuse: AbuseRule = AbuseRule()
    # An open counts once, a click this many times, when history reorders channels.
    click_weight: int = Field(2, ge=1)
    rescore_interval_s: float = Field(900.0, gt=0)
    # Rows read, encoded and published per round (memory is bounded by one chunk: ~10 MB at
    # 10,000); a crash re-emits at most the chunk in flight. 1,000 left emission waiting on
    # round trips (about 50,000 events/s at 1,000, 59,000 at 10,000 on this machine).
    audience_chunk: int = Field(10_000, ge=1, le=10_000)

    def tier_names(self) -> list[str]:
        return list(dict.fromkeys([*(rule.name for rule in self.rfm_tiers), self.rfm_default_tier]))


class SegmentationSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERGLOW_SEGMENTATION_", extra="ignore")
    config: SegmentationConfig = Field(default_factory=SegmentationConfig)


def load_config() -> SegmentationConfig:
    """The configuration from `AFTERGLOW_SEGMENTATION_CONFIG`, or the defaults."""
    return SegmentationSettings().config
