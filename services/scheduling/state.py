"""Per-process helpers of the scheduling service: the policy cache, the dispatcher's wake-up,
the per-user lock and bulk writes. Shared by handlers and the dispatcher."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import BigInteger, String, Table, bindparam, desc, func, literal, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduling import domain, store
from services.scheduling.policy import Policy, default_policy
from shared.db import insert_ignore
from shared.outbox import lane_for
from shared.service import ServiceContext

DEFAULT_POLICY = "default"
_LOCK_USERS = text(
    "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT unnest(:keys) AS k ORDER BY 1) AS s"
).bindparams(bindparam("keys", type_=ARRAY(BigInteger)))


class UnknownPolicy(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no policy named {name!r}")
        self.name = name


@dataclass
class SchedulingState:
    policies: dict[tuple[str, int], Policy] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    running: int = 0


def state(ctx: ServiceContext) -> SchedulingState:
    found = ctx.extras.get("scheduling")
    if not isinstance(found, SchedulingState):
        found = SchedulingState()
        ctx.extras["scheduling"] = found
    return found


def wake_dispatcher(ctx: ServiceContext) -> None:
    state(ctx).wake.set()


async def stop_dispatchers(ctx: ServiceContext, timeout_s: float = 10.0) -> None:
    """Let the dispatcher loops finish their transaction and return (before a shutdown that
    would otherwise cancel them mid-transaction)."""
    found = state(ctx)
    found.stopping = True
    found.wake.set()
    async with asyncio.timeout(timeout_s):
        while found.running:  # noqa: ASYNC110 - a count, not one event
            await asyncio.sleep(0.01)


# -- policies ---------------------------------------------------------------------


async def current_policy(conn: AsyncConnection, name: str, now: datetime) -> tuple[int, Policy]:
    """The newest version of a policy; the shipped default is version 1 of `default`."""
    p = store.policies
    row = (
        await conn.execute(
            select(p.c.version, p.c.body)
            .where(p.c.name == name)
            .order_by(desc(p.c.version))
            .limit(1)
        )
    ).one_or_none()
    if row is not None:
        return int(row.version), Policy.model_validate(row.body)
    if name != DEFAULT_POLICY:
        raise UnknownPolicy(name)
    policy = default_policy()
    await conn.execute(
        insert_ignore(p),
        {"name": name, "version": 1, "body": policy.model_dump(mode="json"), "created_at": now},
    )
    return 1, policy


async def policy_at(ctx: ServiceContext, conn: AsyncConnection, name: str, version: int) -> Policy:
    """One version of a policy; versions never change, so they are cached for good."""
    cache = state(ctx).policies
    found = cache.get((name, version))
    if found is not None:
        return found
    p = store.policies
    body = (
        await conn.execute(select(p.c.body).where(p.c.name == name, p.c.version == version))
    ).scalar_one_or_none()
    if body is None:
        if name == DEFAULT_POLICY and version == 1:
            policy = default_policy()
        else:
            raise UnknownPolicy(f"{name} v{version}")
    else:
        policy = Policy.model_validate(body)
    cache[(name, version)] = policy
    return policy


OUTBOX_COLUMNS = ("lane", "topic", "key", "payload", "created_at")


class FastEncoder:
    """Builds outbox rows for planning's many events without a pydantic round trip per event.

    The bytes are the same CloudEvents `shared.events.encode` writes (a unit test decodes them).
    """

    def __init__(self, ctx: ServiceContext, now: datetime) -> None:
        self.topic = ctx.topic("touches")
        self.source = ctx.outbox.source
        self.lanes = ctx.outbox.lanes
        self.now = now
        self.time = now.isoformat()
        self.rows: list[tuple[Any, ...]] = []

    def lane(self, key: str) -> int:
        return lane_for(key, self.lanes)

    def add(
        self,
        event_type: str,
        key: str,
        event_id: str,
        data: dict[str, Any],
        lane: int | None = None,
    ) -> None:
        """One event; `lane` when the caller already knows it (`self.lane(key)`)."""
        body = {
            "specversion": "1.0",
            "id": event_id,
            "source": self.source,
            "type": event_type,
            "time": self.time,
            "subject": key,
            "datacontenttype": "application/json",
            "data": data,
        }
        self.rows.append(
            (
                lane_for(key, self.lanes) if lane is None else lane,
                self.topic,
                key,
                orjson.dumps(body),
                self.now,
            )
        )


# -- locks and bulk writes --------------------------------------------------------


def user_lock_key(user_id: str) -> int:
    digest = hashlib.blake2b(f"afterglow-scheduling-user:{user_id}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def among(conn: AsyncConnection, column: Any, values: list[str]) -> Any:
    """`column IN values`; on PostgreSQL `= ANY(array)`: one cached statement for any size."""
    if conn.dialect.name == "postgresql":
        return column == func.any(literal(values, ARRAY(String)))
    return column.in_(values)


async def lock_users(conn: AsyncConnection, user_ids: Iterable[str]) -> None:
    """Per-user transaction locks, taken in key order so that dispatchers never deadlock.

    PostgreSQL: advisory locks. SQLite: one writer per service already (Database.begin).
    """
    if conn.dialect.name != "postgresql":
        return
    keys = sorted({user_lock_key(u) for u in user_ids})
    if keys:
        await conn.execute(_LOCK_USERS, {"keys": keys})


async def bulk_insert(
    conn: AsyncConnection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert many rows: COPY on PostgreSQL (asyncpg), one executemany elsewhere."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.copy_records_to_table(
            table.name, schema_name=table.schema, columns=list(columns), records=rows
        )
        return
    await conn.execute(table.insert(), [dict(zip(columns, row, strict=True)) for row in rows])


# -- fatigue rows -----------------------------------------------------------------


async def load_fatigue(conn: AsyncConnection, user_id: str) -> domain.FatigueState:
    u = store.users
    row = (
        await conn.execute(
            select(u.c.fatigue, u.c.paused, u.c.unanswered, u.c.last_engaged_at).where(
                u.c.user_id == user_id
            )
        )
    ).one_or_none()
    return fatigue_of(row)


_NORMAL = domain.FatigueState()


def fatigue_of(row: Any) -> domain.FatigueState:
    if row is None:
        return _NORMAL
    if (
        row.fatigue == "normal"
        and not row.paused
        and not row.unanswered
        and row.last_engaged_at is None
    ):
        return _NORMAL  # most users; the state is frozen, so one instance serves them all
    return domain.FatigueState(
        state=row.fatigue,
        paused=frozenset(row.paused or ()),
        unanswered=int(row.unanswered),
        last_engaged_at=row.last_engaged_at,
    )


def fatigue_values(state: domain.FatigueState) -> dict[str, Any]:
    return {
        "fatigue": state.state,
        "paused": sorted(state.paused) or None,
        "unanswered": state.unanswered,
        "last_engaged_at": state.last_engaged_at,
    }


def history_row(user_id: str, change: domain.FatigueChange) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "at": change.at,
        "signal": change.signal,
        "channel": change.channel,
        "from_state": change.from_state,
        "to_state": change.to_state,
    }
