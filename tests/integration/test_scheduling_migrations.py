"""Scheduling's migrations on SQLite and PostgreSQL: 0006 (no autovacuum of the touches for
their inserts alone) goes down and up again."""

from __future__ import annotations

from shared.migrations import current_async, downgrade_async, upgrade_async
from tests.support.tables import storage_options

SCHEMA = "scheduling"
NO_INSERT_VACUUM = "autovacuum_vacuum_insert_threshold=-1"


async def test_touches_are_not_vacuumed_for_inserts_alone(database_url: str) -> None:
    url = database_url
    postgres = url.startswith("postgresql")
    await upgrade_async(url, SCHEMA)
    assert await current_async(url, SCHEMA) == "0006"
    if postgres:
        assert await storage_options(url, SCHEMA, "touches") == NO_INSERT_VACUUM
    await downgrade_async(url, SCHEMA, "0005")
    assert await current_async(url, SCHEMA) == "0005"
    if postgres:
        assert await storage_options(url, SCHEMA, "touches") is None
    await upgrade_async(url, SCHEMA)
    assert await current_async(url, SCHEMA) == "0006"
    if postgres:
        assert await storage_options(url, SCHEMA, "touches") == NO_INSERT_VACUUM
