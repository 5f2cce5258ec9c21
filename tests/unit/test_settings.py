"""Settings: the documented environment, and a production profile refusing insecure values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import DEV_TOKEN, ClockKind, Settings

PRODUCTION = {
    "AFTERGLOW_PROFILE": "production",
    "AFTERGLOW_API_TOKENS": "s3cret=segmentation:read admin",
    "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
    "AFTERGLOW_DATABASE_URL": "postgresql+asyncpg://afterglow@db/afterglow",
    "AFTERGLOW_RECEIPT_SECRET": "receipt-key",
}


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_reads_the_documented_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(
        monkeypatch,
        {
            "AFTERGLOW_TOPIC_PREFIX": "staging.",
            "AFTERGLOW_CLOCK": "manual",
            "AFTERGLOW_PROVIDER_SMS_URL": "http://127.0.0.1:9000",
            "AFTERGLOW_API_TOKENS": '{"t1": ["metrics:read"], "t2": ["*"]}',
        },
    )
    settings = Settings()
    assert settings.topic("touches") == "staging.touches"
    assert settings.clock is ClockKind.MANUAL
    assert settings.provider_url("sms") == "http://127.0.0.1:9000"
    assert settings.api_tokens == {"t1": frozenset({"metrics:read"}), "t2": frozenset({"*"})}


def test_token_list_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, {"AFTERGLOW_API_TOKENS": "a=segmentation:read, admin; b=*"})
    assert Settings().api_tokens == {
        "a": frozenset({"segmentation:read", "admin"}),
        "b": frozenset({"*"}),
    }


def test_malformed_tokens_are_refused_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_env(monkeypatch, {"AFTERGLOW_API_TOKENS": "no-equals-sign"})
    with pytest.raises(ValidationError, match="AFTERGLOW_API_TOKENS"):
        Settings()


def test_dev_without_tokens_gets_the_development_token() -> None:
    assert Settings().effective_tokens() == {DEV_TOKEN: frozenset({"*"})}


def test_production_starts_with_everything_set(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, PRODUCTION)
    assert Settings().effective_tokens() == {"s3cret": frozenset({"segmentation:read", "admin"})}


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"AFTERGLOW_API_TOKENS": ""}, "AFTERGLOW_API_TOKENS is required"),
        ({"AFTERGLOW_API_TOKENS": f"{DEV_TOKEN}=*"}, "development token"),
        ({"AFTERGLOW_CLOCK": "manual"}, "AFTERGLOW_CLOCK=manual"),
        ({"AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS": ""}, "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS"),
        ({"AFTERGLOW_DATABASE_URL": "sqlite+aiosqlite:///x.db"}, "must be PostgreSQL"),
        ({"AFTERGLOW_RECEIPT_SECRET": ""}, "AFTERGLOW_RECEIPT_SECRET"),
    ],
)
def test_production_refuses_insecure_settings(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, str], complaint: str
) -> None:
    use_env(monkeypatch, {**PRODUCTION, **change})
    for name, value in change.items():
        if value == "":
            monkeypatch.delenv(name)
    with pytest.raises(ValidationError, match=complaint):
        Settings()


def test_blank_values_mean_not_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(
        monkeypatch,
        {"AFTERGLOW_PROVIDER_SMS_URL": "", "AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS": "  "},
    )
    settings = Settings()
    assert settings.provider_url("sms") is None
    assert settings.kafka_bootstrap_servers is None
