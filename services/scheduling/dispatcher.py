"""The dispatcher: a loop on the service clock that claims due touches in batches and,
under a per-user lock, sends, defers or suppresses each one.

Why no touch goes out twice and no cap is exceeded with several replicas:
- a touch row is claimed with `FOR UPDATE SKIP LOCKED` (PostgreSQL), so one transaction
  owns it, and it leaves the `planned` state in that transaction;
- before reading a user's contact history, the transaction takes the user's advisory lock
  (in key order, so two dispatchers never deadlock); a second dispatcher with another touch
  of the same user waits, then reads the history including the first one's reservation;
- the slot counts from the moment touch.due is written (same transaction, outbox), not
  when delivery confirms; delivery.failed later releases it.
On SQLite one process writes at a time (`Database.begin`), which gives the same guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Text, and_, bindparam, cast, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduling import domain, store
from services.scheduling.config import SchedulingSettings
from services.scheduling.policy import Policy
from services.scheduling.state import (
    OUTBOX_COLUMNS,
    FastEncoder,
    among,
    bulk_insert,
    fatigue_of,
    fatigue_values,
    history_row,
    lock_users,
    policy_at,
    state,
    user_lock_key,
)
from shared.events import Channel, TouchDue, TouchSuppressed
from shared.service import ServiceContext

log = logging.getLogger(__name__)
DUE_TYPE = TouchDue.event_type()
SUPPRESSED_TYPE = TouchSuppressed.event_type()
CONTACT_COLUMNS = ("touch_id", "user_id", "at", "promotion_id", "wave", "status")
LOCK_TIMEOUT_S = 5.0

_t = store.touches
_CLAIM_COLUMNS = (
    _t.c.touch_id,
    _t.c.user_id,
    _t.c.promotion_id,
    _t.c.wave,
    _t.c.variant,
    _t.c.due_at,
    _t.c.deadline,
    _t.c.parallel,
    _t.c.rank,
    _t.c.essential,
    _t.c.coupon,
    _t.c.channel_order,
    _t.c.segment,
)
# Positions in a claimed row: SQLAlchemy rows and asyncpg records both index by position.
(
    _ID,
    _USER,
    _PROMOTION,
    _WAVE,
    _VARIANT,
    _DUE,
    _DEADLINE,
    _PARALLEL,
    _RANK,
    _ESSENTIAL,
    _COUPON,
    _ORDER,
    _SEGMENT,
) = range(len(_CLAIM_COLUMNS))
_CLAIM_LIST = ", ".join(c.name for c in _CLAIM_COLUMNS)

# PostgreSQL: the hot reads straight on asyncpg (prepared once per connection), without
# SQLAlchemy's per-statement compile-cache lookup and per-value result processing.
# For the dispatch transaction only (set_config(..., true) is SET LOCAL, in one statement):
# - a lock held by a stuck client must not stall dispatch for good;
# - the decisions are written by joining the touches to an unnest of the batch: right after
#   a bulk plan, before autovacuum's ANALYZE, a stale row count makes the planner hash the
#   whole touches table for every batch (measured: 92 of 163 ms a batch of 1,000 on 50,000
#   rows), where one primary-key lookup per touch is right at any size.
_SETTINGS = text(
    f"SELECT set_config('lock_timeout', '{int(LOCK_TIMEOUT_S * 1000)}ms', true),"
    " set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
)
_CLAIM_PG = (
    f"SELECT {_CLAIM_LIST} FROM scheduling.touches"
    " WHERE status = 'planned' AND due_at <= $1 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED"
)
_MORE_DUE_PG = (
    f"SELECT {_CLAIM_LIST} FROM scheduling.touches"
    # `IS TRUE` keeps the due index (partial, on status = 'planned') out of reach: that
    # index would be walked past every due touch (and the dead entries of dispatched ones),
    # each compared with the claimed users. In one benchmark run (200,000 participants)
    # this read took 345 ms a batch for 0 rows, against 1-3 ms in the others; the plan was
    # not captured, and the due index is the only other one a due-time condition can use.
    # Through (user_id, due_at) it is a few index pages per user at any size.
    " WHERE user_id = ANY($1::text[]) AND (status = 'planned') IS TRUE AND due_at <= $2"
    # NOT IN a subquery is hashed; `<> ALL($3)` compared every row with every claimed id
    # (29 ms for 1,000 rows against 1,000 ids).
    " AND touch_id NOT IN (SELECT unnest($3::text[])) FOR UPDATE SKIP LOCKED"
)
_LOCK_USERS_PG = (
    "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT unnest($1::bigint[]) AS k ORDER BY 1) s"
)
_USERS_PG = (
    "SELECT user_id, timezone, erased_at, fatigue, paused::text, unanswered, last_engaged_at,"
    " first_seen_at, consent::text FROM scheduling.users WHERE user_id = ANY($1::text[])"
)
_CONTACTS_PG = (
    "SELECT user_id, at FROM scheduling.contacts"
    " WHERE user_id = ANY($1::text[]) AND at > $2 AND status <> 'released'"
)
# A touch is found by its user and id (PostgreSQL has no index on the id alone).
_SENT = (
    update(_t)
    .where(_t.c.user_id == bindparam("b_user"), _t.c.touch_id == bindparam("b_id"))
    .values(
        status="dispatched",
        channel=bindparam("b_channel"),
        dispatched_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
    )
)
_SUPPRESSED = (
    update(_t)
    .where(_t.c.user_id == bindparam("b_user"), _t.c.touch_id == bindparam("b_id"))
    .values(status="suppressed", reason=bindparam("b_reason"), updated_at=bindparam("b_now"))
)
_DEFERRED = (
    update(_t)
    .where(_t.c.user_id == bindparam("b_user"), _t.c.touch_id == bindparam("b_id"))
    .values(
        due_at=bindparam("b_due"),
        reason=bindparam("b_reason"),
        deferrals=_t.c.deferrals + 1,
        deferred_s=_t.c.deferred_s + bindparam("b_delay"),
        updated_at=bindparam("b_now"),
    )
)
_u = store.users
_USER_FATIGUE = (
    update(_u)
    .where(_u.c.user_id == bindparam("b_user"))
    .values(
        fatigue=bindparam("b_fatigue"),
        paused=bindparam("b_paused"),
        unanswered=bindparam("b_unanswered"),
        last_engaged_at=bindparam("b_engaged"),
        updated_at=bindparam("b_now"),
    )
)


async def dispatch_once(ctx: ServiceContext, *, batch: int = 1000) -> int:
    """One transaction: claim up to `batch` due touches and decide each; returns how many."""
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        if conn.dialect.name == "postgresql":
            loaded = await _load_pg(conn, batch, now)
        else:
            loaded = await _load(conn, batch, now)
        if loaded is None:
            return 0
        rows, users = loaded
        promotions = await _promotions(ctx, conn, {r[_PROMOTION] for r in rows})
        outcome = _Outcome(FastEncoder(ctx, now))
        by_user: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            by_user[row[_USER]].append(row)
        for user_id, user_rows in by_user.items():
            _decide(user_id, user_rows, users[user_id], promotions, outcome)
        await outcome.write(ctx, conn)
    ctx.outbox.notify()
    return len(rows)


_Loaded = tuple[list[Any], dict[str, domain.UserView]]


async def _load_pg(conn: AsyncConnection, batch: int, now: datetime) -> _Loaded | None:
    """Claim up to `batch` due touches, lock their users, then read the users' other due
    touches (so that the priority decides among all of them), state and contact history."""
    # Through SQLAlchemy: its first statement is what sends BEGIN; on the bare driver, the
    # claim would autocommit.
    await conn.execute(_SETTINGS)
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    if not driver.is_in_transaction():
        raise RuntimeError("dispatch must claim inside a transaction")
    rows = await driver.fetch(_CLAIM_PG, now, batch)
    if not rows:
        return None
    user_ids = sorted({r[_USER] for r in rows})
    await driver.fetchval(_LOCK_USERS_PG, sorted({user_lock_key(u) for u in user_ids}))
    rows += await driver.fetch(_MORE_DUE_PG, user_ids, now, [r[_ID] for r in rows])
    views = {uid: domain.UserView() for uid in user_ids}
    for (
        uid,
        tz,
        erased_at,
        fatigue,
        paused,
        unanswered,
        engaged,
        first_seen,
        consent,
    ) in await driver.fetch(_USERS_PG, user_ids):
        view = views[uid]
        view.timezone = tz or "UTC"
        view.consent = (orjson.loads(consent) if consent else None) or {}
        view.erased = erased_at is not None
        if fatigue != "normal" or paused or unanswered or engaged is not None:
            view.fatigue = domain.FatigueState(
                state=fatigue,
                paused=frozenset(orjson.loads(paused) or ()) if paused else frozenset(),
                unanswered=int(unanswered),
                last_engaged_at=engaged,
            )
        view.first_seen = first_seen
    for uid, at in await driver.fetch(_CONTACTS_PG, user_ids, now - domain.MONTH):
        views[uid].history.append(at)
    return rows, views


async def _load(conn: AsyncConnection, batch: int, now: datetime) -> _Loaded | None:
    """`_load_pg` through SQLAlchemy (SQLite: one writer at a time, no row locks needed)."""
    claim = (
        select(*_CLAIM_COLUMNS)
        .where(_t.c.status == "planned", _t.c.due_at <= now)
        .order_by(_t.c.due_at)
        .limit(batch)
    )
    rows = list((await conn.execute(claim)).all())
    if not rows:
        return None
    user_ids = sorted({r[_USER] for r in rows})
    await lock_users(conn, user_ids)
    claimed = {r[_ID] for r in rows}
    more = select(*_CLAIM_COLUMNS).where(
        among(conn, _t.c.user_id, user_ids), _t.c.status == "planned", _t.c.due_at <= now
    )
    rows += [r for r in (await conn.execute(more)).all() if r[_ID] not in claimed]
    return rows, await _users(conn, user_ids, now)


class _Promotion:
    __slots__ = ("_contents", "cancelled", "ended_at", "name", "policy")

    def __init__(self, name: str, ended_at: datetime, cancelled: bool, policy: Policy) -> None:
        self.name = name
        self.ended_at = ended_at
        self.cancelled = cancelled
        self.policy = policy
        self._contents: dict[tuple[str, str, tuple[str, ...]], dict[str, Any]] = {}

    def content(self, wave_name: str, variant: str, channels: list[str]) -> dict[str, Any]:
        """The templates of a touch.due, per channel; the same for every touch of a wave,
        variant and channel list (orjson writes a shared dict as often as it is referenced)."""
        key = (wave_name, variant, tuple(channels))
        found = self._contents.get(key)
        if found is None:
            wave = domain.wave_of(self.policy, wave_name)
            templates = wave.content.get(variant, {}) if wave else {}
            found = self._contents[key] = {
                c: {"subject": templates[c].subject, "body": templates[c].body}
                for c in channels
                if c in templates
            }
        return found


async def _promotions(
    ctx: ServiceContext, conn: AsyncConnection, ids: set[str]
) -> dict[str, _Promotion]:
    p = store.promotions
    rows = (
        await conn.execute(
            select(
                p.c.promotion_id, p.c.name, p.c.ended_at, p.c.status, p.c.policy, p.c.policy_version
            ).where(p.c.promotion_id.in_(sorted(ids)))
        )
    ).all()
    return {
        r.promotion_id: _Promotion(
            r.name,
            r.ended_at,
            r.status == "cancelled",
            await policy_at(ctx, conn, r.policy, r.policy_version),
        )
        for r in rows
    }


_USER_COLUMNS = (
    _u.c.user_id,
    _u.c.timezone,
    _u.c.erased_at,
    _u.c.fatigue,
    _u.c.paused,
    _u.c.unanswered,
    _u.c.last_engaged_at,
    _u.c.first_seen_at,
)


async def _users(
    conn: AsyncConnection, user_ids: list[str], now: datetime
) -> dict[str, domain.UserView]:
    u, c = store.users, store.contacts
    views = {uid: domain.UserView() for uid in user_ids}
    # Consent as text, decoded with orjson: the JSON type's decoder is the slow stdlib one.
    query = select(*_USER_COLUMNS, cast(u.c.consent, Text).label("consent")).where(
        among(conn, u.c.user_id, user_ids)
    )
    for r in (await conn.execute(query)).all():
        view = views[r.user_id]
        view.timezone = r.timezone or "UTC"
        view.consent = orjson.loads(r.consent) if r.consent else {}
        view.erased = r.erased_at is not None
        view.fatigue = fatigue_of(r)
        view.first_seen = r.first_seen_at
    contacts = await conn.execute(
        select(c.c.user_id, c.c.at).where(
            among(conn, c.c.user_id, user_ids),
            c.c.at > now - domain.MONTH,
            c.c.status != "released",
        )
    )
    for user_id, at in contacts.all():
        views[user_id].history.append(at)
    return views


# PostgreSQL: every decision of a batch in one statement (deferred touches stay planned).
_DECIDED_PG = text(
    "UPDATE scheduling.touches AS t SET"
    " status = v.status,"
    " channel = CASE WHEN v.status = 'dispatched' THEN v.channel ELSE t.channel END,"
    " dispatched_at = CASE WHEN v.status = 'dispatched' THEN :now ELSE t.dispatched_at END,"
    " reason = CASE WHEN v.status = 'dispatched' THEN t.reason ELSE v.reason END,"
    " due_at = COALESCE(v.due, t.due_at),"
    " deferrals = t.deferrals + CASE WHEN v.due IS NULL THEN 0 ELSE 1 END,"
    " deferred_s = t.deferred_s + COALESCE(v.delay, 0),"
    " updated_at = :now"
    " FROM unnest(CAST(:ids AS text[]), CAST(:users AS text[]), CAST(:was AS timestamptz[]),"
    " CAST(:statuses AS text[]), CAST(:channels AS text[]), CAST(:reasons AS text[]),"
    " CAST(:dues AS timestamptz[]), CAST(:delays AS float8[]))"
    " AS v(touch_id, user_id, was, status, channel, reason, due, delay)"
    # (user_id, due_at) is the index; the row is locked since its claim, so its due time is
    # the one read then.
    " WHERE t.user_id = v.user_id AND t.due_at = v.was AND t.touch_id = v.touch_id"
)


_USER_FATIGUE_PG = text(
    "UPDATE scheduling.users AS u SET fatigue = v.fatigue, paused = CAST(v.paused AS json),"
    " unanswered = v.unanswered, last_engaged_at = v.engaged, updated_at = :now"
    " FROM unnest(CAST(:users AS text[]), CAST(:states AS text[]), CAST(:paused AS text[]),"
    " CAST(:unanswered AS int[]), CAST(:engaged AS timestamptz[]))"
    " AS v(user_id, fatigue, paused, unanswered, engaged)"
    " WHERE u.user_id = v.user_id"
)


class _Outcome:
    """Everything one dispatch transaction writes, gathered for bulk statements."""

    def __init__(self, encoder: FastEncoder) -> None:
        self.encoder = encoder
        self.now = encoder.now
        # (touch_id, user_id, due time as claimed, status, channel, reason, deferred until,
        #  delay in seconds)
        self.decided: list[
            tuple[str, str, datetime, str, str | None, str | None, datetime | None, float]
        ] = []
        self.contacts: list[tuple[Any, ...]] = []
        self.fatigue: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []

    async def write(self, ctx: ServiceContext, conn: AsyncConnection) -> None:
        if self.decided and conn.dialect.name == "postgresql":
            columns = list(zip(*self.decided, strict=True))
            await conn.execute(
                _DECIDED_PG,
                {
                    "ids": list(columns[0]),
                    "users": list(columns[1]),
                    "was": list(columns[2]),
                    "statuses": list(columns[3]),
                    "channels": list(columns[4]),
                    "reasons": list(columns[5]),
                    "dues": list(columns[6]),
                    "delays": list(columns[7]),
                    "now": self.now,
                },
            )
        elif self.decided:
            await self._write_each(conn)
        if self.fatigue and conn.dialect.name == "postgresql":
            f = self.fatigue
            await conn.execute(
                _USER_FATIGUE_PG,
                {
                    "users": [r["b_user"] for r in f],
                    "states": [r["b_fatigue"] for r in f],
                    "paused": [
                        None if r["b_paused"] is None else orjson.dumps(r["b_paused"]).decode()
                        for r in f
                    ],
                    "unanswered": [r["b_unanswered"] for r in f],
                    "engaged": [r["b_engaged"] for r in f],
                    "now": self.now,
                },
            )
        elif self.fatigue:
            await conn.execute(_USER_FATIGUE, self.fatigue)
        await bulk_insert(conn, store.contacts, CONTACT_COLUMNS, self.contacts)
        if self.history:
            await conn.execute(store.fatigue_history.insert(), self.history)
        await bulk_insert(conn, store.outbox, OUTBOX_COLUMNS, self.encoder.rows)

    async def _write_each(self, conn: AsyncConnection) -> None:
        now = self.now
        sent, suppressed, deferred = [], [], []
        for touch_id, user_id, _, status, channel, reason, until, delay in self.decided:
            if status == "dispatched":
                sent.append(
                    {"b_id": touch_id, "b_user": user_id, "b_channel": channel, "b_now": now}
                )
            elif status == "suppressed":
                suppressed.append(
                    {"b_id": touch_id, "b_user": user_id, "b_reason": reason, "b_now": now}
                )
            else:
                deferred.append(
                    {
                        "b_id": touch_id,
                        "b_user": user_id,
                        "b_due": until,
                        "b_reason": reason,
                        "b_delay": delay,
                        "b_now": now,
                    }
                )
        for statement, params in ((_SENT, sent), (_SUPPRESSED, suppressed), (_DEFERRED, deferred)):
            if params:
                await conn.execute(statement, params)


def _decide(
    user_id: str,
    rows: list[Any],
    user: domain.UserView,
    promotions: dict[str, _Promotion],
    out: _Outcome,
) -> None:
    now = out.now
    before = user.fatigue
    first = promotions.get(rows[0][_PROMOTION])
    policy_fatigue = (first.policy if first else None) or next(
        p.policy for p in promotions.values()
    )
    user.fatigue, changes = domain.on_time(
        user.fatigue, now, user.first_seen, policy_fatigue.fatigue
    )
    if len(rows) == 1:
        row = rows[0]
        by_id = {row[_ID]: row}
    else:
        by_id = {r[_ID]: r for r in rows}
    due = [_due_touch(r, promotions.get(r[_PROMOTION])) for r in rows]

    def policy_of(touch: domain.DueTouch) -> Policy:
        promotion = promotions.get(touch.promotion_id)
        return promotion.policy if promotion else policy_fatigue

    encoder = out.encoder
    for touch, decision in domain.decide_user(due, user, now, policy_of):
        row = by_id[touch.touch_id]
        touch_id = touch.touch_id
        if type(decision) is domain.Send:
            promotion = promotions[touch.promotion_id]
            channels = list(decision.channels)
            out.decided.append(
                (touch_id, user_id, row[_DUE], "dispatched", channels[0], None, None, 0.0)
            )
            out.contacts.append(
                (touch_id, user_id, now, touch.promotion_id, touch.wave, "reserved")
            )
            encoder.add(
                DUE_TYPE,
                user_id,
                f"{touch_id}.due",
                _touch_due(user_id, row, channels, promotion, touch),
            )
        elif type(decision) is domain.Defer:
            delay = (decision.until - row[_DUE]).total_seconds()
            out.decided.append(
                (
                    touch_id,
                    user_id,
                    row[_DUE],
                    "planned",
                    None,
                    decision.reason,
                    decision.until,
                    delay,
                )
            )
        else:
            assert isinstance(decision, domain.Suppress)
            out.decided.append(
                (touch_id, user_id, row[_DUE], "suppressed", None, decision.reason, None, 0.0)
            )
            encoder.add(
                SUPPRESSED_TYPE,
                user_id,
                f"{touch_id}.suppressed",
                {
                    "touch_id": touch_id,
                    "user_id": user_id,
                    "promotion_id": touch.promotion_id,
                    "wave": touch.wave,
                    "variant": row[_VARIANT],
                    "channel": None,
                    "reason": decision.reason,
                    "at": encoder.time,
                },
            )
    if user.fatigue != before:
        after = user.fatigue
        values = fatigue_values(after)
        out.fatigue.append(
            {
                "b_user": user_id,
                "b_fatigue": values["fatigue"],
                "b_paused": values["paused"],
                "b_unanswered": values["unanswered"],
                "b_engaged": values["last_engaged_at"],
                "b_now": now,
            }
        )
    if changes:
        out.history += [history_row(user_id, change) for change in changes]


def _due_touch(row: Any, promotion: _Promotion | None) -> domain.DueTouch:
    due_at = row[_DUE]
    return domain.DueTouch(
        row[_ID],
        row[_PROMOTION],
        row[_WAVE],
        row[_VARIANT] or "",
        due_at,
        row[_DEADLINE] or due_at,
        row[_PARALLEL],
        row[_RANK],
        row[_ESSENTIAL],
        due_at if promotion is None else promotion.ended_at,
        _channel_order(row[_ORDER] or ""),
        promotion is None or promotion.cancelled,
    )


@functools.lru_cache(maxsize=256)
def _channel_order(stored: str) -> tuple[Channel, ...]:
    return tuple(c for c in stored.split(",") if c)  # type: ignore[misc]


def _touch_due(
    user_id: str,
    row: Any,
    channels: list[Any],
    promotion: _Promotion,
    touch: domain.DueTouch,
) -> dict[str, Any]:
    """The data of a touch.due event (the TouchDue schema; a unit test validates it).

    `row`: a claimed row (positions `_ID` ... `_SEGMENT`)."""
    variables = {
        "promotion_id": touch.promotion_id,
        "promotion_name": promotion.name or touch.promotion_id,
        "wave": touch.wave,
    }
    coupon = row[_COUPON]
    if coupon:
        variables["coupon_code"] = domain.coupon_code(user_id, touch.promotion_id, touch.wave)
    return {
        "touch_id": touch.touch_id,
        "user_id": user_id,
        "promotion_id": touch.promotion_id,
        "wave": touch.wave,
        "variant": row[_VARIANT],
        "channel": channels[0],
        "due_at": row[_DUE],  # orjson writes them as isoformat() does
        "deadline": touch.deadline,
        "channels": channels,
        "parallel": min(touch.parallel, len(channels)),
        "coupon": bool(coupon),
        "content": promotion.content(touch.wave, touch.variant, channels),
        "variables": variables,
        "segment": row[_SEGMENT],
    }


async def next_due(ctx: ServiceContext) -> datetime | None:
    async with ctx.db.connect() as conn:
        found: datetime | None = await conn.scalar(
            select(func.min(_t.c.due_at)).where(and_(_t.c.status == "planned"))
        )
    return found


async def run(ctx: ServiceContext, config: SchedulingSettings) -> None:
    """Dispatch until cancelled: at once while there is work, else until the next due time,
    a clock move, newly planned touches or `dispatch_idle_s`."""
    shared = state(ctx)
    wake = shared.wake
    shared.running += 1
    try:
        await _loop(ctx, config, wake)
    finally:
        shared.running -= 1


async def _loop(ctx: ServiceContext, config: SchedulingSettings, wake: asyncio.Event) -> None:
    shared = state(ctx)
    failures = 0
    partial_at = -math.inf  # when the last claim that did not fill a batch started
    while not shared.stopping:
        try:
            # After a partial batch, let the next one gather for a moment: a claim costs
            # the same dozen statements for one touch as for a thousand.
            gather = partial_at + config.dispatch_gather_s - time.monotonic()
            if gather > 0:
                await asyncio.sleep(gather)
            wake.clear()
            started = time.monotonic()
            claimed = await _finish_even_if_cancelled(
                dispatch_once(ctx, batch=config.dispatch_batch)
            )
            failures = 0
            if claimed >= config.dispatch_batch:
                continue
            partial_at = started
            upcoming = await next_due(ctx)
        except asyncio.CancelledError:
            raise
        except Exception:
            failures += 1
            log.warning("dispatch failed; retrying", exc_info=True)
            await asyncio.sleep(min(5.0, 0.05 * 2 ** min(failures, 10)))
            continue
        now = ctx.clock.now()
        if upcoming is not None and upcoming <= now:
            if claimed:
                continue
            # Due rows another dispatcher holds: look again shortly.
            await asyncio.sleep(min(0.05, config.dispatch_idle_s))
            continue
        await _nap(ctx, wake, upcoming or now, config.dispatch_idle_s)


async def _finish_even_if_cancelled(work: Coroutine[Any, Any, int]) -> int:
    """Let a dispatch transaction end (commit or roll back) before a cancellation goes on:
    a transaction cut in the middle could keep its per-user locks until the connection dies."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=LOCK_TIMEOUT_S * 2)
        raise


async def _nap(ctx: ServiceContext, wake: asyncio.Event, until: datetime, max_s: float) -> None:
    sleeper = asyncio.ensure_future(ctx.clock.sleep_until(until, max_wait_s=max_s))
    waker = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, waker):
            task.cancel()
        for task in (sleeper, waker):
            with contextlib.suppress(asyncio.CancelledError):
                await task
