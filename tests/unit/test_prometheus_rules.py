"""deploy/prometheus: the alert rules load in Prometheus, fire when they should
(promtool's rule unit tests), read only metrics the services export, and reach
Kubernetes unchanged as the PrometheusRule in k8s/base.

promtool comes from Debian's `prometheus` package; without it the promtool
tests skip locally and fail with CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.metrics.alerts import BusinessMetrics
from shared.observability import ServiceMetrics
from shared.settings import SERVICES

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "afterglow.rules.yml"
RULE_TESTS = PROMETHEUS / "afterglow.rules.test.yml"
PROMETHEUS_RULE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# What operations must hear about, by the alert that tells them.
REQUIRED_ALERTS = {
    "AfterglowInstanceDown",
    "AfterglowServiceDown",
    "AfterglowHigh5xxRate",
    "AfterglowConsumerLagGrowing",
    "AfterglowDeadLetters",
    "AfterglowOutboxBacklog",
}
# Labels the services put on their series, and those the scrape adds.
SCRAPE_LABELS = {"job", "instance", "service"}


def groups() -> list[dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    assert set(loaded) == {"groups"}
    result: list[dict[str, Any]] = loaded["groups"]
    return result


def alerts() -> list[dict[str, Any]]:
    return [rule for group in groups() for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        reason = "promtool is not installed (Debian: apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return subprocess.run(
        [binary, *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout


def test_the_alerts_fire_when_they_should_and_only_then() -> None:
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert {a["alert"] for a in alerts()} <= tested


def test_operations_hear_about_what_matters() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS
    for alert in alerts():
        where = alert["alert"]
        assert alert["alert"].startswith("Afterglow"), where
        assert alert["labels"]["severity"] in {"warning", "critical"}, where
        assert set(alert["annotations"]) >= {"summary", "description"}, where
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "0s")), where
    severities = {a["alert"]: a["labels"]["severity"] for a in alerts()}
    assert severities["AfterglowServiceDown"] == "critical"
    assert severities["AfterglowHigh5xxRate"] == "critical"


def _exported() -> dict[str, set[str]]:
    """Series names the services export, with their label names."""
    metrics = ServiceMetrics("segmentation")
    BusinessMetrics(metrics.registry)  # the metrics service's business alert series
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exported: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        collector = metrics.registry._names_to_collectors[family.name + suffixes[family.type][0]]
        labels = set(getattr(collector, "_labelnames", ()))
        for suffix in suffixes[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            exported[family.name + suffix] = labels | extra
    return exported


def test_the_rules_read_only_series_the_services_export() -> None:
    exported = _exported()
    assert "afterglow_bus_consumer_lag" in exported
    known = set().union(*exported.values()) | SCRAPE_LABELS
    for alert in alerts():
        expr = alert["expr"]
        used = set(re.findall(r"\bafterglow_[a-z_]+", expr))
        assert used or "up{" in expr, alert["alert"]
        assert used <= set(exported), (alert["alert"], used - set(exported))
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            labels = {label.strip() for label in grouping.split(",")}
            assert labels <= known, (alert["alert"], labels - known)
        for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr):
            assert label in known, (alert["alert"], label)
        for template in re.findall(r"\$labels\.([a-z_]+)", str(alert["annotations"])):
            assert template in known, (alert["alert"], template)


def test_service_down_names_every_service() -> None:
    (down,) = [a for a in alerts() if a["alert"] == "AfterglowServiceDown"]
    absent = set(re.findall(r'absent\(up\{job="afterglow", service="([a-z]+)"\}\)', down["expr"]))
    assert absent == set(SERVICES)


def test_kubernetes_gets_the_same_rules() -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == "afterglow"
    assert rule["spec"]["groups"] == groups(), (
        "k8s/base/prometheusrule.yaml is stale: run `make manifests`"
    )
