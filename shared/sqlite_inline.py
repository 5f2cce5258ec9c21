"""SQLite run on the event loop's own thread, for the embedded demo.

aiosqlite runs each connection in a thread of its own: every cursor call
(`cursor`, `execute`, `fetchall`, `close`, `commit`) is a queue put, a thread
wake-up and a reply through the loop's self-pipe, some 40 us each, where the
SQLite work of a small statement takes 1 to 3 us. A demo that writes a few
hundred thousand statements spends most of its time on those hops.

`connect()` gives what SQLAlchemy's aiosqlite dialect expects of an aiosqlite
connection (through `create_async_engine(async_creator=...)`), but its coroutines
run the sqlite3 call at once, on the calling thread. That is only safe where no
statement ever waits for a lock, as a wait would block the whole event loop:
one process, WAL (readers never wait), and one writer per file at a time, which
`shared.db.Database.begin()` guarantees per schema file. Hence an opt-in of the
embedded mode (`?inline=1` on the SQLite URL), never of processes that share files.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

INLINE_PARAM = "inline"


class InlineCursor:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    async def execute(self, sql: str, parameters: Any = None) -> InlineCursor:
        if parameters is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> InlineCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _RunNow:
    """Stands in for aiosqlite's request queue, which SQLAlchemy's dialect uses to set
    `isolation_level` on the connection's thread: here that thread is the caller's."""

    def put_nowait(self, item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)


class InlineConnection:
    """The subset of `aiosqlite.Connection` that SQLAlchemy's aiosqlite dialect calls."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._tx = _RunNow()

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    async def cursor(self) -> InlineCursor:
        return InlineCursor(self._conn.cursor())

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        return await InlineCursor(self._conn.cursor()).execute(sql, parameters)

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self._conn.close()

    def stop(self) -> None:
        """SQLAlchemy's terminate(): close at once (nothing runs elsewhere to wait for)."""
        self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)


async def connect(database: str) -> InlineConnection:
    # check_same_thread off: SQLAlchemy may close a pooled connection from a
    # garbage-collection callback; every statement still runs on the loop's thread.
    return InlineConnection(sqlite3.connect(database, check_same_thread=False))
