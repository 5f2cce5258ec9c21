"""Alembic environment of the metrics service (run through `afterglow migrate`)."""

from services.metrics import store
from shared.migrations import run_env

run_env(target_metadata=store.metadata, schema=store.SCHEMA)
