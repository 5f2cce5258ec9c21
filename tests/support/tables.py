"""What PostgreSQL stores about a table, for tests of migrations."""

from __future__ import annotations

from sqlalchemy import text

from shared.db import Database


async def storage_options(url: str, schema: str, table: str) -> str | None:
    """The table's storage parameters as PostgreSQL lists them ("fillfactor=85"), or None."""
    database = Database(url, schema)
    await database.start()
    try:
        async with database.connect() as conn:
            return await conn.scalar(
                text(
                    "SELECT array_to_string(reloptions, ',') FROM pg_class "
                    "WHERE oid = CAST(:name AS regclass)"
                ),
                {"name": f"{schema}.{table}"},
            )
    finally:
        await database.stop()
