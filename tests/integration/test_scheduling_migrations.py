"""Scheduling's migrations on SQLite and PostgreSQL: 0006 (no autovacuum of the touches for
their inserts alone) goes down and up again."""

from __future__ import annotations

from sqlalchemy import text

from shared.db import Database
from shared.migrations import current_async, downgrade_async, upgrade_async

SCHEMA = "scheduling"


async def touches_options(url: str) -> str | None:
    database = Database(url, SCHEMA)
    await database.start()
    try:
        async with database.connect() as conn:
            return await conn.scalar(
                text(
                    "SELECT array_to_string(reloptions, ',') FROM pg_class "
                    "WHERE oid = CAST('scheduling.touches' AS regclass)"
                )
            )
    finally:
        await database.stop()


async def test_touches_are_not_vacuumed_for_inserts_alone(database_url: str) -> None:
    url = database_url
    postgres = url.startswith("postgresql")
    await upgrade_async(url, SCHEMA)
    assert await current_async(url, SCHEMA) == "0006"
    if postgres:
        assert await touches_options(url) == "autovacuum_vacuum_insert_threshold=-1"
    await downgrade_async(url, SCHEMA, "0005")
    assert await current_async(url, SCHEMA) == "0005"
    if postgres:
        assert await touches_options(url) is None
    await upgrade_async(url, SCHEMA)
    assert await current_async(url, SCHEMA) == "0006"
    if postgres:
        assert await touches_options(url) == "autovacuum_vacuum_insert_threshold=-1"
