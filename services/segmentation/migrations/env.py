"""Alembic environment of the segmentation service (run through `afterglow migrate`)."""

from services.segmentation import store
from shared.migrations import run_env

run_env(target_metadata=store.metadata, schema=store.SCHEMA)
