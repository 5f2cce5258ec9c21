"""docker-compose.yml: the structure people rely on (no Docker engine runs in CI)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from shared.settings import DEFAULT_PORTS, SERVICES, Settings

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_every_service_runs_on_its_port_after_the_migrations() -> None:
    services = compose()["services"]
    for name in SERVICES:
        service = services[name]
        port = DEFAULT_PORTS[name]
        assert service["command"][:2] == ["serve", name]
        assert service["command"][-1] == str(port)
        assert service["ports"] == [f"{port}:{port}"]
        assert f":{port}/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["migrate"]["command"] == ["migrate", "all"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_environment_names_are_settings_and_secrets_come_from_outside() -> None:
    fields = {f"AFTERGLOW_{name.upper()}" for name in Settings.model_fields}
    for name in SERVICES:
        environment = compose()["services"][name]["environment"]
        assert set(environment) <= fields, set(environment) - fields
        assert environment["AFTERGLOW_PROFILE"] == "production"
        for secret in ("AFTERGLOW_API_TOKENS", "AFTERGLOW_RECEIPT_SECRET"):
            assert re.fullmatch(r"\$\{[A-Z_]+:\?.+\}", environment[secret]), secret


def test_kafka_runs_in_kraft_mode_without_auto_created_topics() -> None:
    kafka = compose()["services"]["kafka"]["environment"]
    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
