"""k8s/: both overlays render, every object passes the Kubernetes schemas, and
every pod is probed, locked down and fed its secrets by reference only.

Rendering uses k8s/kustomize.sh (kustomize at a pinned version, built once with
`go install` into ~/.cache/afterglow/bin); schemas come from the
`kubernetes-validate` package, offline. Without either, these tests skip
locally and fail with CI=true.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.settings import DEFAULT_PORTS, SERVICES, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUSTOMIZE = K8S / "kustomize.sh"
OVERLAYS = ("dev", "prod")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

# The oldest Kubernetes we promise (matchLabelKeys, unhealthyPodEvictionPolicy
# and the rest are there by 1.30) and the newest the schemas know.
OLDEST_KUBERNETES = "1.30.0"
SECRET_NAME = "afterglow-secrets"
SECRET_KEYS = {"AFTERGLOW_DATABASE_URL", "AFTERGLOW_API_TOKENS", "AFTERGLOW_RECEIPT_SECRET"}
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# uvicorn's timeout_graceful_shutdown in services/cli.py: requests in flight get that long.
UVICORN_GRACEFUL_S = 25
COMMON_LABELS = {
    "app.kubernetes.io/name": "afterglow",
    "app.kubernetes.io/part-of": "afterglow",
    "app.kubernetes.io/managed-by": "kustomize",
}
Obj = dict[str, Any]
IMAGE = re.compile(r"(?:[^\s@]+/)?afterglow(?::[\w][\w.-]*)?(?:@sha256:[0-9a-f]{64})?")
PINNED_IMAGE = re.compile(
    r"(?:[^\s@]+/)?afterglow(?::\d+\.\d+\.\d+(?:@sha256:[0-9a-f]{64})?|@sha256:[0-9a-f]{64})"
)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@cache
def _build(overlay: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [str(KUSTOMIZE), "build", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def render(overlay: str) -> list[Obj]:
    code, out, err = _build(overlay)
    if code == 127:
        _unavailable(f"kustomize cannot be fetched: {err.strip()}")
    assert code == 0, f"kustomize build k8s/overlays/{overlay} failed:\n{err}"
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def kinds(objects: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = kinds(objects, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def workloads(objects: list[Obj]) -> Iterator[Obj]:
    for o in objects:
        if o["kind"] in {"Deployment", "Job"}:
            yield o


def container(workload: Obj) -> Obj:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, workload["metadata"]["name"]
    c: Obj = containers[0]
    return c


def config_map(objects: list[Obj]) -> Obj:
    maps = [o for o in objects if o["kind"] == "ConfigMap"]
    assert len(maps) == 1, [m["metadata"]["name"] for m in maps]
    assert maps[0]["metadata"]["name"].startswith("afterglow-config-")  # hash suffix
    return maps[0]


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


# -- schemas -------------------------------------------------------------------


def _validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        _unavailable("the kubernetes-validate package is not installed")
    return kubernetes_validate


def _kubernetes_versions() -> list[str]:
    from kubernetes_validate.utils import latest_version

    return [OLDEST_KUBERNETES, latest_version()]


def test_every_object_passes_the_kubernetes_schemas(overlay: str) -> None:
    kv = _validator()
    objects = render(overlay)
    checked = 0
    for version in _kubernetes_versions():
        for o in objects:
            if (o["apiVersion"], o["kind"]) in CRD_KINDS:
                continue  # not in the schemas: test_monitoring_objects_are_well_formed
            where = f"{overlay}: {o['kind']}/{o['metadata']['name']} on Kubernetes {version}"
            try:
                kv.validate(o, version, strict=True)
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{where}: {path}: {e.message}", pytrace=False)
            except kv.SchemaNotFoundError:
                pytest.fail(f"{where}: no schema for {o['apiVersion']} {o['kind']}", pytrace=False)
            checked += 1
    assert checked >= 2 * 16


def test_the_schema_check_catches_mistakes() -> None:
    kv = _validator()
    deployment = next(o for o in render("prod") if o["kind"] == "Deployment")
    kv.validate(deployment, OLDEST_KUBERNETES, strict=True)
    misspelt = copy.deepcopy(deployment)
    container(misspelt)["readinesProbe"] = container(misspelt).pop("readinessProbe")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, OLDEST_KUBERNETES, strict=True)


def test_the_overlays_hold_what_the_base_promises(overlay: str) -> None:
    objects = render(overlay)
    expected = {
        "ConfigMap": 1,
        "Deployment": 4,
        "Service": 4,
        "HorizontalPodAutoscaler": 4,
        "PodDisruptionBudget": 4,
        "NetworkPolicy": 1,
        "Job": 1,
        "ServiceMonitor": 1,
        "PrometheusRule": 1,
    }
    counted: dict[str, int] = {}
    for o in objects:
        counted[o["kind"]] = counted.get(o["kind"], 0) + 1
    assert counted == expected
    namespace = {"dev": "afterglow-dev", "prod": "afterglow"}[overlay]
    assert {o["metadata"].get("namespace") for o in objects} == {namespace}


def test_monitoring_objects_are_well_formed(overlay: str) -> None:
    objects = render(overlay)
    for o in objects:
        if (o["apiVersion"], o["kind"]) not in CRD_KINDS:
            continue
        assert set(o) == {"apiVersion", "kind", "metadata", "spec"}, o["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", o["metadata"]["name"])
    monitor = one(objects, "ServiceMonitor", "afterglow")["spec"]
    services = kinds(objects, "Service").values()
    assert all(selects(monitor["selector"], s["metadata"]["labels"]) for s in services)
    assert monitor["jobLabel"] in next(iter(services))["metadata"]["labels"]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == "http"
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True  # the services' own `service` label wins
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])
    assert any(r["targetLabel"] == "service" for r in endpoint["relabelings"])

    groups = one(objects, "PrometheusRule", "afterglow")["spec"]["groups"]
    assert groups
    for group in groups:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert ("alert" in rule) != ("record" in rule) and rule["expr"]


# -- the services --------------------------------------------------------------


def test_each_service_has_its_deployment_service_autoscaler_and_budget(overlay: str) -> None:
    objects = render(overlay)
    replicas = {"dev": 1, "prod": 3}[overlay]
    for service in SERVICES:
        name = f"afterglow-{service}"
        port = DEFAULT_PORTS[service]
        deployment = one(objects, "Deployment", name)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["app.kubernetes.io/component"] == service
        assert selects(deployment["spec"]["selector"], pod_labels)
        assert deployment["spec"]["replicas"] == replicas
        c = container(deployment)
        assert c["args"] == ["serve", service, "--host", "0.0.0.0", "--port", str(port)]
        assert c["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]

        svc = one(objects, "Service", name)["spec"]
        assert svc["ports"] == [
            {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}
        ]
        assert svc["selector"] == deployment["spec"]["selector"]["matchLabels"]
        others = [d for d in kinds(objects, "Deployment").values() if d is not deployment]
        assert not any(
            selects({"matchLabels": svc["selector"]}, d["spec"]["template"]["metadata"]["labels"])
            for d in others
        )

        hpa = one(objects, "HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert hpa["spec"]["minReplicas"] == replicas <= hpa["spec"]["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}

        pdb = one(objects, "PodDisruptionBudget", name)["spec"]
        assert selects(pdb["selector"], pod_labels)
        # A budget the replicas can honour, or node drains block forever.
        if "minAvailable" in pdb:
            assert pdb["minAvailable"] < replicas
        else:
            assert pdb["maxUnavailable"] >= 1


def test_every_container_is_locked_down(overlay: str) -> None:
    for workload in workloads(render(overlay)):
        where = f"{overlay}: {workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] == 10001, where
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["runAsUser"] == 10001, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            # The only writable place, as the image's WORKDIR is /tmp.
            (mount,) = c["volumeMounts"]
            assert mount["mountPath"] == "/tmp", where
            (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
            assert "emptyDir" in volume, where
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            assert set(requests) == set(limits) == {"cpu", "memory"}, where
            assert IMAGE.fullmatch(c["image"]), (where, c["image"])


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match is not None, value
    return float(match.group(1)) * units[match.group(2)]


def test_resources_fit_the_machine_and_dev_is_smaller() -> None:
    by_overlay = {o: [container(w)["resources"] for w in workloads(render(o))] for o in OVERLAYS}
    for overlay, resources in by_overlay.items():
        for r in resources:
            for key in ("cpu", "memory"):
                assert _quantity(r["requests"][key]) <= _quantity(r["limits"][key]), overlay
            assert _quantity(r["limits"]["cpu"]) <= 1
            assert _quantity(r["limits"]["memory"]) <= 512 * 2**20
    dev, prod = by_overlay["dev"][0], by_overlay["prod"][0]
    for part in ("requests", "limits"):
        for key in ("cpu", "memory"):
            assert _quantity(dev[part][key]) < _quantity(prod[part][key]), (part, key)


def test_every_service_is_probed_and_drains_before_it_stops(overlay: str) -> None:
    for deployment in kinds(render(overlay), "Deployment").values():
        where = f"{overlay}: {deployment['metadata']['name']}"
        pod = deployment["spec"]["template"]["spec"]
        c = container(deployment)
        probes = {kind: c[f"{kind}Probe"] for kind in ("startup", "liveness", "readiness")}
        for kind, probe in probes.items():
            assert probe["httpGet"]["port"] == "http", (where, kind)
            assert probe["timeoutSeconds"] <= probe["periodSeconds"], (where, kind)
        assert probes["startup"]["httpGet"]["path"] == "/healthz", where
        assert probes["liveness"]["httpGet"]["path"] == "/healthz", where
        # /readyz: the database and the bus answer, each pinged within 2 s.
        assert probes["readiness"]["httpGet"]["path"] == "/readyz", where
        assert probes["readiness"]["timeoutSeconds"] >= 4, where
        startup = probes["startup"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, where

        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", where
        pre_stop = int(command[1])
        assert 3 <= pre_stop <= 10, where
        # preStop, then SIGTERM: uvicorn finishes requests in flight and drains
        # the consumers before the kubelet's SIGKILL.
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + UVICORN_GRACEFUL_S + 5, where
        strategy = deployment["spec"]["strategy"]
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, where


# -- settings and secrets ------------------------------------------------------


def test_environment_is_settings_and_secrets_are_references_only(overlay: str) -> None:
    objects = render(overlay)
    fields = {f"AFTERGLOW_{name.upper()}" for name in Settings.model_fields}
    config = config_map(objects)
    data = config["data"]
    assert set(data) <= fields, set(data) - fields
    assert not SECRET_KEYS & set(data)
    assert data["AFTERGLOW_PROFILE"] == {"dev": "dev", "prod": "production"}[overlay]
    assert data["AFTERGLOW_AUTO_MIGRATE"] == "false"
    assert data["AFTERGLOW_LOG_FORMAT"] == "json"
    assert data["AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS"]
    for key, value in data.items():
        if key.startswith("AFTERGLOW_PROVIDER_"):
            assert value.startswith("https://"), key  # egress is open on 443 only
    assert not [o for o in objects if o["kind"] == "Secret"]

    for workload in workloads(objects):
        c = container(workload)
        assert c["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        env = {e["name"]: e for e in c["env"]}
        assert set(env) == SECRET_KEYS, workload["metadata"]["name"]
        for name, entry in env.items():
            assert "value" not in entry, name
            assert entry["valueFrom"] == {"secretKeyRef": {"name": SECRET_NAME, "key": name}}


def _repository_manifests() -> Iterator[Path]:
    for path in sorted(K8S.rglob("*")):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".env", ".json", ".txt"}:
            yield path
    yield from sorted((ROOT / "deploy" / "prometheus").glob("*.y*ml"))


SECRET_LOOKING = [
    re.compile(r"^\s*kind:\s*Secret\s*$", re.M),
    re.compile(r"(?i)\b(stringData|password|passwd|token|secret)\s*[:=]\s*['\"]?[^\s'\"{}]{3,}"),
    re.compile(r"[a-z+]+://[^/\s:@]+:[^/\s@]+@"),  # credentials in a URL
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\bdev-token\b"),
]


def test_no_secret_value_is_committed_or_rendered() -> None:
    texts = {str(p.relative_to(ROOT)): p.read_text() for p in _repository_manifests()}
    for overlay in OVERLAYS:
        texts[f"render of {overlay}"] = _build(overlay)[1]
    assert any(name.startswith("k8s/base/") for name in texts)
    for name, text in texts.items():
        for pattern in SECRET_LOOKING:
            match = pattern.search(text)
            assert match is None, f"{name}: looks like a secret value: {match.group(0)!r}"
        for key in SECRET_KEYS:
            literal = re.search(rf"{key}\s*[=:]\s*\S", text)
            assert literal is None, f"{name}: {literal.group(0)!r}"


def test_the_secret_patterns_would_catch_a_leak() -> None:
    leaks = [
        "kind: Secret",
        "  password: hunter22",
        "AFTERGLOW_DATABASE_URL=postgresql+asyncpg://afterglow:s3cret@db:5432/afterglow",
        "  token: 'abc123'",
    ]
    for leak in leaks:
        assert any(p.search(leak) for p in SECRET_LOOKING), leak


# -- the migration job, the network, labels, overlays --------------------------


def test_the_migration_job_runs_every_migration_once(overlay: str) -> None:
    objects = render(overlay)
    job = one(objects, "Job", "afterglow-migrate")
    spec = job["spec"]
    assert container(job)["args"] == ["migrate", "all"]
    assert 1 <= spec["backoffLimit"] <= 6
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # Same configuration as the services it migrates for.
    deployment = next(iter(kinds(objects, "Deployment").values()))
    for key in ("image", "env", "envFrom", "securityContext"):
        assert container(job)[key] == container(deployment)[key], key


def test_the_network_policy_admits_only_http_in_and_dependencies_out(overlay: str) -> None:
    objects = render(overlay)
    policy = one(objects, "NetworkPolicy", "afterglow")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    for workload in workloads(objects):
        assert selects(policy["podSelector"], workload["spec"]["template"]["metadata"]["labels"])

    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    same_namespace, prometheus = ingress["from"]
    assert same_namespace == {"podSelector": {}}
    assert prometheus["namespaceSelector"] == {}
    assert prometheus["podSelector"] == {
        "matchExpressions": [
            {"key": "app.kubernetes.io/name", "operator": "In", "values": ["prometheus"]}
        ]
    }

    out = set()
    for rule in policy["egress"]:
        assert "to" not in rule  # Kafka, PostgreSQL and providers may live anywhere
        out |= {(p["port"], p["protocol"]) for p in rule["ports"]}
    assert out == {(53, "UDP"), (53, "TCP"), (9092, "TCP"), (5432, "TCP"), (443, "TCP")}


def test_every_object_and_pod_carries_the_common_labels(overlay: str) -> None:
    objects = render(overlay)
    instance = {"dev": "afterglow-dev", "prod": "afterglow"}[overlay]
    for o in objects:
        labels = o["metadata"]["labels"]
        where = f"{o['kind']}/{o['metadata']['name']}"
        assert labels["app.kubernetes.io/part-of"] == "afterglow", where
        assert labels["app.kubernetes.io/managed-by"] == "kustomize", where
        assert labels["app.kubernetes.io/instance"] == instance, where
        assert labels["app.kubernetes.io/version"], where
    for workload in workloads(objects):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert COMMON_LABELS.items() <= labels.items(), workload["metadata"]["name"]
        assert labels["app.kubernetes.io/component"], workload["metadata"]["name"]
        # Selectors are immutable: nothing that changes per release may be in them.
        if workload["kind"] == "Deployment":
            selector = workload["spec"]["selector"]["matchLabels"]
            assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/component"}


def test_dev_runs_small_and_prod_runs_pinned_and_spread() -> None:
    dev, prod = render("dev"), render("prod")
    for workload in workloads(dev):
        c = container(workload)
        assert c["image"] == "afterglow:dev"
        assert c["imagePullPolicy"] == "Always"
    for pdb in kinds(dev, "PodDisruptionBudget").values():
        assert "minAvailable" not in pdb["spec"]
        assert pdb["spec"]["maxUnavailable"] == 1

    for workload in workloads(prod):
        c = container(workload)
        # A release tag, a digest or both; never a tag that moves.
        assert PINNED_IMAGE.fullmatch(c["image"]), c["image"]
        assert c["imagePullPolicy"] == "IfNotPresent"
    for deployment in kinds(prod, "Deployment").values():
        spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert {s["topologyKey"] for s in spread} == {
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        }
        for s in spread:
            assert selects(s["labelSelector"], labels)
            assert "app.kubernetes.io/component" in s["matchLabelKeys"]
            assert s["whenUnsatisfiable"] == "ScheduleAnyway"


def test_kustomize_is_fetched_once_and_pinned() -> None:
    render("dev")  # skips when it cannot be had
    done = subprocess.run(
        [str(KUSTOMIZE), "--path"], capture_output=True, text=True, timeout=60, check=True
    )
    binary = Path(done.stdout.strip())
    if not os.environ.get("AFTERGLOW_KUSTOMIZE"):
        version = re.search(
            r'version="\$\{AFTERGLOW_KUSTOMIZE_VERSION:-(v[0-9.]+)\}"', KUSTOMIZE.read_text()
        )
        assert version is not None
        assert binary.name == f"kustomize-{version.group(1)}"
        reported = subprocess.run(
            [str(KUSTOMIZE), "version"], capture_output=True, text=True, timeout=60, check=True
        )
        assert reported.stdout.strip() == version.group(1)
    assert done.stderr == ""  # already there: nothing built
