"""`?inline=1` on a SQLite URL (the embedded demo): SQLite on the event loop's thread
behaves as through aiosqlite: transactions, concurrent writers of one service and of
several services on one main file, migrations, and the errors SQLite raises."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Table, func, select
from sqlalchemy.exc import IntegrityError

from shared.db import Database
from shared.migrations import current_async, upgrade_async
from shared.sqlite_inline import InlineConnection
from tests.integration.test_db import items_table

FAKE_MIGRATIONS = Path(__file__).parent / "fake_service" / "migrations"


async def started(url: str, schema: str, pool_size: int = 5) -> tuple[Database, Table]:
    db = Database(url, schema, pool_size=pool_size)
    await db.start()
    metadata, table = items_table(schema)
    await db.create_all(metadata)
    return db, table


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/afterglow.db?inline=1"


async def test_statements_run_on_the_loop_thread_and_transactions_hold(url: str) -> None:
    db, table = await started(url, "inline_a")
    try:
        async with db.connect() as conn:
            raw = await conn.get_raw_connection()
            assert isinstance(raw.driver_connection, InlineConnection)
        async with db.begin() as conn:
            await conn.execute(table.insert(), [{"id": "a", "value": 1}, {"id": "b", "value": 2}])
        with pytest.raises(IntegrityError):
            async with db.begin() as conn:
                await conn.execute(table.insert().values(id="c", value=3))
                await conn.execute(table.insert().values(id="a", value=4))  # duplicate key
        async with db.connect() as conn:
            found = dict((await conn.execute(select(table.c.id, table.c.value))).all())
        assert found == {"a": 1, "b": 2}  # "c" was rolled back with the failed transaction
    finally:
        await db.stop()


async def test_concurrent_writers_and_readers_never_see_locked(url: str) -> None:
    db, table = await started(url, "inline_b")
    try:

        async def write(i: int) -> None:
            async with db.begin() as conn:
                count = await conn.scalar(select(func.count()).select_from(table))
                await asyncio.sleep(0)  # let the others try in between
                await conn.execute(table.insert().values(id=f"w{i}", value=int(count or 0)))

        async def read() -> int:
            async with db.connect() as conn:
                return int(await conn.scalar(select(func.count()).select_from(table)) or 0)

        await asyncio.gather(*(write(i) for i in range(50)), *(read() for _ in range(20)))
        async with db.connect() as conn:
            values = sorted((await conn.execute(select(table.c.value))).scalars())
        assert values == list(range(50))  # serialised: each writer saw all before it
    finally:
        await db.stop()


async def test_services_sharing_one_main_file_write_at_once(url: str) -> None:
    dbs = [await started(url, f"inline_s{n}", pool_size=3) for n in range(4)]
    try:

        async def write(db: Database, table: Table, i: int) -> None:
            async with db.begin() as conn:
                await conn.execute(table.insert().values(id=f"w{i}", value=i))
                await asyncio.sleep(0.001)

        await asyncio.gather(*(write(db, t, i) for db, t in dbs for i in range(25)))
        for db, table in dbs:
            async with db.connect() as conn:
                assert await conn.scalar(select(func.count()).select_from(table)) == 25
    finally:
        for db, _ in dbs:
            await db.stop()


async def test_migrations_run_with_the_inline_url(url: str) -> None:
    await upgrade_async(url, "inline_m", script_location=FAKE_MIGRATIONS)
    assert await current_async(url, "inline_m", script_location=FAKE_MIGRATIONS) == "0002"


async def test_a_bad_statement_raises_the_sqlite_error(url: str) -> None:
    db = Database(url, "inline_e")
    await db.start()
    try:
        async with db.connect() as conn:
            raw = await conn.get_raw_connection()
            with pytest.raises(sqlite3.OperationalError, match="no such table"):
                await raw.driver_connection.execute("SELECT * FROM nowhere")
    finally:
        await db.stop()


async def test_cancelled_transactions_roll_back_and_give_their_connection_back(url: str) -> None:
    db, table = await started(url, "inline_c", pool_size=3)
    try:
        inside = asyncio.Event()

        async def stuck(i: int) -> None:
            async with db.begin() as conn:
                await conn.execute(table.insert().values(id=f"c{i}", value=i))
                inside.set()
                await asyncio.sleep(30)

        async def reader() -> None:
            async with db.connect() as conn:
                await conn.scalar(select(func.count()).select_from(table))
                await asyncio.sleep(30)

        tasks = [asyncio.ensure_future(stuck(i)) for i in range(5)]
        tasks += [asyncio.ensure_future(reader()) for _ in range(2)]
        await inside.wait()
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Every connection went back to the pool of 3, and nothing was committed.
        for i in range(10):
            async with asyncio.timeout(5), db.begin() as conn:
                await conn.execute(table.insert().values(id=f"after{i}", value=i))
        async with db.connect() as conn:
            ids = set((await conn.execute(select(table.c.id))).scalars())
        assert ids == {f"after{i}" for i in range(10)}
    finally:
        await db.stop()
