"""Metrics' event handlers: per-minute aggregates and last-touch attribution.

Every batch runs in one transaction: the event ids are recorded first (ON CONFLICT
DO NOTHING ... RETURNING), so only new events count and a redelivered or replayed
event never doubles a number. Counts are summed in memory and written with one
bulk upsert per batch.

Out-of-order events stay exact:
- a touch counted before its touch.planned (which carries the segment) is counted
  under segment "" and remembered with the touch (its `pending` column); touch.planned
  moves those counts;
- a purchase is credited to the user's latest exposure (touch sent, or suppressed
  for the holdout) at or before it and within the window; an exposure that arrives
  after purchases it should own takes them over from the older exposure.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from prometheus_client import Counter
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    String,
    Table,
    TextClause,
    any_,
    bindparam,
    select,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from services.metrics import store
from services.metrics.config import MetricsSettings
from shared.db import UtcDateTime, insert_ignore, upsert
from shared.events import (
    ActivityRecorded,
    AudienceMemberResolved,
    DeliveryFailed,
    DeliverySent,
    EngagementRecorded,
    Event,
    TouchEvent,
    TouchPlanned,
    TouchSuppressed,
)
from shared.service import ServiceContext

log = logging.getLogger(__name__)

HANDLED = (
    AudienceMemberResolved,
    TouchPlanned,
    TouchSuppressed,
    DeliverySent,
    DeliveryFailed,
    EngagementRecorded,
    ActivityRecorded,
)

# promotion, minute (minutes since the epoch), wave, channel, segment, variant, measure
Key = tuple[str, int, str, str, str, str, str]


def minute_of(at: datetime) -> int:
    """`at`'s minute as whole minutes since the epoch: an int keys, hashes and sorts several
    times faster than an aware datetime (whose every comparison asks its offset)."""
    return int(at.timestamp()) // 60


@functools.lru_cache(maxsize=4096)
def minute_at(minute: int) -> datetime:
    """The UTC datetime of a minute_of value."""
    return datetime.fromtimestamp(minute * 60, UTC)


def settings_of(ctx: ServiceContext) -> MetricsSettings:
    settings = ctx.extras.get("metrics_settings")
    if not isinstance(settings, MetricsSettings):
        settings = MetricsSettings()
        ctx.extras["metrics_settings"] = settings
    return settings


def window_of(ctx: ServiceContext) -> timedelta:
    return settings_of(ctx).attribution_window


_SEEN = (
    postgresql.insert(store.seen_events)
    .on_conflict_do_nothing()
    .returning(store.seen_events.c.event_id)
)
_COUNTS = store.minute_counts
_MEASURE_COLUMNS = [store.measure_column(m) for m in store.MEASURES]
# Measure name -> its column (dots are not valid in unquoted column names).
_COLUMN = dict(zip(store.MEASURES, _MEASURE_COLUMNS, strict=True))
_ADD = postgresql.insert(_COUNTS)
_ADD = _ADD.on_conflict_do_update(
    index_elements=list(store.COUNT_KEY),
    set_={c: _COUNTS.c[c] + _ADD.excluded[c] for c in _MEASURE_COLUMNS},
)
_SAVE_TOUCH = upsert(store.touches, ["touch_id"])


def _pg_type(column: Column[Any]) -> str:
    if isinstance(column.type, UtcDateTime):
        return "timestamptz"
    if isinstance(column.type, BigInteger):
        return "int8"
    if isinstance(column.type, Float):
        return "float8"
    return "varchar"


def arrays_insert(table: Table, conflict: str) -> tuple[TextClause, list[str]]:
    """PostgreSQL's bulk form: INSERT ... SELECT ... FROM json_to_recordset(:rows) `conflict`;
    bind the rows as one JSON text. One statement and one parameter: far cheaper to send and
    plan than thousands of VALUES rows, and cheaper to encode than one array per column
    (asyncpg checks every element of an array parameter in Python)."""
    names = [c.name for c in table.columns]
    columns = ", ".join(f"{c.name} {_pg_type(c)}" for c in table.columns)
    sql = (
        f"INSERT INTO {table.fullname} ({', '.join(names)}) SELECT {', '.join(names)}"
        f" FROM json_to_recordset(CAST(:rows AS json)) AS r({columns}) "
    )
    return text(sql + conflict), names


def _update_all(table: Table, key: Sequence[str]) -> str:
    sets = ", ".join(f"{c.name} = EXCLUDED.{c.name}" for c in table.columns if c.name not in key)
    return f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}"


def _add_counts_sql() -> tuple[TextClause, list[str]]:
    """The bulk form of _ADD on PostgreSQL (see arrays_insert): a row's JSON object holds only
    the measures it changes, a missing one reads as NULL, taken as 0."""
    names = [c.name for c in _COUNTS.columns]
    columns = ", ".join(f"{c.name} {_pg_type(c)}" for c in _COUNTS.columns)
    values = [*store.COUNT_KEY, *(f"COALESCE({c}, 0)" for c in _MEASURE_COLUMNS)]
    adds = ", ".join(f"{c} = {_COUNTS.fullname}.{c} + EXCLUDED.{c}" for c in _MEASURE_COLUMNS)
    sql = (
        f"INSERT INTO {_COUNTS.fullname} ({', '.join(names)}) SELECT {', '.join(values)}"
        f" FROM json_to_recordset(CAST(:rows AS json)) AS r({columns})"
        f" ON CONFLICT ({', '.join(store.COUNT_KEY)}) DO UPDATE SET {adds}"
    )
    return text(sql), names


_ADD_ARRAYS = _add_counts_sql()
# The ids as one JSON array of strings, in its order, all with one time (see `apply`): a
# fifth cheaper for PostgreSQL than a JSON object per id with its own time (4.9 against
# 6.2 us per id, 20,000 ids per statement), and a third of the encoding in the process.
# The statement answers with one row: how many ids were new and, only when some were not,
# which. Nearly always all are, and then no id comes back to be read (about 1 us per event
# in the process, as many rows as events sent back by the server).
_SEEN_NEW = text(
    f"WITH new AS (INSERT INTO {store.seen_events.fullname} (event_id, seen_at)"
    " SELECT e, CAST(:at AS timestamptz) FROM json_array_elements_text(CAST(:ids AS json)) AS e"
    " ON CONFLICT DO NOTHING RETURNING event_id)"
    " SELECT count(*), CASE WHEN count(*) < :n THEN array_agg(event_id) END FROM new"
)
_SAVE_TOUCH_ARRAYS = arrays_insert(store.touches, _update_all(store.touches, ["touch_id"]))
_SAVE_PURCHASE_ARRAYS = arrays_insert(
    store.purchases, "ON CONFLICT (activity_id) DO UPDATE SET touch_id = EXCLUDED.touch_id"
)


# Column names may be str subclasses; a naive datetime is taken as UTC (as asyncpg does).
_JSON_ROWS = orjson.OPT_NON_STR_KEYS | orjson.OPT_NAIVE_UTC


async def bulk(
    conn: AsyncConnection,
    rows: list[dict[str, Any]],
    portable: Any,
    arrays: tuple[TextClause, list[str]],
) -> Any:
    """Execute `rows` as one JSON parameter on PostgreSQL (see arrays_insert), else `portable`
    (executemany)."""
    if conn.dialect.name == "postgresql":
        sql, _ = arrays
        rows_json = orjson.dumps(rows, option=_JSON_ROWS).decode()
        return await conn.execute(sql, {"rows": rows_json})
    return await conn.execute(portable, rows)


_SAVE_PURCHASE = upsert(store.purchases, ["activity_id"], ["touch_id"])
_NEW_PARTICIPANT = insert_ignore(store.participants)
_NEW_PURCHASE = insert_ignore(store.purchases).returning(store.purchases.c.activity_id)


@dataclass
class Batch:
    """One transaction's work, in memory: the state of the batch's touches, users' exposures
    and purchases and pending counts is read up front in a few queries (`load`), events
    change it in memory, and `flush` writes it back with one bulk statement per table."""

    conn: AsyncConnection
    window: timedelta
    touches: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    deltas: dict[Key, float] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    # user id -> ids of that user's exposed touches known to the batch
    exposed: dict[str, set[str]] = field(default_factory=dict)
    purchases: dict[str, dict[str, Any]] = field(default_factory=dict)
    user_purchases: dict[str, set[str]] = field(default_factory=dict)
    dirty_purchases: set[str] = field(default_factory=set)
    # activity ids inserted by this batch (a purchase counts once, whatever its event id)
    new_purchases: set[str] = field(default_factory=set)
    # touch id -> counts made while its segment was unknown, [minute, channel, measure,
    # value] each (minute as minute_of): those of the touches whose list this batch read or
    # changed, written back into the touch's `pending` column by `flush`
    pending: dict[str, list[list[Any]]] = field(default_factory=dict)
    # (promotion, user) -> the participant's LTV; those this batch recorded first
    ltv_of: dict[tuple[str, str], float] = field(default_factory=dict)
    new_participants: set[tuple[str, str]] = field(default_factory=set)
    user_touches: dict[str, set[str]] = field(default_factory=dict)

    # -- reading state --------------------------------------------------------

    async def load(self, events: Sequence[Event[Any]]) -> None:
        touch_ids: set[str] = set()
        planned: set[str] = set()
        users: set[str] = set()
        times: list[datetime] = []
        purchase_rows: dict[str, dict[str, Any]] = {}
        members: dict[tuple[str, str], dict[str, Any]] = {}
        planned_pairs: set[tuple[str, str]] = set()
        for event in events:
            # Exact types (leaf schemas): isinstance on a pydantic model class goes through
            # ABCMeta, several times slower, and this loop runs for every event.
            data = event.data
            kind = type(data)
            if kind is AudienceMemberResolved:
                members.setdefault(
                    (data.promotion_id, data.user_id),
                    {
                        "promotion_id": data.promotion_id,
                        "user_id": data.user_id,
                        "ltv": float(data.segment.ltv),
                    },
                )
                continue
            if kind is ActivityRecorded:
                if data.kind == "purchase":
                    users.add(data.user_id)
                    times.append(data.occurred_at)
                    purchase_rows.setdefault(
                        data.id,
                        {
                            "activity_id": data.id,
                            "user_id": data.user_id,
                            "occurred_at": data.occurred_at,
                            "amount": float(data.amount or 0.0),
                            "touch_id": None,
                        },
                    )
                continue
            touch_ids.add(data.touch_id)
            if kind is TouchPlanned:
                planned.add(data.touch_id)
                planned_pairs.add((data.promotion_id, data.user_id))
            elif kind is DeliverySent or (kind is TouchSuppressed and data.reason == "holdout"):
                users.add(data.user_id)
                times.append(data.at)
        if purchase_rows:
            rows = sorted(purchase_rows.values(), key=lambda r: r["activity_id"])
            result = await self.conn.execute(_NEW_PURCHASE, rows)
            self.new_purchases = {r[0] for r in result.all()}
        t, pu = store.touches, store.purchases
        for chunk in _chunks(sorted(touch_ids)):
            found = await self.conn.execute(select(t).where(_among(self.conn, t.c.touch_id, chunk)))
            for row in _dicts(found):
                self._know(row)
        for tid in touch_ids:
            self.touches.setdefault(tid, None)
        await self._load_participants(members, planned_pairs)
        if users:
            lo, hi = min(times) - self.window, max(times) + self.window
            for chunk in _chunks(sorted(users)):
                found = await self.conn.execute(
                    select(t).where(
                        _among(self.conn, t.c.user_id, chunk),
                        t.c.exposed_at.is_not(None),
                        t.c.exposed_at >= lo,
                        t.c.exposed_at <= hi,
                    )
                )
                for row in _dicts(found):
                    self._know(row)
                found = await self.conn.execute(
                    select(pu).where(
                        _among(self.conn, pu.c.user_id, chunk),
                        pu.c.occurred_at >= lo,
                        pu.c.occurred_at <= hi,
                    )
                )
                for row in _dicts(found):
                    aid = row["activity_id"]
                    if aid in self.new_purchases:
                        continue  # counted when its event comes, as if inserted then
                    self.purchases[aid] = row
                    self.user_purchases.setdefault(row["user_id"], set()).add(aid)

    async def _load_participants(
        self, members: dict[tuple[str, str], dict[str, Any]], planned: set[tuple[str, str]]
    ) -> None:
        """Record the batch's participants (first LTV wins) and read the LTV of those whose
        touches are planned here; load the touches of participants new to metrics."""
        pa, t = store.participants, store.touches
        if members:
            rows = [members[k] for k in sorted(members)]
            found = await self.conn.execute(
                _NEW_PARTICIPANT.returning(pa.c.promotion_id, pa.c.user_id), rows
            )
            self.new_participants = {(r[0], r[1]) for r in found.all()}
        wanted = planned | set(members)
        # By the whole primary key (promotion first): participants has no index on user_id
        # alone, and a look-up by user_id read the whole table, every promotion's participants
        # (at 1,000,000 of them, a minute for 5,000 users with a generic plan's `= ANY`).
        promotions = sorted({p for p, _ in wanted})
        for chunk in _chunks(sorted({u for _, u in wanted})):
            found = await self.conn.execute(
                select(pa).where(
                    _among(self.conn, pa.c.promotion_id, promotions),
                    _among(self.conn, pa.c.user_id, chunk),
                )
            )
            for r in found.all():
                if (r.promotion_id, r.user_id) in wanted:
                    self.ltv_of[(r.promotion_id, r.user_id)] = r.ltv
        for chunk in _chunks(sorted({u for _, u in self.new_participants})):
            found = await self.conn.execute(select(t).where(_among(self.conn, t.c.user_id, chunk)))
            for row in _dicts(found):
                self._know(row)

    def _know(self, row: dict[str, Any]) -> None:
        if self.touches.get(row["touch_id"]) is not None:
            return
        self.touches[row["touch_id"]] = row
        self.user_touches.setdefault(row["user_id"], set()).add(row["touch_id"])
        if row["exposed_at"] is not None:
            self.exposed.setdefault(row["user_id"], set()).add(row["touch_id"])

    async def touch(self, touch_id: str) -> dict[str, Any] | None:
        if touch_id not in self.touches:
            t = store.touches
            found = await self.conn.execute(select(t).where(t.c.touch_id == touch_id))
            self.touches[touch_id] = None
            for row in _dicts(found):
                self._know(row)
        return self.touches[touch_id]

    def touch_of(self, data: TouchEvent) -> dict[str, Any]:
        known = self.touches.get(data.touch_id)
        if known is not None:
            return known
        row: dict[str, Any] = {
            "touch_id": data.touch_id,
            "user_id": data.user_id,
            "promotion_id": data.promotion_id,
            "wave": data.wave,
            "segment": None,
            "variant": data.variant or "",
            "channel": "",
            "exposure": None,
            "exposed_at": None,
            "orders": 0,
            "sends": 0,
            "ltv": None,
            "pending": None,
        }
        self.touches[data.touch_id] = row
        self.user_touches.setdefault(data.user_id, set()).add(data.touch_id)
        self.dirty.add(data.touch_id)
        return row

    # -- counting -------------------------------------------------------------

    def add(self, key: Key, value: float) -> None:
        self.deltas[key] = self.deltas.get(key, 0.0) + value

    def count(
        self,
        touch: dict[str, Any],
        at: datetime,
        measure: str,
        value: float,
        channel: str = "",
        *,
        unchannelled: bool = False,
    ) -> None:
        """Add to the touch's aggregate at `at`'s minute: under `channel`, else the touch's
        channel; `unchannelled` (planned, LTV: before any channel is chosen) under "" always,
        so the same events give the same rows whatever order they come in."""
        self.count_all(touch, at, ((measure, value),), channel, unchannelled=unchannelled)

    def count_all(
        self,
        touch: dict[str, Any],
        at: datetime,
        measures: Sequence[tuple[str, float]],
        channel: str = "",
        *,
        unchannelled: bool = False,
    ) -> None:
        """`count` for several measures of one touch at one time: the minute and the row's
        key are worked out once (a send counts sends, sent and cost)."""
        channel = "" if unchannelled else channel or touch["channel"]
        minute = minute_of(at)
        segment = touch["segment"]
        base = (touch["promotion_id"], minute, touch["wave"], channel, segment or "")
        variant = touch["variant"]
        deltas = self.deltas
        for measure, value in measures:
            key = (*base, variant, measure)
            deltas[key] = deltas.get(key, 0.0) + value
        if segment is None:
            # Remembered with the touch (written with it), to be moved once its segment comes.
            pending = self._pending_of(touch)
            pending.extend([minute, channel, m, v] for m, v in measures)
            self.dirty.add(touch["touch_id"])

    def _pending_of(self, touch: dict[str, Any]) -> list[list[Any]]:
        """The touch's counts made while its segment was unknown (read from its row once)."""
        tid = touch["touch_id"]
        found = self.pending.get(tid)
        if found is None:
            stored = touch.get("pending")
            found = self.pending[tid] = orjson.loads(stored) if stored else []
        return found

    async def flush(self) -> None:
        """Write the batch: touches, purchases, pending counts, then the count deltas.

        On PostgreSQL the touches are written while the count rows are worked out (the
        statement is sent first, then the rows are built), so that the process and the
        server work at once; the statements still run one after the other, in this order."""
        conn = self.conn
        for tid, pending in self.pending.items():
            if (touch := self.touches.get(tid)) is not None:
                touch["pending"] = orjson.dumps(pending).decode() if pending else None
        touches = [t for tid in sorted(self.dirty) if (t := self.touches[tid]) is not None]
        writing: asyncio.Task[Any] | None = None
        if touches and conn.dialect.name == "postgresql":
            writing = asyncio.create_task(bulk(conn, touches, _SAVE_TOUCH, _SAVE_TOUCH_ARRAYS))
        elif touches:
            await bulk(conn, touches, _SAVE_TOUCH, _SAVE_TOUCH_ARRAYS)
        try:
            if writing is not None:
                await asyncio.sleep(0)  # the task sends the statement
            rows = self._count_rows()
        finally:
            # Also when cancelled: the connection is never left with a statement running.
            if writing is not None:
                await writing
        purchases = [self.purchases[a] for a in sorted(self.dirty_purchases)]
        if purchases:
            await bulk(conn, purchases, _SAVE_PURCHASE, _SAVE_PURCHASE_ARRAYS)
        if rows:
            await bulk(conn, rows, _ADD, _ADD_ARRAYS)

    def _count_rows(self) -> list[dict[str, Any]]:
        """The count deltas as `minute_counts` rows: one per minute and dimensions, with a
        column per measure changed (in key order, so that concurrent writers lock rows in the
        same order)."""
        changes: dict[tuple[Any, ...], dict[str, float]] = {}
        for k, v in self.deltas.items():
            if v != 0:
                changes.setdefault(k[:6], {})[_COLUMN[k[6]]] = v
        self.deltas.clear()
        # executemany (SQLite): every row names every column; PostgreSQL: those it changes.
        postgres = self.conn.dialect.name == "postgresql"
        zeros = {} if postgres else dict.fromkeys(_MEASURE_COLUMNS, 0.0)
        return [
            {
                "promotion_id": k[0],
                "minute": minute_at(k[1]),
                "wave": k[2],
                "channel": k[3],
                "segment": k[4],
                "variant": k[5],
                **zeros,
                **changes[k],
            }
            for k in sorted(changes)
        ]

    # -- events ---------------------------------------------------------------

    async def planned(self, event: Event[Any]) -> None:
        data: TouchPlanned = event.data
        touch = self.touch_of(data)
        segment = data.segment or ""
        if touch["segment"] is None:
            self._settle_segment(touch, segment)
        if data.variant and not touch["variant"]:
            touch["variant"] = data.variant
        self.dirty.add(data.touch_id)
        self.count(touch, event.time, "planned", 1, unchannelled=True)
        self._count_ltv(touch, event.time)

    def _count_ltv(self, touch: dict[str, Any], at: datetime) -> None:
        """Once per planned touch whose participant's LTV is known (either may come first)."""
        ltv = self.ltv_of.get((touch["promotion_id"], touch["user_id"]))
        if ltv is None or touch["ltv"] is not None or touch["segment"] is None:
            return
        touch["ltv"] = ltv
        self.dirty.add(touch["touch_id"])
        self.count(touch, at, "ltv", ltv, unchannelled=True)
        self.count(touch, at, "ltv_touches", 1, unchannelled=True)

    async def member(self, event: Event[Any]) -> None:
        data: AudienceMemberResolved = event.data
        if (data.promotion_id, data.user_id) not in self.new_participants:
            return
        for tid in sorted(self.user_touches.get(data.user_id, ())):
            touch = self.touches[tid]
            if touch is not None and touch["promotion_id"] == data.promotion_id:
                self._count_ltv(touch, event.time)

    def _settle_segment(self, touch: dict[str, Any], segment: str) -> None:
        if touch["pending"] is not None or touch["touch_id"] in self.pending:
            moved = self._pending_of(touch)
            for minute, channel, measure, value in moved:
                base = (touch["promotion_id"], minute, touch["wave"], channel)
                tail = (touch["variant"], measure)
                self.add((*base, "", *tail), -value)
                self.add((*base, segment, *tail), value)
            moved.clear()
        touch["segment"] = segment

    async def suppressed(self, event: Event[Any]) -> None:
        data: TouchSuppressed = event.data
        touch = self.touch_of(data)
        self.count(touch, data.at, f"suppressed.{data.reason}", 1)
        if data.reason == "holdout" and touch["exposure"] is None:
            await self._expose(touch, "holdout", data.at)

    async def sent(self, event: Event[Any]) -> None:
        """A touch counts as "sent" once, at its first accepted send recorded here (under
        that send's channel); "sends" and cost count every accepted channel of a parallel
        touch. Event ids are counted once, so a replay changes nothing."""
        data: DeliverySent = event.data
        touch = self.touch_of(data)
        first = not touch["sends"]
        touch["sends"] += 1
        if first and data.channel and not touch["channel"]:
            touch["channel"] = data.channel
        self.dirty.add(data.touch_id)
        measures: list[tuple[str, float]] = [("sends", 1)]
        if first:
            measures.append(("sent", 1))
        if data.cost:
            measures.append(("cost", data.cost))
        self.count_all(touch, data.at, measures, data.channel or "")
        if touch["exposure"] is None:
            await self._expose(touch, "sent", data.at)

    async def failed(self, event: Event[Any]) -> None:
        data: DeliveryFailed = event.data
        touch = self.touch_of(data)
        self.count(touch, data.at, "failed", 1, data.channel or "")
        if data.cost:
            self.count(touch, data.at, "cost", data.cost, data.channel or "")

    async def engaged(self, event: Event[Any]) -> None:
        data: EngagementRecorded = event.data
        touch = self.touch_of(data)
        self.count(touch, data.at, data.kind, 1, data.channel or "")

    async def purchase(self, event: Event[Any]) -> None:
        data: ActivityRecorded = event.data
        if data.kind != "purchase" or data.id not in self.new_purchases:
            return
        self.new_purchases.discard(data.id)
        row: dict[str, Any] = {
            "activity_id": data.id,
            "user_id": data.user_id,
            "occurred_at": data.occurred_at,
            "amount": float(data.amount or 0.0),
            "touch_id": None,
        }
        self.purchases[data.id] = row
        self.user_purchases.setdefault(data.user_id, set()).add(data.id)
        lo = data.occurred_at - self.window
        best: dict[str, Any] | None = None
        for tid in self.exposed.get(data.user_id, ()):
            t = self.touches[tid]
            assert t is not None
            if lo <= t["exposed_at"] <= data.occurred_at and (
                best is None or (t["exposed_at"], tid) > (best["exposed_at"], best["touch_id"])
            ):
                best = t
        if best is None:
            return
        self._credit(best, row["amount"], +1)
        row["touch_id"] = best["touch_id"]
        self.dirty_purchases.add(data.id)

    async def _expose(self, touch: dict[str, Any], kind: str, at: datetime) -> None:
        """`touch` becomes an exposure at `at`: take over the purchases it is now the last for."""
        touch["exposure"], touch["exposed_at"] = kind, at
        self.dirty.add(touch["touch_id"])
        self.exposed.setdefault(touch["user_id"], set()).add(touch["touch_id"])
        bought = self.user_purchases.get(touch["user_id"])
        if not bought:
            return
        end = at + self.window
        for aid in sorted(bought):
            p = self.purchases[aid]
            if not at <= p["occurred_at"] <= end:
                continue
            if p["touch_id"] is not None:
                old = await self.touch(p["touch_id"])
                if old is None or (old["exposed_at"], old["touch_id"]) >= (at, touch["touch_id"]):
                    continue
                self._credit(old, p["amount"], -1)
            self._credit(touch, p["amount"], +1)
            p["touch_id"] = touch["touch_id"]
            self.dirty_purchases.add(aid)

    def _credit(self, touch: dict[str, Any], amount: float, sign: int) -> None:
        prefix = "holdout_" if touch["exposure"] == "holdout" else ""
        at = touch["exposed_at"]
        before = touch["orders"]
        touch["orders"] = before + sign
        self.dirty.add(touch["touch_id"])
        measures: list[tuple[str, float]] = [
            (f"{prefix}orders", sign),
            (f"{prefix}revenue", sign * amount),
        ]
        if before == 0 and sign > 0:
            measures.append((f"{prefix}converted", 1))
        elif before == 1 and sign < 0:
            measures.append((f"{prefix}converted", -1))
        self.count_all(touch, at, measures)


def _among(conn: AsyncConnection, column: Any, values: list[str]) -> Any:
    """`column IN values`; on PostgreSQL as `= ANY(one array parameter)`, which is compiled
    once per statement shape instead of rendering one bind parameter per value."""
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=_TEXT_ARRAY))
    return column.in_(values)


_TEXT_ARRAY = postgresql.ARRAY(String)


def _dicts(result: Any) -> list[dict[str, Any]]:
    """A result's rows as dicts: `dict(row._mapping)` builds a key view per row, 2.1 us for a
    touch against 0.9 us, and the look-ups return about a row per event counted."""
    keys = list(result.keys())
    return [dict(zip(keys, row, strict=True)) for row in result.all()]


def _chunks(items: list[str], size: int = 5000) -> Iterator[list[str]]:
    for first in range(0, len(items), size):
        yield items[first : first + size]


DISPATCH: dict[type[Any], Callable[[Batch, Event[Any]], Awaitable[None]]] = {
    AudienceMemberResolved: Batch.member,
    TouchPlanned: Batch.planned,
    TouchSuppressed: Batch.suppressed,
    DeliverySent: Batch.sent,
    DeliveryFailed: Batch.failed,
    EngagementRecorded: Batch.engaged,
    ActivityRecorded: Batch.purchase,
}


# Events counted in one transaction at most (whole batches: one batch may exceed it alone).
MAX_TRANSACTION_EVENTS = 20_000


class Lane:
    """Group commit: the batches handed in concurrently (one per partition the consumer is
    working on) are counted together, in one transaction at a time per lane.

    Counting cost is mostly per transaction (a dozen statements), so fewer, larger
    transactions count more events per second; one transaction at a time also spares
    the lane's own transactions from waiting for each other's user locks. A caller
    returns once its events are committed (or raises), so the consumer commits offsets
    only for counted events. If a combined transaction fails, each caller's batch is
    retried alone, so that one bad batch fails only its own caller.
    """

    def __init__(
        self,
        run: Callable[[list[Event[Any]]], Awaitable[None]],
        max_events: int = MAX_TRANSACTION_EVENTS,
    ) -> None:
        self.run = run
        self.max_events = max_events
        self.queue: list[tuple[Sequence[Event[Any]], asyncio.Future[None]]] = []
        self.lock = asyncio.Lock()

    async def submit(self, events: Sequence[Event[Any]]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((events, done))
        async with self.lock:
            while not done.done():
                await self._flush()
        return done.result()

    async def _flush(self) -> None:
        # The batches queued first, up to max_events (at least one batch): a transaction's
        # counting runs without a pause for the event loop, so its size bounds that pause
        # (the consumer's heartbeats wait meanwhile) and the memory it holds.
        taken, total = 0, 0
        while taken < len(self.queue) and (not taken or total < self.max_events):
            total += len(self.queue[taken][0])
            taken += 1
        group, self.queue = self.queue[:taken], self.queue[taken:]
        try:
            try:
                await self.run([e for events, _ in group for e in events])
                for _, done in group:
                    done.set_result(None)
            except Exception as exc:
                if len(group) == 1:
                    group[0][1].set_exception(exc)
                    return
                for events, done in group:
                    try:
                        await self.run(list(events))
                    except Exception as exc:
                        done.set_exception(exc)
                    else:
                        done.set_result(None)
        finally:
            # Cancelled or failed alone: the callers still waiting take their batches back.
            self.queue[:0] = [entry for entry in group if not entry[1].done()]


class Combiner:
    """Counting in `lanes` independent lanes (see Lane), each event in the lane `lane_of`
    gives it, so that one lane's Python counting runs while another's statements run in the
    database: one transaction at a time would leave the process and the database waiting
    for each other. Lanes must not share state: metrics gives each lane its own users (by
    their lock share), as if each lane were a replica of its own. A caller returns once the
    events of every lane it handed in are committed, and raises if one lane failed (its
    batch is then redelivered; what the other lanes counted is recognised by event id)."""

    def __init__(
        self,
        run: Callable[[list[Event[Any]]], Awaitable[None]],
        max_events: int = MAX_TRANSACTION_EVENTS,
        *,
        lanes: int = 1,
        lane_of: Callable[[Event[Any]], int] | None = None,
    ) -> None:
        if lanes > 1 and lane_of is None:
            raise ValueError("several lanes need lane_of")
        self.lanes = [Lane(run, max_events) for _ in range(lanes)]
        self.lane_of = lane_of

    async def submit(self, events: Sequence[Event[Any]]) -> None:
        if len(self.lanes) == 1 or self.lane_of is None:
            return await self.lanes[0].submit(events)
        parts: list[list[Event[Any]]] = [[] for _ in self.lanes]
        lane_of = self.lane_of
        for event in events:
            parts[lane_of(event)].append(event)
        results = await asyncio.gather(
            *(lane.submit(part) for lane, part in zip(self.lanes, parts, strict=True) if part),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result


COMBINER_KEY = "metrics_combiner"


STALE_KEY = "metrics_stale_counter"


def _stale_counter(ctx: ServiceContext) -> Counter:
    found = ctx.extras.get(STALE_KEY)
    if not isinstance(found, Counter):
        found = ctx.extras[STALE_KEY] = Counter(
            "afterglow_metrics_stale_events_total",
            "Events not counted because they are older than the counted-id retention"
            " (AFTERGLOW_METRICS_SEEN_RETENTION_DAYS), by type",
            ("type",),
            registry=ctx.metrics.registry,
        )
    return found


async def on_events(ctx: ServiceContext, events: Sequence[Event[Any]]) -> None:
    """Count a batch of events (any mix of the handled types) once, in one transaction
    shared with the batches other partitions hand in meanwhile (see Combiner)."""
    combiner = ctx.extras.get(COMBINER_KEY)
    if not isinstance(combiner, Combiner):
        window = window_of(ctx)
        retention = settings_of(ctx).seen_retention
        stale_total = _stale_counter(ctx)

        async def run(batch: list[Event[Any]]) -> None:
            horizon = ctx.clock.now() - retention
            fresh: list[Event[Any]] = []
            stale: list[Event[Any]] = []
            for e in batch:
                (fresh if e.time >= horizon else stale).append(e)
            if stale:
                for e in stale:
                    stale_total.labels(type=e.type).inc()
                log.warning(
                    "events older than the counted-id retention not counted",
                    extra={
                        "stale": len(stale),
                        "oldest": min(e.time for e in stale).isoformat(),
                        "horizon": horizon.isoformat(),
                    },
                )
            async with ctx.db.begin() as conn:
                await apply(conn, fresh, window)

        # SQLite has one writer at a time: lanes would only queue for it.
        lanes = 1 if ctx.db.is_sqlite else settings_of(ctx).counting_lanes
        combiner = ctx.extras[COMBINER_KEY] = Combiner(
            run, lanes=lanes, lane_of=lane_by_user(lanes)
        )
    await combiner.submit(events)


_LOCK = text(
    "SELECT pg_advisory_xact_lock(k)"
    " FROM (SELECT unnest(CAST(:keys AS bigint[])) AS k ORDER BY k) AS s"
)


# Users share this many locks: a transaction takes at most this many, however many users
# it counts (PostgreSQL's lock table holds max_locks_per_transaction x max_connections locks
# in all, 64 x 100 by default, and a batch of thousands of users must not exhaust it).
USER_LOCKS = 1024


def _lock_key(n: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"metrics-users:{n}".encode(), digest_size=8).digest(),
        "big",
        signed=True,
    )


_USER_LOCK_KEYS = [_lock_key(n) for n in range(USER_LOCKS)]


def user_share(user_id: str) -> int:
    """Which of the USER_LOCKS shares `user_id` belongs to."""
    return zlib.crc32(user_id.encode()) % USER_LOCKS


def lane_by_user(lanes: int) -> Callable[[Event[Any]], int]:
    """The Combiner lane of an event: its user's lock share, modulo `lanes`, so that no two
    lanes ever take the same user lock."""
    return lambda event: user_share(event.data.user_id) % lanes


async def lock_users(conn: AsyncConnection, users: set[str]) -> None:
    """On PostgreSQL, hold the transaction lock of each user's share (taken in key order, so
    batches never deadlock): topics are consumed concurrently, and a purchase and the exposure
    that should own it, counted in two concurrent transactions, would otherwise each miss the
    other. Users sharing a lock only wait for each other."""
    if conn.dialect.name != "postgresql" or not users:
        return
    keys = sorted({_USER_LOCK_KEYS[user_share(u)] for u in users})
    await conn.execute(_LOCK, {"keys": keys})


async def record_seen(conn: AsyncConnection, ids: list[str], at: datetime) -> set[str]:
    """Record these event ids (distinct, recorded in this order) as seen at `at`; returns
    those not recorded before."""
    if conn.dialect.name != "postgresql":
        rows = [{"event_id": i, "seen_at": at} for i in ids]
        return {r[0] for r in (await conn.execute(_SEEN, rows)).all()}
    params = {"ids": orjson.dumps(ids).decode(), "at": at, "n": len(ids)}
    new, found = (await conn.execute(_SEEN_NEW, params)).one()
    if new == len(ids):
        return set(ids)
    return set(found or ())


async def apply(conn: AsyncConnection, events: Sequence[Event[Any]], window: timedelta) -> int:
    """Count the events not seen before on `conn`; returns how many were new.

    Each counted id is kept with the newest time of the events counted with it (at or after
    its own), and the ids kept with a time older than the retention are deleted
    (services/metrics/retention.py): an id stays at least as long as its event is within
    the retention. `on_events` leaves out the events older than the retention, whose ids may
    have been deleted already, so that a replay of old events never counts them twice."""
    if not events:
        return 0
    # In id order: two replicas recording overlapping ids (a redelivery after a rebalance)
    # wait for each other's rows in the same order, never in a deadlock.
    ids = sorted({e.id for e in events})
    fresh = await record_seen(conn, ids, max(e.time for e in events))
    await lock_users(conn, {e.data.user_id for e in events if e.id in fresh})
    batch = Batch(conn, window)
    new: list[Event[Any]] = []
    for event in events:
        if event.id in fresh:
            fresh.discard(event.id)
            new.append(event)
    await batch.load(new)
    for event in new:
        await DISPATCH[type(event.data)](batch, event)
    await batch.flush()
    return len(new)
