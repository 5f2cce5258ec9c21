"""Delivery's own settings: one provider, limits, cost and budget per channel.

Read from `AFTERGLOW_DELIVERY_CONFIG` (a JSON object, see `DeliveryConfig`) and
from the shared settings (`AFTERGLOW_PROVIDER_<CHANNEL>_URL` is the base URL of
a channel unless the JSON names one). Credentials never sit in that JSON: each
channel's token is read from `AFTERGLOW_PROVIDER_<CHANNEL>_TOKEN`.

    AFTERGLOW_DELIVERY_CONFIG='{"channels": {"sms": {"adapter": "twilio",
        "account": "AC123", "sender": "+15005550006", "cost": 0.05,
        "budget_per_promotion": 1000, "rate_per_s": 100}}}'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from shared.events import Channel
from shared.settings import CHANNELS, Settings

CONFIG_ENV = "AFTERGLOW_DELIVERY_CONFIG"
Adapter = Literal["generic", "twilio", "sendgrid", "fcm"]

# Defaults per channel: email should stay at or under 0.5 per person (DOMAIN.md).
DEFAULT_COST: dict[str, float] = {
    "sms": 0.05,
    "email": 0.005,
    "push": 0.001,
    "in_app": 0.0,
    "social": 0.01,
}


class DeliveryConfigError(ValueError):
    """AFTERGLOW_DELIVERY_CONFIG is not valid; the message names the field."""


class ChannelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter: Adapter = "generic"
    base_url: str | None = None
    # Adapter specifics: Twilio account SID / FCM project id; the sender number or address.
    account: str | None = None
    sender: str | None = None
    token: SecretStr | None = Field(default=None, exclude=True)
    timeout_s: float = Field(5.0, gt=0)
    connect_timeout_s: float = Field(2.0, gt=0)
    rate_per_s: float = Field(1000.0, gt=0)
    burst: int = Field(100, ge=1)
    cost: float | None = Field(None, ge=0)
    budget_per_promotion: float | None = Field(None, ge=0)
    reserve_share: float = Field(0.1, ge=0, lt=1)
    max_attempts: int = Field(4, ge=1, le=20)
    backoff_base_s: float = Field(0.05, gt=0)
    backoff_max_s: float = Field(2.0, gt=0)
    retry_after_max_s: float = Field(5.0, ge=0)
    circuit_failures: int = Field(10, ge=1)
    circuit_reset_s: float = Field(10.0, gt=0)
    max_connections: int = Field(128, ge=1)

    def cost_of(self, channel: str) -> float:
        return self.cost if self.cost is not None else DEFAULT_COST.get(channel, 0.0)


class DeliveryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: dict[Channel, ChannelConfig] = Field(default_factory=dict)
    # Provider calls in flight at once in one process, over all channels.
    concurrency: int = Field(512, ge=1)
    # A new touch without consent on any of its channels waits this long for the
    # user.updated that may be racing it, then is decided (0: decide at once).
    consent_wait_s: float = Field(2.0, ge=0, le=30)
    # The process's first-generation GC threshold while delivery runs (0: Python's 700).
    # A batch keeps thousands of calls in flight; with the default, the collector
    # re-scans them every 700 allocations and took ~35% of the CPU per touch.
    gc_threshold: int = Field(100_000, ge=0)
    # Provider answers in hand whose round cannot be written (the database is down or
    # restarting) are kept and written again, with backoff, for this long before the
    # batch fails and is redelivered (which repeats those calls, same Idempotency-Key).
    settle_retry_s: float = Field(300.0, ge=0)
    settle_backoff_s: float = Field(0.2, gt=0)
    settle_backoff_max_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _every_channel(self) -> DeliveryConfig:
        missing = {c: ChannelConfig() for c in CHANNELS if c not in self.channels}
        if missing:
            object.__setattr__(self, "channels", {**self.channels, **missing})
        return self

    def channel(self, name: str) -> ChannelConfig:
        return self.channels[name]  # type: ignore[index]


def load_config(
    settings: Settings, environ: Mapping[str, str] | None = None, raw: str | None = None
) -> DeliveryConfig:
    """The configuration from the environment, with URLs and tokens filled in."""
    env = os.environ if environ is None else environ
    text = raw if raw is not None else env.get(CONFIG_ENV, "")
    try:
        config = DeliveryConfig.model_validate_json(text) if text.strip() else DeliveryConfig()
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise DeliveryConfigError(f"{CONFIG_ENV}: {where}: {err['msg']}") from None
    return resolve(config, settings, env)


def resolve(
    config: DeliveryConfig, settings: Settings, environ: Mapping[str, str] | None = None
) -> DeliveryConfig:
    """Fill each channel's base URL from the settings and its token from the environment."""
    env = os.environ if environ is None else environ
    channels: dict[str, ChannelConfig] = {}
    for name, channel in config.channels.items():
        update: dict[str, object] = {}
        if channel.base_url is None:
            update["base_url"] = settings.provider_url(name)
        token = env.get(f"AFTERGLOW_PROVIDER_{name.upper()}_TOKEN")
        if channel.token is None and token:
            update["token"] = SecretStr(token)
        channels[name] = channel.model_copy(update=update) if update else channel
    return config.model_copy(update={"channels": channels})
