"""One validated settings class, read from the environment (prefix AFTERGLOW_)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.outbox import DEFAULT_VACUUM_ROWS

CHANNELS = ("sms", "email", "push", "in_app", "social")
SERVICES = ("segmentation", "scheduling", "delivery", "metrics")
DEFAULT_PORTS = {"segmentation": 8001, "scheduling": 8002, "delivery": 8003, "metrics": 8004}
DEV_TOKEN = "dev-token"


class Profile(StrEnum):
    DEV = "dev"
    PRODUCTION = "production"


class ClockKind(StrEnum):
    WALL = "wall"
    MANUAL = "manual"


class InsecureSettings(ValueError):
    """A production profile met a setting that is only acceptable in development."""


def parse_tokens(raw: object) -> dict[str, frozenset[str]]:
    """`tok1=scope_a scope_b;tok2=*` or a JSON object {"tok1": ["scope_a"]}."""
    if raw is None or raw == "":
        return {}
    items: Iterable[tuple[object, object]]
    if isinstance(raw, dict):
        items = raw.items()
    elif isinstance(raw, str):
        text = raw.strip()
        if text.startswith("{"):
            import orjson

            loaded = orjson.loads(text)
            if not isinstance(loaded, dict):
                raise ValueError("AFTERGLOW_API_TOKENS: expected a JSON object of token -> scopes")
            items = loaded.items()
        else:
            pairs: list[tuple[str, list[str]]] = []
            for entry in filter(None, (part.strip() for part in text.split(";"))):
                token, sep, scopes = entry.partition("=")
                if not sep or not token.strip():
                    raise ValueError(
                        "AFTERGLOW_API_TOKENS: each entry must be 'token=scope scope'; "
                        f"got an entry without '=' (entry {len(pairs) + 1})"
                    )
                pairs.append((token.strip(), scopes.replace(",", " ").split()))
            items = pairs
    else:
        raise ValueError("AFTERGLOW_API_TOKENS: expected a string or a mapping")
    tokens: dict[str, frozenset[str]] = {}
    for name, granted in items:
        names = granted.split() if isinstance(granted, str) else granted
        if not isinstance(names, list | tuple | set | frozenset):
            raise ValueError(
                f"AFTERGLOW_API_TOKENS: scopes of a token must be a list, got {names!r}"
            )
        tokens[str(name)] = frozenset(str(s) for s in names)
    return tokens


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AFTERGLOW_", extra="ignore")

    profile: Profile = Profile.DEV
    database_url: str = "sqlite+aiosqlite:///./afterglow.db"
    db_pool_size: int = Field(10, ge=1)
    kafka_bootstrap_servers: str | None = None
    kafka_partitions: int = Field(4, ge=1)
    kafka_linger_ms: int = Field(5, ge=0)
    kafka_send_timeout_s: float = Field(10.0, gt=0)
    topic_prefix: str = ""
    api_tokens: Annotated[dict[str, frozenset[str]], NoDecode] = Field(default_factory=dict)
    clock: ClockKind = ClockKind.WALL
    receipt_secret: SecretStr | None = None
    provider_sms_url: str | None = None
    provider_email_url: str | None = None
    provider_push_url: str | None = None
    provider_in_app_url: str | None = None
    provider_social_url: str | None = None
    log_level: str = "INFO"
    log_format: Literal["json", "console"] = "json"
    consumer_max_attempts: int = Field(5, ge=1)
    outbox_lanes: int = Field(8, ge=1, le=1024)
    outbox_batch: int = Field(500, ge=1)
    outbox_poll_s: float = Field(0.5, gt=0)
    outbox_vacuum_rows: int = Field(DEFAULT_VACUUM_ROWS, ge=0)
    auto_migrate: bool = True

    @field_validator(
        "kafka_bootstrap_servers",
        "receipt_secret",
        "provider_sms_url",
        "provider_email_url",
        "provider_push_url",
        "provider_in_app_url",
        "provider_social_url",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose files and ConfigMaps pass "" for "not configured".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="before")
    @classmethod
    def _parse_tokens(cls, values: object) -> object:
        if isinstance(values, dict) and "api_tokens" in values:
            values["api_tokens"] = parse_tokens(values["api_tokens"])
        return values

    @model_validator(mode="after")
    def _refuse_insecure_production(self) -> Settings:
        if self.profile is not Profile.PRODUCTION:
            return self
        problems = []
        if not self.api_tokens:
            problems.append("AFTERGLOW_API_TOKENS is required in production")
        if DEV_TOKEN in self.api_tokens:
            problems.append(
                f"AFTERGLOW_API_TOKENS must not contain the development token {DEV_TOKEN!r}"
            )
        if self.clock is ClockKind.MANUAL:
            problems.append("AFTERGLOW_CLOCK=manual is refused in production")
        if not self.kafka_bootstrap_servers:
            problems.append("AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS is required in production")
        if self.database_url.startswith("sqlite"):
            problems.append("AFTERGLOW_DATABASE_URL must be PostgreSQL in production")
        if self.receipt_secret is None:
            problems.append("AFTERGLOW_RECEIPT_SECRET is required in production")
        if problems:
            raise InsecureSettings("; ".join(problems))
        return self

    def effective_tokens(self) -> dict[str, frozenset[str]]:
        """Development falls back to one well-known token with every scope; production never."""
        if self.api_tokens or self.profile is Profile.PRODUCTION:
            return self.api_tokens
        return {DEV_TOKEN: frozenset({"*"})}

    def provider_url(self, channel: str) -> str | None:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        value: str | None = getattr(self, f"provider_{channel}_url")
        return value

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"
