"""One database per service: PostgreSQL in production, SQLite for the embedded mode and tests.

Every service declares its tables with `MetaData(schema="<service>")` and uses
SQLAlchemy Core (Table, insert, select) over the `AsyncConnection` that
`Database.begin()` / `Database.connect()` yield.

- PostgreSQL (asyncpg): the schema is a real schema of the database; migrations
  create it (`shared.migrations`).
- SQLite (aiosqlite): the schema-qualified tables still work because every
  pooled connection ATTACHes `<dir>/<stem>.<schema>.db` (beside the URL's file)
  under the schema's name. Each connection gets WAL, a busy timeout and foreign
  keys. SQLite has one writer per file, so `begin()` serialises write
  transactions in-process with an asyncio.Lock: concurrent handlers queue
  instead of failing with "database is locked". Reads (`connect()`) never wait
  for it (WAL readers do not block the writer).

  Transactions use a deferred `BEGIN`, emitted by us (the sqlite3 module's own
  implicit transactions would run SELECTs and DDL outside any transaction).
  Not `BEGIN IMMEDIATE`: that write-locks every attached file *including the
  shared main file*, so the services of the embedded mode, which attach
  different schema files to the same main file, would block one another.

  In WAL mode a transaction is atomic per database file only, so a service must
  keep everything one transaction writes (its tables and its outbox) in its own
  schema - which the schema-qualified metadata does.

  `?inline=1` on the URL (the embedded demo) runs SQLite on the event loop's thread
  instead of aiosqlite's thread per connection: see `shared.sqlite_inline`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, MetaData, Table, event, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool, Pool
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeDecorator

from shared.sqlite_inline import INLINE_PARAM
from shared.sqlite_inline import connect as inline_connect

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000
PING_TIMEOUT_S = 2.0

# Every key here is text (ids, user ids), compared in every B-tree insert, lookup and sort.
# Under collation C PostgreSQL compares bytes (memcmp, abbreviated sort keys); under a libc
# collation such as "C.UTF-8" (the default of many clusters) it calls strcoll: about twice
# as slow in sorts and index builds, for the same order (UTF-8 bytes sort as code points).
# Measured: ingest +7%, metrics counting +9%, a rebuild 9% shorter. The project creates its
# databases so; an operator's database of another collation works, and start-up says so.
FAST_COLLATIONS = frozenset({"C", "POSIX"})


def create_database_sql(name: str) -> str:
    """`CREATE DATABASE` for a database of this project (collation C: `FAST_COLLATIONS`)."""
    if '"' in name:
        raise DatabaseConfigError(f"database name {name!r} must not contain a double quote")
    return f"CREATE DATABASE \"{name}\" TEMPLATE template0 LC_COLLATE 'C'"


_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class DatabaseConfigError(ValueError):
    """The URL or schema cannot be used (unsupported backend, in-memory SQLite, bad name)."""


def check_schema_name(schema: str) -> str:
    """Schema names end up in DDL, ATTACH statements and file names: keep them plain."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise DatabaseConfigError(
            f"schema name {schema!r} must match {_SCHEMA_NAME.pattern} "
            "(lower-case letters, digits and underscores)"
        )
    return schema


def async_url(url: str | URL) -> URL:
    """The URL with its async driver: postgresql -> asyncpg, sqlite -> aiosqlite.

    Refuses other backends and in-memory SQLite: every pooled connection would
    open a different empty database, and the ATTACHed schema file would have no
    directory to live in.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.get_driver_name() != "asyncpg":
            parsed = parsed.set(drivername="postgresql+asyncpg")
        return parsed
    if backend == "sqlite":
        database = parsed.database or ""
        if (
            database in ("", ":memory:")
            or database.startswith("file::memory:")
            or "mode=memory" in database
            or parsed.query.get("mode") == "memory"
        ):
            raise DatabaseConfigError(
                "in-memory SQLite is not supported: each pooled connection would see a "
                "different database; use a file, e.g. sqlite+aiosqlite:///./afterglow.db "
                "(tests: a file under tmp_path)"
            )
        if parsed.get_driver_name() != "aiosqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        return parsed
    raise DatabaseConfigError(
        f"unsupported database backend {backend!r}: use postgresql+asyncpg:// or "
        "sqlite+aiosqlite:///"
    )


def is_postgres_url(url: str | URL) -> bool:
    return async_url(url).get_backend_name() == "postgresql"


def sqlite_schema_path(url: str | URL, schema: str) -> Path:
    """The file that holds `schema` for a SQLite URL: `<dir>/<stem>.<schema>.db`."""
    parsed = async_url(url)
    if parsed.get_backend_name() != "sqlite":
        raise DatabaseConfigError("sqlite_schema_path needs a SQLite URL")
    main = Path(str(parsed.database))
    return main.parent / f"{main.stem}.{check_schema_name(schema)}.db"


def _install_sqlite_hooks(
    engine: AsyncEngine, url: URL, schema: str, *, begin_immediate: bool
) -> None:
    schema_file = sqlite_schema_path(url, schema)
    schema_file.parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # No implicit transactions from the driver; `_on_begin` emits BEGIN.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute(f'ATTACH DATABASE ? AS "{schema}"', (str(schema_file),))
            cursor.execute(f'PRAGMA "{schema}".journal_mode = WAL')
            cursor.execute(f'PRAGMA "{schema}".synchronous = NORMAL')
        finally:
            cursor.close()

    begin = "BEGIN IMMEDIATE" if begin_immediate else "BEGIN"

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


def make_engine(
    url: str | URL,
    schema: str,
    *,
    pool_size: int = 10,
    poolclass: type[Pool] | None = None,
    sqlite_begin_immediate: bool = False,
) -> AsyncEngine:
    """An async engine for one service schema (PostgreSQL or SQLite with the schema ATTACHed).

    `Database` uses it, and so do the migrations, so that both agree on file paths.
    `pool_size` is a hard cap (no overflow): connections per replica stay predictable.
    Isolation stays the default (READ COMMITTED on PostgreSQL): the outbox relies on it.
    `sqlite_begin_immediate` takes the write lock of every attached file at BEGIN, so that
    other processes wait (busy_timeout) instead of failing on a stale read; for migrations.
    """
    check_schema_name(schema)
    parsed = async_url(url)
    kwargs: dict[str, Any] = {}
    if poolclass is not None:
        kwargs["poolclass"] = poolclass
    if poolclass is not NullPool:
        kwargs.update(pool_size=pool_size, max_overflow=0)
    if parsed.get_backend_name() == "postgresql":
        if poolclass is not NullPool:
            kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {"server_settings": {"application_name": f"afterglow-{schema}"}}
        return create_async_engine(parsed, **kwargs)
    if INLINE_PARAM in parsed.query:
        # `?inline=1`: SQLite on the loop's thread (shared.sqlite_inline), for the embedded
        # demo; never for migrations, whose BEGIN IMMEDIATE may have to wait for another's.
        if parsed.query[INLINE_PARAM] in ("1", "true") and not sqlite_begin_immediate:
            kwargs["async_creator"] = partial(inline_connect, str(parsed.database))
        parsed = parsed.difference_update_query([INLINE_PARAM])
    engine = create_async_engine(parsed, **kwargs)
    _install_sqlite_hooks(engine, parsed, schema, begin_immediate=sqlite_begin_immediate)
    return engine


class Database:
    """The connection pool of one service, bound to its schema."""

    def __init__(self, url: str, schema: str, *, pool_size: int = 10) -> None:
        self.url = async_url(url)
        self.schema = check_schema_name(schema)
        self.pool_size = pool_size
        self._engine: AsyncEngine | None = None
        self._inline = self.is_sqlite and self.url.query.get(INLINE_PARAM) in ("1", "true")
        self._write_lock: asyncio.Lock | None = None
        self._lock_owner: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r}, {self.schema!r})"

    @property
    def is_postgres(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    @property
    def dialect_name(self) -> str:
        return self.url.get_backend_name()

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            raise RuntimeError(f"{self!r} is not started")
        return self._engine

    @property
    def started(self) -> bool:
        return self._engine is not None

    async def start(self) -> None:
        if self._engine is None:
            self._engine = make_engine(self.url, self.schema, pool_size=self.pool_size)
            # Created here, not in __init__, so that it belongs to the running loop.
            self._write_lock = asyncio.Lock()

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside a transaction: commit when the block ends, roll back on error.

        On SQLite write transactions of this Database run one at a time. Do not
        nest `begin()` in the same task on SQLite: the inner one would wait for
        the outer one forever, so it raises instead.
        """
        if not self.is_sqlite:
            async with self.engine.begin() as conn:
                yield conn
            return
        task = asyncio.current_task()
        if task is not None and self._lock_owner is task:
            raise RuntimeError(
                f"nested {self!r}.begin() in one task: SQLite has one writer, the inner "
                "transaction would wait for the outer one forever; pass the connection down"
            )
        lock = self._write_lock
        if lock is None:
            raise RuntimeError(f"{self!r} is not started")
        async with lock:
            self._lock_owner = task
            try:
                async with self._connection() as conn, conn.begin():
                    yield conn
            finally:
                self._lock_owner = None

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (rolled back when the block ends). Write with `begin()`."""
        async with self._connection() as conn:
            yield conn

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection]:
        if not self._inline:
            async with self.engine.connect() as conn:
                yield conn
            return
        # SQLite on the loop's thread: closing cannot be interrupted (it never suspends), so
        # it needs none of the task SQLAlchemy's __aexit__ closes in to survive a cancellation,
        # whose extra turn of the loop after every transaction let each outbox relay round
        # publish the events of one request at a time.
        conn = self.engine.connect()
        await conn.start()
        try:
            yield conn
        finally:
            await conn.close()

    async def ping(self, timeout_s: float = PING_TIMEOUT_S) -> bool:
        """Whether the database answers within `timeout_s` (for /readyz); never raises."""
        if self._engine is None:
            return False
        try:
            async with asyncio.timeout(timeout_s), self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            log.debug("database ping failed", exc_info=True)
            return False
        return True

    async def collation(self) -> str | None:
        """The database's collation on PostgreSQL (None on SQLite, which compares bytes)."""
        if not self.is_postgres:
            return None
        async with self.connect() as conn:
            value = await conn.scalar(
                text("SELECT datcollate FROM pg_database WHERE datname = current_database()")
            )
        return str(value)

    async def warn_if_slow_collation(self) -> None:
        """Log a warning when text keys compare by a slow collation (see `FAST_COLLATIONS`).

        Best effort: a database not answering yet is /readyz's business, not start-up's."""
        try:
            collation = await self.collation()
        except Exception:
            log.debug("could not read the database's collation", exc_info=True)
            return
        if collation is not None and collation not in FAST_COLLATIONS:
            log.warning(
                "the database's collation is %s, not C: text keys compare about twice as "
                "slowly; create the database with LC_COLLATE 'C' (same order for UTF-8)",
                collation,
                extra={"collation": collation},
            )

    async def create_schema(self) -> None:
        """CREATE SCHEMA IF NOT EXISTS on PostgreSQL; SQLite creates the file on ATTACH."""
        if self.is_postgres:
            async with self.begin() as conn:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))

    async def drop_schema(self) -> None:
        """Drop the schema and everything in it (tests). SQLite: drop every table in it."""
        if self.is_postgres:
            async with self.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            return
        async with self.begin() as conn:
            rows = await conn.execute(
                text(f"SELECT name FROM \"{self.schema}\".sqlite_master WHERE type = 'table'")
            )
            for (name,) in rows.all():
                if not str(name).startswith("sqlite_"):
                    await conn.execute(text(f'DROP TABLE IF EXISTS "{self.schema}"."{name}"'))

    async def create_all(self, metadata: MetaData) -> None:
        """Create the schema and the metadata's tables without migrations (tests, prototypes)."""
        await self.create_schema()
        async with self.begin() as conn:
            await conn.run_sync(metadata.create_all)


# -- portable upserts ------------------------------------------------------------
#
# PostgreSQL and SQLite (>= 3.24) share the ON CONFLICT syntax, and SQLAlchemy's
# SQLite compiler renders the PostgreSQL `insert()` construct's ON CONFLICT
# clauses exactly like its own (tests run them on both databases). So these
# helpers need no dialect and can be built at import time or in a handler alike.


def insert_ignore(table: Table) -> Insert:
    """INSERT ... ON CONFLICT DO NOTHING; execute with `.values(...)` or a list of rows.

    The result's rowcount tells whether a single row was new (1) or already there (0).
    """
    return postgresql.insert(table).on_conflict_do_nothing()


def upsert(
    table: Table,
    index_elements: Sequence[str],
    set_: Sequence[str] | Mapping[str, Any] | None = None,
) -> Insert:
    """INSERT ... ON CONFLICT (index_elements) DO UPDATE.

    `set_`: column names to take from the proposed row (`excluded`), or a mapping
    of column name to value/expression (over the existing row, e.g.
    `{"n": table.c.n + 1}`), or None for every column not in `index_elements`.
    Execute with `.values(...)` or a list of rows.
    """
    stmt = postgresql.insert(table)
    if set_ is None:
        keys = set(index_elements)
        set_ = [c.name for c in table.columns if c.name not in keys]
    if isinstance(set_, Mapping):
        assignments = dict(set_)
    else:
        assignments = {name: stmt.excluded[name] for name in set_}
    if not assignments:
        return stmt.on_conflict_do_nothing(index_elements=list(index_elements))
    return stmt.on_conflict_do_update(index_elements=list(index_elements), set_=assignments)


def upsert_add(table: Table, key: Mapping[str, Any], column: str, amount: Any) -> Insert:
    """A counter: insert `key` with `column = amount`, or add `amount` to the existing row.

    `key` holds the values of the conflict target (the primary key or a unique index).
    """
    stmt = postgresql.insert(table).values({**key, column: amount})
    return stmt.on_conflict_do_update(
        index_elements=list(key),
        set_={column: table.c[column] + stmt.excluded[column]},
    )


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on both dialects.

    PostgreSQL stores TIMESTAMPTZ; SQLite has no time zones, so the value is
    stored as naive UTC and read back as aware UTC. Naive input is refused.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
