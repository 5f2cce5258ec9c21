"""The transactional outbox: a database change and the events it causes commit together.

A handler writes its rows and calls `Outbox.add(conn, events, now=...)` on the
same connection, inside the same transaction; after the commit it calls
`Outbox.notify()`. The relay (`Outbox.run()`, started by `start()`) publishes
the stored messages and deletes them afterwards. A crash between the commit and
the publish loses nothing: the rows are still there and the next relay - in
this process after a restart, or in another replica - publishes them. Events
are therefore published *at least once* (a publish that succeeded but whose
delete did not commit is repeated); consumers are idempotent.

Per-key order, and why lanes and advisory locks keep it with several replicas
-----------------------------------------------------------------------------
Every row gets a lane, `crc32(key) % lanes`, so all events of one key are in
the same lane, in id order (ids grow with insertion; a transaction that is
serialised after another one for the same key - by a row lock on the key's
state - inserts its outbox rows after that one committed, so they get larger
ids; call `add()` after the writes that lock the key's state).

One relay at a time owns a lane: on PostgreSQL the lane's transaction starts
with `pg_try_advisory_xact_lock(hash(schema.table, lane))`; a replica that
does not get it skips the lane this round. The owner reads the oldest rows of
the lane by id, publishes them in that order (the bus keeps the order of
messages with the same key), deletes exactly those ids and commits, which
releases the lock. The next owner's SELECT runs after that commit (READ
COMMITTED takes a snapshot per statement, after the lock was granted), so it
sees the deletions: it neither republishes nor overtakes the previous batch.
Two replicas therefore never publish the same lane concurrently, and a key's
events leave in id order. On PostgreSQL a round takes, in one transaction,
every lane whose lock it gets, reads their oldest rows by id (so each lane's
share is a prefix of that lane), publishes them in one call and deletes them:
one broker round trip and one commit a round instead of one per lane. Lanes
let replicas share the work (different lanes in parallel) while the per-lane
lock keeps each key serial.

Ids come from a sequence when the row is inserted, and transactions may
commit out of id order: a row whose id is smaller than one already published
can become visible later, and is then published later. That only reorders
events of transactions that ran concurrently without touching a common row -
events that had no order between them to begin with.

Rows are deleted by id, never by "id <= max": a row with a smaller id whose
transaction committed after the SELECT must not be deleted unpublished.

Changing the number of lanes is safe for delivery (the relay reads the lanes
that have rows, not `range(lanes)`), but while old rows drain, a key may have
events in two lanes, which two replicas may then publish concurrently.

On SQLite (one process) no advisory lock is needed: `Database.begin()`
serialises the lane transactions of this process.

Vacuuming
---------
On PostgreSQL a deleted row stays in the heap and in the (lane, id) index until the table
is vacuumed, and every relay round reads each lane from its oldest entry: past all of
them. Autovacuum visits a table at most once a minute (`autovacuum_naptime`), by which
time a busy outbox has hundreds of thousands of dead rows in front of its live ones. So
the relay vacuums the table itself each time it has deleted `vacuum_rows` rows, in the
background (`VACUUM (SKIP_LOCKED)`: a replica or autovacuum already at it is left to
finish). Measured with the scheduling benchmark at 1,000,000 participants (855,741
touch.due at 10,000/s): PostgreSQL's CPU per due touch went from 110.9 to 72.0 us, the
p99 from due time to Kafka from 17.4 s to 0.57 s (a vacuum every 10,000 rows took
about 50 to 170 ms, off the relay's path).

Packed rows
-----------
A row may hold many messages of one topic and lane (`add_packed`, or an INSERT that
aggregates with `pack_sql`): `pack` holds their keys and values in order, `messages`
how many. The relay unpacks them in place of the row, so the order rules above hold
for them as for one message; a round takes rows while the messages before them are
fewer than its batch. Writing and deleting one row for hundreds of messages is what
makes a busy producer cheap for PostgreSQL. Packed messages carry no headers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    delete,
    distinct,
    func,
    select,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.bus.base import Bus, Headers, OutMessage, PublishError
from shared.db import Database, UtcDateTime
from shared.events import EventData, encode

log = logging.getLogger(__name__)

DEFAULT_TABLE = "outbox"
MAX_BACKOFF_S = 5.0
_DELETE_CHUNK = 500
DEFAULT_VACUUM_ROWS = 10_000
_CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")
# The lanes (of those asked) whose transaction lock this transaction got.
_TRY_LOCK_LANES = text(
    "SELECT lane FROM unnest(CAST(:lanes AS smallint[]), CAST(:keys AS bigint[])) AS l(lane, key)"
    " WHERE pg_try_advisory_xact_lock(key)"
)


def outbox_columns(*, packs: bool = True) -> list[Column[Any]]:
    """Fresh Column objects of the outbox (for `outbox_table` and the migrations).

    `packs=False`: the columns before packed rows (`outbox_pack_columns`) were added, as
    the first migration of each service created them.
    """
    return [
        # Integer on SQLite: only an INTEGER PRIMARY KEY is the autoincrementing rowid.
        Column(
            "id",
            BigInteger().with_variant(Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        Column("lane", SmallInteger, nullable=False),
        Column("topic", Text, nullable=False),
        # NULL in a packed row (see `outbox_pack_columns`), never otherwise.
        Column("key", Text, nullable=packs),
        Column("payload", LargeBinary, nullable=packs),
        # [[name, base64(value)], ...] or NULL when there are none.
        Column("headers", JSON, nullable=True),
        Column("created_at", UtcDateTime, nullable=False),
        *(outbox_pack_columns() if packs else []),
    ]


def outbox_pack_columns() -> list[Column[Any]]:
    """A packed row holds `messages` messages of one topic and lane in `pack` (see `pack`);
    its `key` and `payload` are NULL. Any other row is one message (`messages` is 1).

    NULL, not empty: a replica of the version before packs, still relaying during a rolling
    update, then fails on the row (its `bytes(payload)` raises) and rolls back, leaving it
    to the new replicas. With empty values it would publish an empty message and delete
    the row, losing the events packed in it."""
    return [
        Column("pack", LargeBinary, nullable=True),
        Column("messages", Integer, nullable=False, server_default=text("1")),
    ]


def outbox_index_name(table: str = DEFAULT_TABLE) -> str:
    return f"ix_{table}_lane_id"


# SQLite AUTOINCREMENT: ids never go back, even after the table was emptied.
OUTBOX_TABLE_KWARGS: dict[str, Any] = {"sqlite_autoincrement": True}


def outbox_table(metadata: MetaData, name: str = DEFAULT_TABLE) -> Table:
    """The outbox table in the service's schema (the metadata's schema)."""
    return Table(
        name,
        metadata,
        *outbox_columns(),
        Index(outbox_index_name(name), "lane", "id"),
        **OUTBOX_TABLE_KWARGS,
    )


def lane_for(key: str, lanes: int) -> int:
    """Stable across processes and restarts (unlike hash())."""
    return zlib.crc32(key.encode()) % lanes


def lane_lock_key(schema: str | None, table: str, lane: int) -> int:
    """A stable signed 64-bit key for pg_advisory locks on one lane of one outbox table."""
    digest = hashlib.blake2b(
        f"afterglow-outbox:{schema}.{table}:{lane}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


_LENGTH = struct.Struct(">I")
# The 4-byte length in front of each key and value of a pack: for writers that build packs
# themselves (planning, inside its COPY data).
pack_length: Callable[[int], bytes] = _LENGTH.pack


def pack(messages: Iterable[tuple[str, bytes]]) -> bytes:
    """(key, value) pairs as the `pack` of an outbox row: for each, the key's UTF-8 length
    (4 bytes, big-endian), the key, the value's length (same), the value."""
    parts: list[bytes] = []
    length = pack_length
    for key, value in messages:
        raw = key.encode()
        parts += (length(len(raw)), raw, length(len(value)), value)
    return b"".join(parts)


def pack_sql(key: str, value: str, order: str) -> str:
    """The PostgreSQL aggregate that writes `pack`'s layout from rows: `key` a text
    expression, `value` a bytea one, packed in `order` (an ORDER BY list)."""
    k = f"convert_to({key}, 'UTF8')"
    return (
        f"string_agg(int4send(octet_length({k})) || {k} || int4send(octet_length({value}))"
        f" || {value}, ''::bytea ORDER BY {order})"
    )


def unpack(blob: bytes) -> list[tuple[str, bytes]]:
    """The (key, value) pairs of a `pack`; ValueError when it is cut short or overruns."""
    out: list[tuple[str, bytes]] = []
    read = _LENGTH.unpack_from
    end = len(blob)
    at = 0
    try:
        while at < end:
            (n,) = read(blob, at)
            key = blob[at + 4 : at + 4 + n].decode()
            at += 4 + n
            (n,) = read(blob, at)
            value = blob[at + 4 : at + 4 + n]
            at += 4 + n
            out.append((key, value))
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed outbox pack at byte {at} of {end}: {exc}") from None
    if at != end:
        raise ValueError(f"outbox pack overruns its {end} bytes (ends at {at})")
    return out


def _encode_headers(headers: Headers) -> list[list[str]] | None:
    if not headers:
        return None
    return [[name, base64.b64encode(value).decode("ascii")] for name, value in headers]


def _decode_headers(raw: Any) -> Headers:
    if not raw:
        return ()
    return tuple((str(name), base64.b64decode(value)) for name, value in raw)


class Outbox:
    """Stores events inside the caller's transaction and relays them to the bus afterwards."""

    def __init__(
        self,
        db: Database,
        table: Table,
        bus: Bus,
        *,
        source: str,
        topic_name: Callable[[str], str] = lambda t: t,
        lanes: int = 8,
        batch: int = 500,
        poll_s: float = 0.5,
        max_backoff_s: float = MAX_BACKOFF_S,
        vacuum_rows: int = DEFAULT_VACUUM_ROWS,
    ) -> None:
        if lanes < 1 or lanes > 32767:
            raise ValueError("lanes must be between 1 and 32767")
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if vacuum_rows < 0:
            raise ValueError("vacuum_rows must be 0 (never) or more")
        self.db = db
        self.table = table
        self.bus = bus
        self.source = source
        self.topic_name = topic_name
        self.lanes = lanes
        self.batch = batch
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        # PostgreSQL: vacuum the table after this many rows were deleted (0: leave it to
        # autovacuum).
        self.vacuum_rows = vacuum_rows
        # For tests and metrics: how the last round ended, and counters.
        self.last_error: BaseException | None = None
        self.published_total = 0
        self.errors_total = 0
        self.vacuums_total = 0
        self._deleted_since_vacuum = 0
        self._vacuum_task: asyncio.Task[None] | None = None
        # Each lane's oldest rows, while the messages before them are fewer than `batch`
        # (a packed row holds many): a lane's published rows are always a prefix of it in
        # id order. The packs of the rows left are never read (PostgreSQL reads a stored
        # value only when it is returned).
        self._oldest_of_lanes = text(
            "SELECT o.id, o.lane, o.topic, o.key, o.payload, o.headers, o.pack"
            " FROM unnest(CAST(:lanes AS smallint[])) AS l(lane) CROSS JOIN LATERAL ("
            " SELECT id, lane, topic, key, payload, headers, pack, messages,"
            " sum(messages) OVER (ORDER BY id) AS upto"
            f" FROM {table.fullname} WHERE lane = l.lane ORDER BY id LIMIT :batch) AS o"
            " WHERE o.upto - o.messages < :batch ORDER BY o.id"
        )
        self._delete_lane_ids = text(
            f"DELETE FROM {table.fullname} WHERE lane = :lane AND id BETWEEN :first AND :last"
            " AND id = ANY(CAST(:ids AS bigint[]))"
        )
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # -- producing ---------------------------------------------------------

    async def add(
        self, conn: AsyncConnection, events: Sequence[EventData], *, now: datetime
    ) -> None:
        """Store `events` in the caller's transaction; they are published after it commits."""
        if not events:
            return
        messages = [
            OutMessage(
                topic=self.topic_name(data.topic),
                key=data.partition_key(),
                value=encode(data, source=self.source, time=now),
            )
            for data in events
        ]
        await self.add_messages(conn, messages, now=now)

    async def add_messages(
        self,
        conn: AsyncConnection,
        messages: Sequence[OutMessage],
        *,
        now: datetime | None = None,
    ) -> None:
        """Store already-encoded messages (topic as published, key, value, headers)."""
        if not messages:
            return
        created_at = now or datetime.now(UTC)
        rows = [
            {
                "lane": lane_for(m.key, self.lanes),
                "topic": m.topic,
                "key": m.key,
                "payload": m.value,
                "headers": _encode_headers(m.headers),
                "created_at": created_at,
            }
            for m in messages
        ]
        # One statement, executed for all rows in order (ids follow list order).
        await conn.execute(self.table.insert(), rows)

    async def add_packed(
        self,
        conn: AsyncConnection,
        messages: Sequence[OutMessage],
        *,
        now: datetime | None = None,
    ) -> None:
        """Like `add_messages` (headers aside: packed messages have none), but one row for
        each topic and lane instead of one per message: less for the database to write and
        delete. Each key keeps its order (a key has one lane)."""
        if not messages:
            return
        groups: dict[tuple[str, int], list[OutMessage]] = {}
        for m in messages:
            if m.headers:
                raise ValueError("packed outbox messages cannot carry headers")
            groups.setdefault((m.topic, lane_for(m.key, self.lanes)), []).append(m)
        created_at = now or datetime.now(UTC)
        rows = [
            {
                "lane": lane,
                "topic": topic,
                "key": None,
                "payload": None,
                "headers": None,
                "pack": pack((m.key, m.value) for m in group),
                "messages": len(group),
                "created_at": created_at,
            }
            for (topic, lane), group in groups.items()
        ]
        await conn.execute(self.table.insert(), rows)

    def notify(self) -> None:
        """Wake the relay; call after the transaction that added events committed."""
        self._wake.set()

    # -- relaying ----------------------------------------------------------

    async def pending(self) -> int:
        """How many messages wait (a packed row counts its messages)."""
        async with self.db.connect() as conn:
            count = await conn.scalar(select(func.sum(self.table.c.messages)))
        return int(count or 0)

    async def _lanes_with_rows(self) -> list[int]:
        async with self.db.connect() as conn:
            if self.db.is_postgres:
                # One (lane, id) index probe per lane: DISTINCT read the whole index (and the
                # heap behind fresh rows) every round, ~1 s behind a backlog of millions.
                t = self.table.fullname
                result = await conn.execute(
                    text(
                        f"WITH RECURSIVE l(lane) AS (SELECT min(lane) FROM {t} UNION ALL"
                        f" SELECT (SELECT min(lane) FROM {t} WHERE lane > l.lane) FROM l"
                        " WHERE l.lane IS NOT NULL) SELECT lane FROM l WHERE lane IS NOT NULL"
                    )
                )
            else:
                result = await conn.execute(select(distinct(self.table.c.lane)))
            return sorted(int(lane) for (lane,) in result.all())

    async def relay_once(self) -> int:
        """Publish the oldest messages of every lane (up to `batch` a lane, on average:
        on PostgreSQL the lanes go together); return how many.

        Database errors propagate. A PublishError leaves the lanes' rows in place
        and ends this round with what was published so far; `last_error` tells
        how the last round ended (None: fine).
        """
        published = 0
        try:
            lanes = await self._lanes_with_rows()
            if self.db.is_postgres and len(lanes) > 1:
                # One transaction for every lane it can lock: one publish and one commit a
                # round, instead of one per lane, each waiting for the broker in turn.
                rounds: list[list[int]] = [lanes]
            else:
                rounds = [[lane] for lane in lanes]
            for owned in rounds:
                try:
                    count = await self._relay_lanes(owned)
                except PublishError as exc:
                    self._failed(exc)
                    log.warning(
                        "outbox publish failed; messages stay in the outbox",
                        extra={"table": self.table.fullname, "lanes": owned, "error": str(exc)},
                    )
                    return published
                published += count
                self.published_total += count
        except Exception as exc:
            self._failed(exc)
            raise
        finally:
            self._maybe_vacuum()
        self.last_error = None
        return published

    def _maybe_vacuum(self) -> None:
        """Start a background vacuum once `vacuum_rows` rows were deleted since the last
        one (at most one at a time)."""
        if self._stopping or not self.vacuum_rows:
            return
        if self._deleted_since_vacuum < self.vacuum_rows:
            return
        if self._vacuum_task is not None and not self._vacuum_task.done():
            return
        self._deleted_since_vacuum = 0
        self._vacuum_task = asyncio.create_task(
            self.vacuum(), name=f"outbox-vacuum:{self.table.fullname}"
        )

    async def vacuumed(self) -> None:
        """Wait for the background vacuum in progress, if any."""
        if self._vacuum_task is not None:
            await asyncio.wait({self._vacuum_task})

    async def vacuum(self) -> None:
        """VACUUM the outbox table (PostgreSQL; nothing elsewhere). Skipped when another
        session is vacuuming it; errors are logged, never raised: autovacuum remains."""
        if not self.db.is_postgres:
            return
        try:
            async with self.db.engine.connect() as conn:
                # VACUUM cannot run inside a transaction block.
                auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await auto.execute(text(f"VACUUM (SKIP_LOCKED) {self.table.fullname}"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "outbox vacuum failed; autovacuum will clean up",
                extra={"table": self.table.fullname, "error": repr(exc)},
            )
            return
        self.vacuums_total += 1

    def _failed(self, exc: BaseException) -> None:
        self.last_error = exc
        self.errors_total += 1

    async def _relay_lanes(self, lanes: list[int]) -> int:
        """Publish the oldest rows of these lanes (up to `batch` a lane) in one transaction
        that owns each lane it publishes (PostgreSQL: a lane another relay holds is skipped)."""
        t = self.table
        async with self.db.begin() as conn:
            if self.db.is_postgres:
                # Plan this round's statements for the arrays they are given (a scan then
                # hashes an array instead of comparing every row with every element).
                await conn.execute(_CUSTOM_PLANS)
                keys = [lane_lock_key(t.schema, t.name, lane) for lane in lanes]
                # Try-locks never wait, so taking several in one statement cannot deadlock.
                result = await conn.execute(_TRY_LOCK_LANES, {"lanes": lanes, "keys": keys})
                lanes = [int(lane) for lane in result.scalars()]
                if not lanes:
                    return 0
                # Each lane's oldest rows through the (lane, id) index, in id order: what a
                # round reads stays in proportion to what it relays, whatever the planner
                # believes of the table (with every lane in one scan, a table whose
                # statistics said "empty" was read whole, then sorted, every round).
                result = await conn.execute(
                    self._oldest_of_lanes, {"lanes": lanes, "batch": self.batch}
                )
            else:
                # By id: within each lane the oldest first, so a lane's published rows are
                # always a prefix of it in id order, whatever the other lanes hold. Rows are
                # taken while the messages before them are fewer than `batch` a lane (a
                # packed row holds many).
                cap = self.batch * len(lanes)
                oldest = (
                    select(
                        t.c.id,
                        t.c.lane,
                        t.c.topic,
                        t.c.key,
                        t.c.payload,
                        t.c.headers,
                        t.c.pack,
                        t.c.messages,
                        func.sum(t.c.messages).over(order_by=t.c.id).label("upto"),
                    )
                    .where(t.c.lane.in_(lanes))
                    .order_by(t.c.id)
                    .limit(cap)
                    .subquery()
                )
                result = await conn.execute(
                    select(
                        oldest.c.id,
                        oldest.c.lane,
                        oldest.c.topic,
                        oldest.c.key,
                        oldest.c.payload,
                        oldest.c.headers,
                        oldest.c.pack,
                    )
                    .where(oldest.c.upto - oldest.c.messages < cap)
                    .order_by(oldest.c.id)
                )
            rows = result.all()
            if not rows:
                return 0
            messages: list[OutMessage] = []
            for _, _, topic, key, payload, headers, packed in rows:
                if packed is not None:
                    messages += (OutMessage(topic, k, v) for k, v in unpack(bytes(packed)))
                    continue
                messages.append(
                    OutMessage(
                        topic,
                        key,
                        payload if type(payload) is bytes else bytes(payload),
                        _decode_headers(headers) if headers else (),
                    )
                )
            # Raises PublishError: the transaction rolls back and the rows stay. (On
            # SQLite this holds the service's write lock while publishing: fine for the
            # in-process bus of the embedded mode, bounded by the send timeout otherwise.)
            await self.bus.publish(messages)
            if self.db.is_postgres:
                # Each lane's ids in one array parameter (an IN list renders a bind per id),
                # with the lane and the ids' range. By id alone, a table whose statistics
                # still said "empty" (vacuumed when it was, not analyzed since) had its
                # DELETE planned on the (lane, id) index, walked whole once per id: 53 to
                # 215 s for 16,000 ids behind a backlog of 600,000 rows. The lane and the
                # range bound what any index reads to the lane's rows being deleted.
                by_lane: dict[int, list[int]] = {}
                for row in rows:
                    by_lane.setdefault(row[1], []).append(row[0])
                await conn.execute(
                    self._delete_lane_ids,
                    [
                        {"lane": lane, "first": ids[0], "last": ids[-1], "ids": ids}
                        for lane, ids in by_lane.items()
                    ],
                )
                self._deleted_since_vacuum += len(rows)
                return len(messages)
            ids = [row[0] for row in rows]
            for start in range(0, len(ids), _DELETE_CHUNK):
                await conn.execute(delete(t).where(t.c.id.in_(ids[start : start + _DELETE_CHUNK])))
        return len(messages)

    async def run(self) -> None:
        """Relay until `stop()`: again at once while there is work, else on notify() or poll_s.

        Errors (database down, broker down) are logged and retried after a
        doubling back-off capped at `max_backoff_s`; the loop never gives up.
        """
        failures = 0
        while not self._stopping:
            self._wake.clear()
            try:
                published = await self.relay_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                published = 0
                log.warning(
                    "outbox relay failed; retrying",
                    extra={"table": self.table.fullname, "error": repr(exc)},
                    exc_info=True,
                )
            if self.last_error is not None:
                failures += 1
                await self._sleep(min(self.max_backoff_s, 0.05 * 2 ** min(failures - 1, 16)))
                continue
            failures = 0
            if published:
                continue
            await self._sleep(self.poll_s)

    async def _sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less if notify() or stop() happens."""
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def start(self) -> None:
        """Start the relay loop (it first relays what an earlier process left behind)."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.create_task(self.run(), name=f"outbox:{self.table.fullname}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the loop, then relay what is left once (best effort, bounded by `timeout_s`)."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            # Let the round in progress finish (its transaction commits or rolls back)...
            await asyncio.wait({task}, timeout=timeout_s)
            if not task.done():
                # ... or cut it short: a cancelled lane transaction rolls back, rows stay.
                task.cancel()
                await asyncio.wait({task})
        try:
            async with asyncio.timeout(timeout_s):
                while await self.relay_once() and self.last_error is None:
                    pass
        except Exception as exc:
            log.warning(
                "outbox: final relay at stop did not finish; the rest is published after restart",
                extra={"table": self.table.fullname, "error": repr(exc)},
            )
        # A vacuum cut short is harmless: the next one, or autovacuum, does it.
        vacuum, self._vacuum_task = self._vacuum_task, None
        if vacuum is not None and not vacuum.done():
            vacuum.cancel()
            await asyncio.wait({vacuum})
