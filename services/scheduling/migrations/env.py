"""Alembic environment of the scheduling service (run through `afterglow migrate`)."""

from services.scheduling import store
from shared.migrations import run_env

run_env(target_metadata=store.metadata, schema=store.SCHEMA)
