# Afterglow: every command a developer or CI needs. `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# The servers from `make up`, handed to the tests under their own names so that
# no test picks them up by accident through the service settings.
WITH_SERVERS = set -a; . .run/env; set +a; \
	export AFTERGLOW_TEST_KAFKA="$$AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS" \
	       AFTERGLOW_TEST_DATABASE_URL="$$AFTERGLOW_DATABASE_URL"; \
	unset AFTERGLOW_KAFKA_BOOTSTRAP_SERVERS AFTERGLOW_DATABASE_URL;

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## create .venv and install the pinned dependencies

.PHONY: lock
lock: $(STAMP) ## refresh constraints.txt from the installed versions
	$(PY) -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

.PHONY: format
format: $(STAMP) ## rewrite the code in the house format
	$(VENV)/bin/ruff format shared services tests benchmarks k8s
	$(VENV)/bin/ruff check --fix shared services tests benchmarks k8s

.PHONY: lint
lint: $(STAMP) ## ruff format --check and ruff check
	$(VENV)/bin/ruff format --check shared services tests benchmarks k8s
	$(VENV)/bin/ruff check shared services tests benchmarks k8s

.PHONY: typecheck
typecheck: $(STAMP) ## mypy (strict) on shared/ and services/
	$(VENV)/bin/mypy

.PHONY: up
up: ## start Kafka and PostgreSQL on loopback (fetches Kafka once)
	deploy/up.sh

.PHONY: down
down: ## stop Kafka and PostgreSQL (data kept in .run/)
	deploy/down.sh

.PHONY: test-unit
test-unit: $(STAMP) ## unit tier: no I/O beyond the process
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: $(STAMP) up ## contract and integration tiers on real Kafka and PostgreSQL
	$(WITH_SERVERS) $(PY) -m pytest tests/contract tests/integration $(PYTEST_ARGS)

.PHONY: test
test: lint typecheck up ## everything CI runs: lint, types, every test tier on real servers
	$(WITH_SERVERS) $(PY) -m pytest -ra $(PYTEST_ARGS)

.PHONY: test-faults
test-faults: $(STAMP) up ## fault injection: kill -9 of each service, provider down, duplicates, Kafka and PostgreSQL restarts (~11 min)
	$(WITH_SERVERS) AFTERGLOW_TEST_FAULTS=all $(PY) -m pytest -ra tests/e2e/test_faults.py $(PYTEST_ARGS)

.PHONY: demo
demo: $(STAMP) ## embedded mode: four services, in-process bus, SQLite, one report
	$(VENV)/bin/afterglow demo

.PHONY: run
run: $(STAMP) up ## the four services as processes on Kafka and PostgreSQL (ports 8001-8004, logs in .run/logs)
	set -a; . .run/env; set +a; $(VENV)/bin/afterglow run --logs .run/logs

.PHONY: bench-bus
bench-bus: $(STAMP) up ## bus throughput: events/s produced and consumed through Kafka
	set -a; . .run/env; set +a; $(PY) -m benchmarks.bus

.PHONY: clean
clean: ## remove local state (.run, caches); keeps .venv
	-deploy/down.sh
	rm -rf .run .pytest_cache .mypy_cache .ruff_cache

.PHONY: manifests
manifests: $(STAMP) ## Kubernetes: sync the PrometheusRule, render k8s/overlays/{dev,prod} into .run/k8s/
	$(PY) k8s/sync_rules.py
	mkdir -p .run/k8s
	for overlay in dev prod; do k8s/kustomize.sh build k8s/overlays/$$overlay > .run/k8s/$$overlay.yaml || exit 1; done
	@echo "rendered .run/k8s/dev.yaml and .run/k8s/prod.yaml"

.PHONY: bench-segmentation
bench-segmentation: $(STAMP) up ## segmentation on PostgreSQL and Kafka (USERS=1000000 by default)
	set -a; . .run/env; set +a; $(PY) -m benchmarks.segmentation --users $${USERS:-1000000}

.PHONY: bench-delivery
bench-delivery: $(STAMP) up ## delivery throughput on PostgreSQL to a 20 ms loopback provider, then with 10% 5xx
	set -a; . .run/env; set +a; $(PY) -m benchmarks.delivery $(BENCH_ARGS)

.PHONY: bench-scheduling
bench-scheduling: $(STAMP) up ## scheduling: plan N x 5 waves on PostgreSQL, dispatch a day via Kafka (PARTICIPANTS=1000000)
	set -a; . .run/env; set +a; $(PY) -m benchmarks.scheduling --participants $${PARTICIPANTS:-1000000}

.PHONY: bench-metrics
bench-metrics: $(STAMP) up ## metrics: events/s aggregated on one process and funnel p50/p99 (PARTICIPANTS=100000)
	set -a; . .run/env; set +a; $(PY) -m benchmarks.metrics --participants $${PARTICIPANTS:-100000}

.PHONY: bench-stack
bench-stack: $(STAMP) up ## the four services as processes, end to end to a 20 ms loopback provider (PARTICIPANTS=10000; users past 10,000 by COPY)
	set -a; . .run/env; set +a; flock /tmp/afterglow-bench.lock $(PY) -m benchmarks.stack --participants $${PARTICIPANTS:-10000} $(BENCH_ARGS)

.PHONY: bench
bench: $(STAMP) up ## every benchmark at 10k, 100k and 1M participants: one table, .run/bench/report.json (SIZES=10000 for a quick run)
	set -a; . .run/env; set +a; $(PY) -m benchmarks.report $(if $(SIZES),--sizes $(SIZES)) $(if $(ONLY),--only $(ONLY)) $(if $(TIMEOUT),--timeout $(TIMEOUT))
