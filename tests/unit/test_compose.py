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


# -- Prometheus and Grafana ---------------------------------------------------------

DEPLOY = COMPOSE.parent / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PROMETHEUS_DS = "prometheus"
API_DS = "yesoreyeram-infinity-datasource"
# PromQL words that look like series names but are functions, keywords or labels.
PROMQL_WORDS = {"up"}


def exported_series() -> set[str]:
    """Every series name the four services export (shared metrics and each service's own)."""
    from prometheus_client import CollectorRegistry

    from services.delivery.runtime import DeliveryMetrics
    from shared.observability import ServiceMetrics

    registry = ServiceMetrics("delivery").registry
    DeliveryMetrics(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    names: set[str] = set()
    for family in registry.collect():
        names |= {family.name + s for s in suffixes[family.type]}
    assert isinstance(registry, CollectorRegistry)
    return names


def test_prometheus_scrapes_every_service_with_the_labels_the_rules_expect() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["afterglow.rules.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "afterglow"
    targets = {static["labels"]["service"]: static["targets"] for static in job["static_configs"]}
    assert targets == {name: [f"{name}:{DEFAULT_PORTS[name]}"] for name in SERVICES}
    prometheus = compose()["services"]["prometheus"]
    mounts = {volume.split(":")[1] for volume in prometheus["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/afterglow.rules.yml"} <= mounts


def test_promtool_accepts_the_prometheus_config() -> None:
    import os
    import shutil
    import subprocess

    import pytest

    binary = shutil.which("promtool")
    if binary is None:
        reason = "promtool is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    done = subprocess.run(
        [binary, "check", "config", PROMETHEUS_CONFIG.name],
        cwd=PROMETHEUS_CONFIG.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: prometheus.yml is valid" in done.stdout + done.stderr


def test_grafana_is_provisioned_with_both_datasources_and_the_dashboards() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in grafana["volumes"]}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = mounts["./deploy/grafana/dashboards"]
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/afterglow.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/afterglow.yml").read_text())
    kinds = {ds["uid"]: ds["type"] for ds in sources["datasources"]}
    assert kinds == {"afterglow-prometheus": PROMETHEUS_DS, "afterglow-api": API_DS}
    assert API_DS in grafana["environment"]["GF_INSTALL_PLUGINS"]
    assert re.fullmatch(r"\$\{[A-Z_]+:\?.+\}", grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    assert {p.stem for p in DASHBOARDS} == {"operations", "campaign"}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return [p for p in panels if p["type"] != "row"]


def test_dashboards_are_grafana_dashboards_with_queries_in_every_panel() -> None:
    import json

    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/afterglow.yml").read_text())
    uids = {ds["uid"]: ds["type"] for ds in sources["datasources"]}
    seen_uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"]), path
        assert dashboard["uid"] not in seen_uids
        seen_uids.add(dashboard["uid"])
        assert dashboard["title"].startswith("Afterglow / ")
        assert isinstance(dashboard["schemaVersion"], int)
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path
        assert _panels(dashboard), path
        for panel in _panels(dashboard):
            where = f"{path.name}: {panel['title']}"
            assert panel["type"] in {"timeseries", "stat", "table", "gauge", "bargauge"}, where
            assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, where
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
            assert panel["targets"], where
            for target in panel["targets"]:
                source = target["datasource"]
                assert uids.get(source["uid"]) == source["type"], where
                assert target["refId"], where
                assert target.get("expr") or target.get("url"), where


def _metrics_routes() -> set[str]:
    from services.registry import build_app

    paths: dict[str, Any] = build_app("metrics").openapi()["paths"]
    return set(paths)


def test_dashboard_queries_read_only_what_the_services_export() -> None:
    import json

    exported = exported_series()
    routes = _metrics_routes()
    used: set[str] = set()
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text())):
            for target in panel["targets"]:
                where = f"{path.name}: {panel['title']}"
                if target["datasource"]["type"] == PROMETHEUS_DS:
                    names = set(re.findall(r"\b(afterglow_[a-z_]+|up)\b", target["expr"]))
                    assert names, where
                    assert names - PROMQL_WORDS <= exported, (where, names - exported)
                    used |= names
                else:
                    route = target["url"].split("?")[0].replace("$promotion", "{promotion_id}")
                    assert route in routes, (where, route)
    # The operations dashboard covers throughput, lag, errors and latency.
    for series in (
        "afterglow_http_request_duration_seconds_count",
        "afterglow_bus_consumer_lag",
        "afterglow_bus_handler_failures_total",
        "afterglow_http_request_duration_seconds_bucket",
    ):
        assert series in used, series
