"""shared.db and shared.migrations against real databases: a SQLite file and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db import (
    Database,
    DatabaseConfigError,
    UtcDateTime,
    insert_ignore,
    sqlite_schema_path,
    upsert,
    upsert_add,
)
from shared.migrations import current_async, downgrade_async, revision, upgrade, upgrade_async
from shared.outbox import outbox_table

FAKE_MIGRATIONS = Path(__file__).parent / "fake_service" / "migrations"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Backend:
    name: str
    url: str
    unique: str
    databases: list[Database] = field(default_factory=list)

    def schema(self, suffix: str = "") -> str:
        return f"t_{self.unique}{suffix}"

    def database(self, suffix: str = "", **kwargs: Any) -> Database:
        db = Database(self.url, self.schema(suffix), **kwargs)
        self.databases.append(db)
        return db


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[Backend]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/afterglow.db"
    b = Backend(request.param, url, unique)
    yield b
    for db in b.databases:
        if b.name == "postgres":
            await db.start()
            await db.drop_schema()
        await db.stop()


def items_table(schema: str) -> tuple[MetaData, Table]:
    metadata = MetaData(schema=schema)
    table = Table(
        "items",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("value", Integer, nullable=False),
        Column("note", String(64), nullable=True),
        Column("at", UtcDateTime, nullable=True),
    )
    return metadata, table


async def started(db: Database, metadata: MetaData | None = None) -> Database:
    await db.start()
    if metadata is not None:
        await db.create_all(metadata)
    return db


async def rows(db: Database, table: Table) -> dict[str, int]:
    async with db.connect() as conn:
        result = await conn.execute(select(table.c.id, table.c.value))
        return {r.id: r.value for r in result}


# -- transactions -----------------------------------------------------------------


async def test_begin_commits_and_rolls_back(backend: Backend) -> None:
    db = backend.database()
    metadata, items = items_table(db.schema)
    await started(db, metadata)
    assert db.is_postgres is (backend.name == "postgres")

    async with db.begin() as conn:
        await conn.execute(items.insert().values(id="a", value=1))

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with db.begin() as conn:
            await conn.execute(items.insert().values(id="b", value=2))
            # Visible inside the transaction...
            assert await conn.scalar(select(func.count()).select_from(items)) == 2
            raise Boom
    # ... gone after the rollback.
    assert await rows(db, items) == {"a": 1}


async def test_utc_datetime_round_trip(backend: Backend) -> None:
    db = backend.database()
    metadata, items = items_table(db.schema)
    await started(db, metadata)
    local = datetime(2025, 3, 30, 1, 30, tzinfo=timezone(timedelta(hours=2)))
    async with db.begin() as conn:
        await conn.execute(items.insert().values(id="a", value=1, at=local))
        with pytest.raises(Exception, match="naive"):
            await conn.execute(items.insert().values(id="b", value=1, at=datetime(2025, 1, 1)))
    async with db.connect() as conn:
        at = await conn.scalar(select(items.c.at))
    assert at == local
    assert at.tzinfo is not None and at.utcoffset() == timedelta(0)
    assert at == datetime(2025, 3, 29, 23, 30, tzinfo=UTC)


async def test_insert_ignore_and_upsert(backend: Backend) -> None:
    db = backend.database()
    metadata, items = items_table(db.schema)
    await started(db, metadata)

    async with db.begin() as conn:
        await conn.execute(insert_ignore(items), [{"id": "a", "value": 1, "note": "first"}])
        # A conflicting row is ignored, a new one is inserted, in one executemany.
        await conn.execute(
            insert_ignore(items),
            [{"id": "a", "value": 99, "note": "x"}, {"id": "b", "value": 2, "note": "b"}],
        )
    assert await rows(db, items) == {"a": 1, "b": 2}

    async with db.begin() as conn:
        # Only `value` is taken from the proposed row; `note` keeps its value.
        await conn.execute(
            upsert(items, ["id"], ["value"]),
            [{"id": "a", "value": 10, "note": "ignored"}, {"id": "c", "value": 3, "note": "c"}],
        )
    assert await rows(db, items) == {"a": 10, "b": 2, "c": 3}
    async with db.connect() as conn:
        assert await conn.scalar(select(items.c.note).where(items.c.id == "a")) == "first"

    async with db.begin() as conn:
        # set_=None: every non-key column from the proposed row.
        await conn.execute(upsert(items, ["id"]).values(id="a", value=11, note="second"))
        # A mapping: expressions over the existing row (a counter).
        for _ in range(3):
            await conn.execute(
                upsert(items, ["id"], {"value": items.c.value + 1}).values(id="b", value=0)
            )
    assert await rows(db, items) == {"a": 11, "b": 5, "c": 3}
    async with db.connect() as conn:
        assert await conn.scalar(select(items.c.note).where(items.c.id == "a")) == "second"


async def test_insert_ignore_rowcount_tells_new_from_seen(backend: Backend) -> None:
    """Handlers dedupe with `rowcount`: it must be right for `.values()` and a 1-row list."""
    db = backend.database()
    metadata, items = items_table(db.schema)
    await started(db, metadata)
    async with db.begin() as conn:
        assert (await conn.execute(insert_ignore(items).values(id="a", value=1))).rowcount == 1
        assert (await conn.execute(insert_ignore(items).values(id="a", value=1))).rowcount == 0
        assert (await conn.execute(insert_ignore(items), [{"id": "b", "value": 1}])).rowcount == 1
        assert (await conn.execute(insert_ignore(items), [{"id": "b", "value": 1}])).rowcount == 0


async def test_upsert_add_counts(backend: Backend) -> None:
    db = backend.database()
    metadata = MetaData(schema=db.schema)
    counts = Table(
        "counts",
        metadata,
        Column("promotion_id", String(32), primary_key=True),
        Column("measure", String(32), primary_key=True),
        Column("value", BigInteger, nullable=False),
    )
    await started(db, metadata)

    async def add(promotion: str, measure: str, amount: int) -> None:
        async with db.begin() as conn:
            key = {"promotion_id": promotion, "measure": measure}
            await conn.execute(upsert_add(counts, key, "value", amount))

    await asyncio.gather(*(add("p1", "sent", 1) for _ in range(20)), add("p1", "opened", 5))
    await add("p2", "sent", 2)
    await add("p1", "opened", -1)
    async with db.connect() as conn:
        result = await conn.execute(select(counts.c.promotion_id, counts.c.measure, counts.c.value))
        got = {(r.promotion_id, r.measure): r.value for r in result}
    assert got == {("p1", "sent"): 20, ("p1", "opened"): 4, ("p2", "sent"): 2}


async def test_schemas_are_isolated(backend: Backend) -> None:
    first = backend.database("_a")
    second = backend.database("_b")
    md_first, items_first = items_table(first.schema)
    md_second, items_second = items_table(second.schema)
    await started(first, md_first)
    await started(second, md_second)

    async with first.begin() as conn:
        await conn.execute(items_first.insert().values(id="x", value=1))
    async with second.begin() as conn:
        await conn.execute(items_second.insert().values(id="x", value=2))
        await conn.execute(items_second.insert().values(id="y", value=3))

    assert await rows(first, items_first) == {"x": 1}
    assert await rows(second, items_second) == {"x": 2, "y": 3}
    if backend.name == "sqlite":
        # One file per schema beside the main file, as the migrations expect too.
        for db in (first, second):
            assert sqlite_schema_path(backend.url, db.schema).is_file()


async def test_concurrent_writers_never_see_locked(backend: Backend) -> None:
    db = backend.database(pool_size=5)
    metadata, items = items_table(db.schema)
    await started(db, metadata)

    async def write(i: int) -> None:
        async with db.begin() as conn:
            # Read, yield to the other writers, then write: the classic lock-upgrade hazard.
            count = await conn.scalar(select(func.count()).select_from(items))
            await asyncio.sleep(0)
            await conn.execute(items.insert().values(id=f"w{i}", value=int(count or 0)))

    async def read() -> int:
        async with db.connect() as conn:
            return int(await conn.scalar(select(func.count()).select_from(items)) or 0)

    results = await asyncio.gather(
        *(write(i) for i in range(50)), *(read() for _ in range(20)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    values = await rows(db, items)
    assert len(values) == 50
    if backend.name == "sqlite":
        # Serialised writers: each saw all the writes before it.
        assert sorted(values.values()) == list(range(50))


async def test_services_sharing_one_sqlite_file_write_concurrently(backend: Backend) -> None:
    """The embedded mode: four services, four schemas, one main file, all writing at once."""
    dbs = [backend.database(f"_{n}", pool_size=3) for n in range(4)]
    tables = []
    for db in dbs:
        metadata, items = items_table(db.schema)
        await started(db, metadata)
        tables.append(items)

    async def write(db: Database, items: Table, i: int) -> None:
        async with db.begin() as conn:
            await conn.execute(items.insert().values(id=f"w{i}", value=i))
            await asyncio.sleep(0.001)

    await asyncio.gather(
        *(write(db, items, i) for db, items in zip(dbs, tables, strict=True) for i in range(25))
    )
    for db, items in zip(dbs, tables, strict=True):
        assert len(await rows(db, items)) == 25


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_nested_begin_on_sqlite_raises_instead_of_hanging(backend: Backend) -> None:
    # PostgreSQL may nest: the inner begin() is simply a second connection.
    db = await started(backend.database())
    async with db.begin():
        with pytest.raises(RuntimeError, match="nested"):
            async with db.begin():
                pass
    async with db.begin() as conn:  # the lock was released
        await conn.execute(text("SELECT 1"))


async def test_ping(backend: Backend) -> None:
    db = backend.database()
    assert await db.ping() is False  # not started
    await db.start()
    assert await db.ping() is True
    await db.stop()
    assert await db.ping() is False


@pytest.mark.postgres
async def test_ping_is_bounded_when_the_server_is_away(postgres_url: str) -> None:
    refused = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none", "x")
    # A non-routable address: the connect hangs, the ping gives up.
    silent = Database("postgresql+asyncpg://postgres@10.255.255.1:5432/none", "x")
    for db in (refused, silent):
        await db.start()
        started_at = time.monotonic()
        assert await db.ping(timeout_s=0.5) is False
        assert time.monotonic() - started_at < 2.0
        await db.stop()


@pytest.mark.postgres
async def test_start_up_warns_of_a_slow_collation(
    postgres_url: str, fresh_postgres_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The project's databases compare text keys by bytes; another collation is named."""
    ours = Database(fresh_postgres_url, "x")
    await ours.start()
    with caplog.at_level("WARNING", logger="shared.db"):
        assert await ours.collation() == "C"
        await ours.warn_if_slow_collation()
    await ours.stop()
    assert caplog.records == []

    admin = create_async_engine(postgres_url, isolation_level="AUTOCOMMIT")
    name = f"t_{unique}_libc"
    async with admin.connect() as conn:
        await conn.execute(
            text(f"CREATE DATABASE \"{name}\" TEMPLATE template0 LC_COLLATE 'C.UTF-8'")
        )
    try:
        theirs = Database(make_url(postgres_url).set(database=name), "x")
        await theirs.start()
        with caplog.at_level("WARNING", logger="shared.db"):
            await theirs.warn_if_slow_collation()
        await theirs.stop()
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()
    [warning] = caplog.records
    assert "C.UTF-8" in warning.getMessage() and "LC_COLLATE 'C'" in warning.getMessage()

    # Nor does a database that is not there stop a service from starting.
    away = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none", "x")
    await away.start()
    await away.warn_if_slow_collation()
    await away.stop()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///:memory:",
        "sqlite+aiosqlite://",
        "sqlite:///:memory:",
        "sqlite+aiosqlite:///file::memory:?uri=true",
        "mysql+aiomysql://u@h/db",
    ],
)
def test_unusable_urls_are_refused(url: str) -> None:
    with pytest.raises(DatabaseConfigError):
        Database(url, "svc")


def test_bad_schema_names_are_refused(tmp_path: Path) -> None:
    for schema in ("", "Upper", "a-b", 'x"; drop', "1abc"):
        with pytest.raises(DatabaseConfigError):
            Database(f"sqlite+aiosqlite:///{tmp_path}/a.db", schema)


def test_sync_drivers_are_upgraded_to_async(tmp_path: Path) -> None:
    assert Database(f"sqlite:///{tmp_path}/a.db", "s").url.drivername == "sqlite+aiosqlite"
    assert Database("postgresql://u@h/db", "s").url.drivername == "postgresql+asyncpg"


# -- migrations ---------------------------------------------------------------------


async def table_names(db: Database) -> set[str]:
    async with db.connect() as conn:
        names = await conn.run_sync(lambda c: inspect(c).get_table_names(schema=db.schema))
    return set(names)


def schema_diff(connection: Any, metadata: MetaData) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    schema = metadata.schema

    def include_name(name: str | None, type_: str, parents: Any) -> bool:
        if type_ == "schema":
            return name == schema
        return name != "alembic_version"

    context = MigrationContext.configure(
        connection,
        opts={"include_schemas": True, "include_name": include_name, "compare_type": True},
    )
    return list(compare_metadata(context, metadata))


async def test_migrations_are_idempotent_and_live_in_the_schema(backend: Backend) -> None:
    db = backend.database()
    schema = db.schema
    assert await current_async(backend.url, schema, script_location=FAKE_MIGRATIONS) is None

    # The sync entry point (a CLI) runs its own loop: call it from a thread here.
    await asyncio.to_thread(upgrade, backend.url, schema, script_location=FAKE_MIGRATIONS)
    await asyncio.to_thread(upgrade, backend.url, schema, script_location=FAKE_MIGRATIONS)
    await upgrade_async(backend.url, schema, script_location=FAKE_MIGRATIONS)
    assert await current_async(backend.url, schema, script_location=FAKE_MIGRATIONS) == "0002"

    await db.start()
    assert await table_names(db) == {"alembic_version", "widgets", "outbox"}
    # The default schema (public / main) got nothing.
    async with db.connect() as conn:
        default_tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
    assert not {"alembic_version", "widgets", "outbox"} & set(default_tables)

    # The migrated tables work through Database and the outbox table definition.
    metadata = MetaData(schema=schema)
    outbox = outbox_table(metadata)
    widgets = Table(
        "widgets",
        metadata,
        Column("id", String(64), primary_key=True),
        Column("name", Text, nullable=False),
        Column("size", Integer, nullable=False, server_default="0"),
    )
    async with db.begin() as conn:
        await conn.execute(widgets.insert().values(id="w", name="W"))
        await conn.execute(
            outbox.insert().values(
                lane=0, topic="t", key="k", payload=b"{}", created_at=datetime.now(UTC)
            )
        )
    async with db.connect() as conn:
        assert await conn.scalar(select(widgets.c.size)) == 0
        # The migrated outbox is exactly `outbox_table` (columns, types, index).
        diff = await conn.run_sync(lambda c: schema_diff(c, metadata))
    assert diff == []

    # Down and up again.
    await db.stop()
    await downgrade_async(backend.url, schema, "0001", script_location=FAKE_MIGRATIONS)
    await db.start()
    assert await table_names(db) == {"alembic_version", "widgets"}
    await db.stop()
    await upgrade_async(backend.url, schema, script_location=FAKE_MIGRATIONS)
    await db.start()
    assert await table_names(db) == {"alembic_version", "widgets", "outbox"}


async def test_concurrent_upgrades_take_turns(backend: Backend) -> None:
    """Replicas starting together: on PostgreSQL an advisory lock serialises them."""
    db = backend.database()
    await asyncio.gather(
        *(upgrade_async(backend.url, db.schema, script_location=FAKE_MIGRATIONS) for _ in range(3))
    )
    assert await current_async(backend.url, db.schema, script_location=FAKE_MIGRATIONS) == "0002"


async def test_processes_migrating_at_once_all_succeed(backend: Backend) -> None:
    """Several processes (replicas, a CLI) migrating the same schema at the same moment."""
    db = backend.database()
    code = (
        "import sys\n"
        "from shared.migrations import upgrade\n"
        "upgrade(sys.argv[1], sys.argv[2], script_location=sys.argv[3])\n"
    )
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            backend.url,
            db.schema,
            str(FAKE_MIGRATIONS),
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results = await asyncio.gather(*(p.communicate() for p in processes))
    failures = [
        err.decode()[-600:]
        for p, (_, err) in zip(processes, results, strict=True)
        if p.returncode != 0
    ]
    assert failures == []
    assert await current_async(backend.url, db.schema, script_location=FAKE_MIGRATIONS) == "0002"


async def test_sqlite_migration_waits_for_another_process(tmp_path: Path) -> None:
    """A process migrating a SQLite database holds off every other one until it is done.

    (Without this, two processes opening a new file at once can get "database is
    locked" straight away: SQLite refuses to wait when waiting could deadlock.)
    """
    url = f"sqlite+aiosqlite:///{tmp_path}/afterglow.db"
    code = (
        "import fcntl, sys, time\n"
        "handle = open(sys.argv[1], 'a')\n"
        "fcntl.flock(handle, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        str(tmp_path / "afterglow.db.migrations.lock"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    assert await holder.stdout.readline() == b"held\n"
    migrating = asyncio.create_task(upgrade_async(url, "t_waits", script_location=FAKE_MIGRATIONS))
    await asyncio.sleep(0.5)
    assert not migrating.done()
    assert not (tmp_path / "afterglow.t_waits.db").exists()
    holder.stdin.write(b"done\n")
    await holder.wait()
    await asyncio.wait_for(migrating, 30)
    assert await current_async(url, "t_waits", script_location=FAKE_MIGRATIONS) == "0002"


async def test_revision_writes_plain_and_autogenerated_files(
    backend: Backend, tmp_path: Path
) -> None:
    location = tmp_path / "migrations"
    shutil.copytree(FAKE_MIGRATIONS, location, ignore=shutil.ignore_patterns("__pycache__"))
    schema = backend.database().schema
    await upgrade_async(backend.url, schema, script_location=location)

    def write(message: str, rev_id: str, autogenerate: bool) -> str:
        revision(
            backend.url,
            schema,
            message,
            autogenerate=autogenerate,
            script_location=location,
            rev_id=rev_id,
        )
        return (location / "versions" / f"{rev_id}_{message}.py").read_text()

    plain = await asyncio.to_thread(write, "plain", "0003", False)
    assert 'down_revision: str | Sequence[str] | None = "0002"' in plain
    await upgrade_async(backend.url, schema, script_location=location)
    # The fake env.py declares no tables: autogenerate proposes to drop the migrated ones,
    # in this schema only.
    auto = await asyncio.to_thread(write, "auto", "0004", True)
    assert f'op.drop_table("widgets", schema="{schema}")' in auto
    assert "alembic_version" not in auto


async def test_sync_upgrade_refuses_a_running_loop(backend: Backend) -> None:
    with pytest.raises(RuntimeError, match="upgrade_async"):
        upgrade(backend.url, backend.schema(), script_location=FAKE_MIGRATIONS)


def test_migrations_need_an_env_py(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        upgrade(f"sqlite+aiosqlite:///{tmp_path}/a.db", "svc", script_location=tmp_path)
