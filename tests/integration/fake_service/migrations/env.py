"""Alembic environment of the fake test service.

A real service hard-codes its schema (`run_env(metadata, "segmentation")`); the
fake one takes it from the config so that every test gets a schema of its own.
"""

from alembic import context
from sqlalchemy import MetaData

from shared.migrations import run_env

schema = context.config.attributes["schema"]
run_env(MetaData(schema=schema), schema)
