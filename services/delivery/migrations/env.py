"""Alembic environment of the delivery service (run through `afterglow migrate`)."""

from services.delivery import store
from shared.migrations import run_env

run_env(target_metadata=store.metadata, schema=store.SCHEMA)
