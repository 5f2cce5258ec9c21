"""Segmentation's tables (schema `segmentation`) and the queries that need SQL's help."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    case,
    cast,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from services.segmentation import domain
from services.segmentation.config import SegmentationConfig
from services.segmentation.encoding import ActivityBatch
from shared.db import UtcDateTime, insert_ignore, upsert
from shared.outbox import outbox_table, pack_sql

SCHEMA = "segmentation"
metadata = MetaData(schema=SCHEMA)

participants = Table(
    "participants",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("user_id", String(128), primary_key=True),
    Column("added_at", UtcDateTime(), nullable=False),
)

# One row per ended promotion whose audience is being (or was) emitted; the
# cursor moves in the same transaction as each chunk's outbox rows, so a crash
# resumes where it stopped instead of emitting twice or skipping.
audiences = Table(
    "audiences",
    metadata,
    Column("promotion_id", String(128), primary_key=True),
    Column("policy", String(64), nullable=False),
    Column("ended_at", UtcDateTime(), nullable=False),
    Column("cursor", String(128), nullable=True),
    Column("completed_at", UtcDateTime(), nullable=True),
)

outbox = outbox_table(metadata)

users = Table(
    "users",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("birth_year", Integer, nullable=True),
    Column("timezone", String(64), nullable=False),
    Column("locale", String(35), nullable=True),
    Column("addresses", JSON, nullable=False),
    Column("consent", JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Who was erased and when: activities of theirs that occurred before arrive late
# (a replayed topic, a retried batch) are dropped instead of bringing them back.
erasures = Table(
    "erasures",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("erased_at", UtcDateTime(), nullable=False),
)

activities = Table(
    "activities",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("user_id", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("amount", Float, nullable=True),
    Column("currency", String(3), nullable=True),
    Column("item_id", String(128), nullable=True),
    Column("category", String(128), nullable=True),
    Column("promotion_id", String(128), nullable=True),
    Column("recorded_at", UtcDateTime(), nullable=False),
    Index("ix_activities_user_time", "user_id", "occurred_at"),
)

# Kept current by every batch of activities and engagements (batched upserts);
# the periodic ranking reads nothing else.
aggregates = Table(
    "aggregates",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("purchases", Integer, nullable=False, default=0),
    Column("visits", Integer, nullable=False, default=0),
    Column("monetary", Float, nullable=False, default=0.0),
    Column("ltv", Float, nullable=False, default=0.0),
    Column("last_purchase_at", UtcDateTime(), nullable=True),
    Column("last_interaction_at", UtcDateTime(), nullable=True),
    Column("abuse_review", Boolean, nullable=False, default=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

# Net spend per user and calendar month: the LTV window moves by whole months.
user_months = Table(
    "user_months",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("month", Date, primary_key=True),
    Column("amount", Float, nullable=False),
    Column("purchases", Integer, nullable=False),
)

channel_engagement = Table(
    "channel_engagement",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("channel", String(16), primary_key=True),
    Column("opens", Integer, nullable=False),
    Column("clicks", Integer, nullable=False),
    Column("last_at", UtcDateTime(), nullable=False),
)

# (touch, kind) already counted: a redelivered engagement is not counted twice.
engagements_seen = Table(
    "engagements_seen",
    metadata,
    Column("touch_id", String(128), primary_key=True),
    Column("kind", String(16), primary_key=True),
)

# The last full ranking, rebuilt by every pass.
user_scores = Table(
    "user_scores",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("r", SmallInteger, nullable=False),
    Column("f", SmallInteger, nullable=False),
    Column("m", SmallInteger, nullable=False),
    Column("value_layer", String(8), nullable=False),
    # The value the layer was given for: the layer stands while the value is unchanged.
    Column("ltv", Float, nullable=False),
)

STATE_ID = 1
scoring_state = Table(
    "scoring_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("scored_at", UtcDateTime(), nullable=True),
    Column("users", Integer, nullable=False),
    Column("cuts", JSON, nullable=True),
    Column("ltv_window_start", Date, nullable=True),
    Column("seconds", Float, nullable=True),
)


# -- reading -------------------------------------------------------------------------


def aggregates_of(row: Any) -> domain.Aggregates:
    return domain.Aggregates(
        user_id=row.user_id,
        purchases=row.purchases,
        monetary=row.monetary,
        ltv=row.ltv,
        last_purchase_at=row.last_purchase_at,
        last_interaction_at=row.last_interaction_at,
        abuse_review=bool(row.abuse_review),
    )


async def scoring_state_of(conn: AsyncConnection) -> Any:
    return (
        await conn.execute(select(scoring_state).where(scoring_state.c.id == STATE_ID))
    ).one_or_none()


async def window_start(conn: AsyncConnection, now: datetime, config: SegmentationConfig) -> date:
    """The LTV window as the last pass left it (activities are counted against that one)."""
    state = await scoring_state_of(conn)
    if state is not None and state.ltv_window_start is not None:
        return as_date(state.ltv_window_start)
    return domain.ltv_window_start(now, config.ltv.window_months)


def as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def participants_between(promotion_id: str, first: str, last: str) -> Any:
    """The user ids of one audience chunk, as a subquery (no list of ids to bind)."""
    p = participants.c
    return select(p.user_id).where(
        p.promotion_id == promotion_id, p.user_id >= first, p.user_id <= last
    )


async def engagement_of(
    conn: AsyncConnection, user_ids: Sequence[str] | Any
) -> dict[str, dict[Any, tuple[int, int]]]:
    """(opens, clicks) per channel of each user; `user_ids` a list or a subquery."""
    found: dict[str, dict[Any, tuple[int, int]]] = {}
    if isinstance(user_ids, list) and not user_ids:
        return found
    rows = await conn.execute(
        select(channel_engagement).where(channel_engagement.c.user_id.in_(user_ids))
    )
    for row in rows:
        found.setdefault(row.user_id, {})[row.channel] = (row.opens, row.clicks)
    return found


async def window_counts(
    conn: AsyncConnection, user_ids: Sequence[str] | Any, days: int, now: datetime
) -> dict[str, domain.WindowCounts]:
    """Purchases, net spend and visits of each user within the last `days` days."""
    if isinstance(user_ids, list) and not user_ids:
        return {}
    a = activities.c
    query = (
        select(
            a.user_id,
            *(_window_sum(metric).label(metric) for metric in ("purchases", "spend", "visits")),
        )
        .where(a.user_id.in_(user_ids), a.occurred_at > now - _days(days), a.occurred_at <= now)
        .group_by(a.user_id)
    )
    return {
        row.user_id: domain.WindowCounts(int(row.purchases), float(row.spend), int(row.visits))
        for row in await conn.execute(query)
    }


def _days(days: int) -> timedelta:
    return timedelta(days=days)


def _window_sum(metric: str) -> Any:
    """The sum behind one `domain.WindowCounts` field, over the activities selected."""
    a = activities.c
    if metric == "spend":
        return func.sum(
            case(
                (a.kind == "purchase", func.coalesce(a.amount, 0.0)),
                (a.kind == "refund", -func.coalesce(a.amount, 0.0)),
                else_=0.0,
            )
        )
    kind = {"purchases": "purchase", "visits": "visit"}[metric]
    return func.sum(case((a.kind == kind, 1), else_=0))


def window_column(user_id: Any, days: int, metric: str, now: datetime) -> Any:
    """One `domain.WindowCounts` field of the user `user_id` (a column) as a scalar subquery:
    what `window_counts` counts, 0 without activities in the window."""
    a = activities.c
    return (
        select(func.coalesce(_window_sum(metric), 0.0 if metric == "spend" else 0))
        .where(a.user_id == user_id, a.occurred_at > now - _days(days), a.occurred_at <= now)
        .scalar_subquery()
    )


# -- writing activities ------------------------------------------------------------------


async def insert_new_activities(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert what is new; return the ids that were (an id seen before is ignored)."""
    if not rows:
        return set()
    result = await conn.execute(insert_ignore(activities).returning(activities.c.id), list(rows))
    return set(result.scalars())


def _later_of(column: Any, proposed: Any) -> Any:
    """The later of the kept and the proposed timestamp; NULL-safe on both dialects."""
    return case(
        (column.is_(None), proposed),
        (proposed.is_(None), column),
        (proposed > column, proposed),
        else_=column,
    )


async def add_to_aggregates(
    conn: AsyncConnection, deltas: Sequence[domain.UserDelta], now: datetime
) -> None:
    if not deltas:
        return
    ins = postgresql.insert(aggregates)
    ex = ins.excluded
    t = aggregates.c
    stmt = ins.on_conflict_do_update(
        index_elements=["user_id"],
        set_={
            "purchases": t.purchases + ex.purchases,
            "visits": t.visits + ex.visits,
            "monetary": t.monetary + ex.monetary,
            "ltv": t.ltv + ex.ltv,
            "last_purchase_at": _later_of(t.last_purchase_at, ex.last_purchase_at),
            "last_interaction_at": _later_of(t.last_interaction_at, ex.last_interaction_at),
            "updated_at": ex.updated_at,
        },
    )
    await conn.execute(
        stmt,
        [
            {
                "user_id": d.user_id,
                "purchases": d.purchases,
                "visits": d.visits,
                "monetary": d.monetary,
                "ltv": d.ltv,
                "last_purchase_at": d.last_purchase_at,
                "last_interaction_at": d.last_interaction_at,
                "abuse_review": False,
                "updated_at": now,
            }
            for d in deltas
        ],
    )


async def add_to_months(
    conn: AsyncConnection, buckets: dict[tuple[str, date], tuple[float, int]]
) -> None:
    if not buckets:
        return
    ins = postgresql.insert(user_months)
    stmt = ins.on_conflict_do_update(
        index_elements=["user_id", "month"],
        set_={
            "amount": user_months.c.amount + ins.excluded.amount,
            "purchases": user_months.c.purchases + ins.excluded.purchases,
        },
    )
    await conn.execute(
        stmt,
        [
            {"user_id": uid, "month": month, "amount": amount, "purchases": count}
            for (uid, month), (amount, count) in buckets.items()
        ],
    )


async def purchase_times(
    conn: AsyncConnection,
    pairs: Sequence[tuple[str, str]],
    since: datetime,
    until: datetime,
) -> dict[tuple[str, str], list[datetime]]:
    """Purchase times of each (user, item) pair between `since` and `until`."""
    a = activities.c
    found: dict[tuple[str, str], list[datetime]] = {}
    for start in range(0, len(pairs), 500):
        chunk = pairs[start : start + 500]
        rows = await conn.execute(
            select(a.user_id, a.item_id, a.occurred_at).where(
                a.user_id.in_(sorted({u for u, _ in chunk})),
                tuple_(a.user_id, a.item_id).in_(chunk),
                a.kind == "purchase",
                a.occurred_at >= since,
                a.occurred_at <= until,
            )
        )
        for row in rows:
            found.setdefault((row.user_id, row.item_id), []).append(row.occurred_at)
    return found


async def flag_abuse(conn: AsyncConnection, user_ids: Sequence[str], now: datetime) -> None:
    if user_ids:
        await conn.execute(
            update(aggregates)
            .where(aggregates.c.user_id.in_(sorted(user_ids)))
            .values(abuse_review=True, updated_at=now)
        )


async def touch_aggregates(
    conn: AsyncConnection, last_interaction: dict[str, datetime], now: datetime
) -> None:
    """Create missing aggregate rows and move their last interaction forward."""
    if not last_interaction:
        return
    await add_to_aggregates(
        conn,
        [
            domain.UserDelta(user_id=uid, last_interaction_at=when)
            for uid, when in sorted(last_interaction.items())
        ],
        now,
    )


async def add_engagement(
    conn: AsyncConnection, counts: dict[tuple[str, str], tuple[int, int, datetime]]
) -> None:
    if not counts:
        return
    ins = postgresql.insert(channel_engagement)
    t = channel_engagement.c
    stmt = ins.on_conflict_do_update(
        index_elements=["user_id", "channel"],
        set_={
            "opens": t.opens + ins.excluded.opens,
            "clicks": t.clicks + ins.excluded.clicks,
            "last_at": _later_of(t.last_at, ins.excluded.last_at),
        },
    )
    await conn.execute(
        stmt,
        [
            {"user_id": uid, "channel": ch, "opens": o, "clicks": c, "last_at": at}
            for (uid, ch), (o, c, at) in sorted(counts.items())
        ],
    )


# -- the ranking ------------------------------------------------------------------------


async def recompute_ltv(conn: AsyncConnection, start: date) -> None:
    """LTV of every user from the monthly buckets of the window (when the window moved)."""
    m = user_months.c
    in_window = (
        select(func.coalesce(func.sum(m.amount), 0.0))
        .where(m.user_id == aggregates.c.user_id, m.month >= start)
        .scalar_subquery()
    )
    await conn.execute(update(aggregates).values(ltv=in_window))


# Sorting 1,000,000 rows in memory instead of on disk (PostgreSQL; this transaction only).
RANKING_WORK_MEM = "256MB"
# Grouping 10,000,000 activities by user and by user-month in memory (hash aggregates).
REBUILD_WORK_MEM = "1GB"


async def _values_at(
    conn: AsyncConnection, order: Sequence[Any], columns: Sequence[Any], positions: Sequence[int]
) -> dict[int, tuple[Any, ...]]:
    """The values at 1-based positions of the population sorted by `order` (one sort)."""
    ranked = select(
        *[c.label(f"c{i}") for i, c in enumerate(columns)],
        func.row_number().over(order_by=order).label("position"),
    ).subquery()
    rows = await conn.execute(select(ranked).where(ranked.c.position.in_(sorted(set(positions)))))
    return {int(row.position): tuple(row[: len(columns)]) for row in rows}


def _above(column: Any, thresholds: Sequence[Any], type_: Any) -> Any:
    """1 + how many thresholds the value is above (None: above for any non-null value)."""
    score: Any = literal(1)
    for t in thresholds:
        over = column.is_not(None) if t is None else column > literal(t, type_)
        score = score + case((over, 1), else_=0)
    return score


async def rank_everyone(
    conn: AsyncConnection, is_postgres: bool, shares: tuple[int, int, int]
) -> domain.Cuts | None:
    """Replace the ranking by a new one over the aggregates; return its thresholds.

    The formulas of `domain.score_population`, found by PostgreSQL (or SQLite): one
    row_number() sort per measure gives the values at the quintile and layer
    positions (`domain.threshold_positions`, `domain.layer_positions`), then one scan
    scores everyone against them. None when there is nobody to rank.
    """
    t = aggregates.c
    if is_postgres:
        await conn.execute(text(f"SET LOCAL work_mem = '{RANKING_WORK_MEM}'"))
        await conn.execute(text(f'TRUNCATE "{SCHEMA}".user_scores'))
    else:
        await conn.execute(delete(user_scores))
    n = int(await conn.scalar(select(func.count()).select_from(aggregates)) or 0)
    if n == 0:
        return None
    positions = domain.threshold_positions(n)

    async def thresholds(order: Any, column: Any) -> tuple[Any, ...]:
        found = await _values_at(conn, [order], [column], positions)
        return tuple(found[j][0] for j in positions)

    recency = await thresholds(t.last_purchase_at.asc().nulls_first(), t.last_purchase_at)
    frequency = await thresholds(t.purchases, t.purchases)
    monetary = await thresholds(t.monetary, t.monetary)
    p1, p2 = domain.layer_positions(n, shares)
    layer_at = await _values_at(conn, [t.ltv, t.user_id], [t.ltv, t.user_id], [p1, p2])
    by_value = tuple_(t.ltv, t.user_id)

    def up_to(position: int) -> Any:
        ltv, user_id = layer_at[position]
        return by_value <= tuple_(literal(ltv, Float), literal(user_id, String))

    layer: Any = literal_column("'head'")
    if p2:
        layer = case((up_to(p2), literal_column("'core'")), else_=layer)
    if p1:
        layer = case((up_to(p1), literal_column("'base'")), else_=layer)
    scored = select(
        t.user_id,
        _above(t.last_purchase_at, recency, UtcDateTime()),
        _above(t.purchases, frequency, Integer()),
        _above(t.monetary, monetary, Float()),
        layer,
        t.ltv,
    )
    await conn.execute(
        user_scores.insert().from_select(["user_id", "r", "f", "m", "value_layer", "ltv"], scored)
    )
    return domain.Cuts(
        recency=tuple(None if v is None else _utc(v) for v in recency),
        frequency=tuple(float(v) for v in frequency),
        monetary=tuple(float(v) for v in monetary),
        base_max=float(layer_at[p1][0]) if p1 else None,
        core_max=float(layer_at[p2][0]) if p2 else None,
    )


def _utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return domain.aware(value)
    return domain.aware(datetime.fromisoformat(str(value)))


async def save_state(
    conn: AsyncConnection,
    *,
    scored_at: datetime,
    users_ranked: int,
    cuts: domain.Cuts | None,
    start: date,
    seconds: float,
) -> None:
    await conn.execute(
        upsert(scoring_state, ["id"]),
        {
            "id": STATE_ID,
            "scored_at": scored_at,
            "users": users_ranked,
            "cuts": None if cuts is None else cuts.to_json(),
            "ltv_window_start": start,
            "seconds": seconds,
        },
    )


async def tier_counts(conn: AsyncConnection, config: SegmentationConfig) -> list[Any]:
    """(r, f, m, value_layer, ltv_tier, users) of the last ranking."""
    s = user_scores.c
    ltv = config.ltv
    ltv_tier = case(
        (s.ltv > ltv.high_potential_above, literal_column("'high_potential'")),
        (s.ltv >= ltv.potential_churn_from, literal_column("'potential_churn'")),
        else_=literal_column("'silent'"),
    ).label("ltv_tier")
    rows = await conn.execute(
        select(s.r, s.f, s.m, s.value_layer, ltv_tier, func.count().label("users")).group_by(
            s.r, s.f, s.m, s.value_layer, ltv_tier
        )
    )
    return list(rows.all())


async def birth_year_counts(conn: AsyncConnection) -> list[Any]:
    rows = await conn.execute(
        select(users.c.birth_year, func.count().label("users")).group_by(users.c.birth_year)
    )
    return list(rows.all())


async def silent_count(conn: AsyncConnection, cutoff: datetime) -> int:
    t = aggregates.c
    count = await conn.scalar(
        select(func.count()).where(
            or_(t.last_interaction_at.is_(None), t.last_interaction_at <= cutoff)
        )
    )
    return int(count or 0)


async def abuse_count(conn: AsyncConnection) -> int:
    count = await conn.scalar(select(func.count()).where(aggregates.c.abuse_review.is_(True)))
    return int(count or 0)


# -- erasure -----------------------------------------------------------------------------


async def erase(conn: AsyncConnection, user_id: str) -> int:
    """Delete everything kept about one user; returns how many rows went."""
    removed = 0
    for table in (
        users,
        activities,
        aggregates,
        user_months,
        channel_engagement,
        user_scores,
        participants,
    ):
        result = await conn.execute(delete(table).where(table.c.user_id == user_id))
        removed += max(result.rowcount or 0, 0)
    return removed


def late_for_erased(erased_at: dict[str, datetime], user_id: str, occurred_at: datetime) -> bool:
    when = erased_at.get(user_id)
    return when is not None and occurred_at <= when


async def erased_among(conn: AsyncConnection, user_ids: Sequence[str]) -> dict[str, datetime]:
    if not user_ids:
        return {}
    rows = await conn.execute(select(erasures).where(erasures.c.user_id.in_(sorted(user_ids))))
    return {row.user_id: row.erased_at for row in rows}


def _scoring_columns(driver_times: bool = False) -> list[Any]:
    """What a segment is computed from: profile age, kept aggregates, the last ranking.

    `driver_times`: the timestamps as the driver returns them (asyncpg: aware, in UTC),
    without `UtcDateTime`'s conversion per value.
    """
    u, a, s = users.c, aggregates.c, user_scores.c
    times: list[Any] = [a.last_purchase_at, a.last_interaction_at]
    if driver_times:
        times = [type_coerce(t, DateTime(timezone=True)).label(t.name) for t in times]
    return [
        u.birth_year,
        a.purchases,
        a.monetary,
        a.ltv,
        *times,
        a.abuse_review,
        s.value_layer.label("ranked_layer"),
        s.ltv.label("ranked_ltv"),
    ]


def segment_query(user_id: str) -> Any:
    """One user's scoring inputs; no row when nothing is known about them."""
    u, a, s = users.c, aggregates.c, user_scores.c
    return (
        select(a.user_id, *_scoring_columns())
        .select_from(
            aggregates.outerjoin(users, u.user_id == a.user_id).outerjoin(
                user_scores, s.user_id == a.user_id
            )
        )
        .where(a.user_id == user_id)
    )


def audience_query(
    promotion_id: str,
    cursor: str | None,
    limit: int | None = None,
    *,
    postgres: bool = False,
    windows: Sequence[tuple[int, str]] = (),
    now: datetime | None = None,
) -> Any:
    """Participants after `cursor` with everything their snapshot needs, in user id order.

    Addresses and consent come as their JSON text (parsed with orjson by the encoder); on
    `postgres` the timestamps as asyncpg returns them (aware UTC already). Each (days,
    metric) of `windows` adds that `domain.WindowCounts` field as of `now` (columns `w0`,
    `w1`...: one index range scan per participant, no second query and no dict per user).
    """
    p, u, a, s = participants.c, users.c, aggregates.c, user_scores.c
    if windows and now is None:
        raise ValueError("window columns need `now`")
    query = (
        select(
            p.user_id,
            u.timezone,
            u.locale,
            type_coerce(u.addresses, Text).label("addresses"),
            type_coerce(u.consent, Text).label("consent"),
            *_scoring_columns(driver_times=postgres),
            *(
                window_column(p.user_id, days, metric, now).label(f"w{i}")
                for i, (days, metric) in enumerate(windows)
                if now is not None
            ),
        )
        .select_from(
            participants.outerjoin(users, u.user_id == p.user_id)
            .outerjoin(aggregates, a.user_id == p.user_id)
            .outerjoin(user_scores, s.user_id == p.user_id)
        )
        .where(p.promotion_id == promotion_id)
        .order_by(p.user_id)
    )
    if limit is not None:
        query = query.limit(limit)
    if cursor is not None:
        query = query.where(p.user_id > cursor)
    return query


async def rebuild_from_activities(conn: AsyncConnection, start: date, now: datetime) -> int:
    """Recount every aggregate and monthly bucket from the raw activities (after a restore).

    Abuse flags stay as they are: they are decisions awaiting review, not counts. Two
    set-based passes over the activities (`rebuild_months`, `rebuild_aggregates`; they
    may also run concurrently, each in its own transaction). Returns how many users.
    """
    await rebuild_months(conn)
    return await rebuild_aggregates(conn, start, now)


def _signed_and_month(conn: AsyncConnection) -> tuple[Any, Any]:
    a = activities.c
    signed = case(
        (a.kind == "purchase", func.coalesce(a.amount, 0.0)),
        (a.kind == "refund", -func.coalesce(a.amount, 0.0)),
        else_=0.0,
    )
    if conn.dialect.name == "postgresql":
        return signed, cast(func.date_trunc("month", a.occurred_at), Date)
    return signed, func.date(a.occurred_at, "start of month")


async def _rebuild_memory(conn: AsyncConnection) -> None:
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"SET LOCAL work_mem = '{REBUILD_WORK_MEM}'"))
        await conn.execute(text(f"SET LOCAL maintenance_work_mem = '{REBUILD_WORK_MEM}'"))


async def rebuild_months(conn: AsyncConnection) -> None:
    """Every monthly bucket again from the raw activities, grouped and written in key order.

    On PostgreSQL the old buckets go with TRUNCATE, which locks the table until the commit,
    and the primary key is dropped for the insert and built again afterwards: one sorted
    index build costs a third less than millions of index inserts (all in the transaction:
    a failure rolls the key back with the rest).
    """
    a = activities.c
    is_purchase = a.kind == "purchase"
    signed, month_expr = _signed_and_month(conn)
    await _rebuild_memory(conn)
    table = f'"{SCHEMA}".user_months'
    key: str | None = None
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"TRUNCATE {table}"))
        key = await conn.scalar(
            text(
                "SELECT conname FROM pg_constraint "
                "WHERE conrelid = CAST(:table AS regclass) AND contype = 'p'"
            ),
            {"table": f"{SCHEMA}.user_months"},
        )
        if key is not None:
            await conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{key}"'))
    else:
        await conn.execute(delete(user_months))
    buckets = (
        select(
            a.user_id,
            month_expr.label("month"),
            func.sum(signed).label("amount"),
            func.sum(case((is_purchase, 1), else_=0)).label("purchases"),
        )
        .where(a.kind.in_(("purchase", "refund")))
        .group_by(a.user_id, month_expr)
        .order_by(a.user_id, month_expr)
    )
    await conn.execute(
        user_months.insert().from_select(["user_id", "month", "amount", "purchases"], buckets)
    )
    if key is not None:
        await conn.execute(
            text(f'ALTER TABLE {table} ADD CONSTRAINT "{key}" PRIMARY KEY (user_id, month)')
        )


async def rebuild_aggregates(conn: AsyncConnection, start: date, now: datetime) -> int:
    """Every user's counts from the raw activities, LTV summed over the window's months
    (as the monthly buckets count them); returns how many users."""
    a = activities.c
    is_purchase = a.kind == "purchase"
    signed, month_expr = _signed_and_month(conn)
    await _rebuild_memory(conn)
    interaction = a.kind.in_(sorted(domain.INTERACTIONS))
    counts = (
        select(
            a.user_id,
            func.sum(case((is_purchase, 1), else_=0)).label("purchases"),
            func.sum(case((a.kind == "visit", 1), else_=0)).label("visits"),
            func.sum(signed).label("monetary"),
            # The months of the LTV window, as the monthly buckets count them.
            func.sum(case((month_expr >= literal(start, Date), signed), else_=0.0)).label("ltv"),
            func.max(case((is_purchase, a.occurred_at))).label("last_purchase_at"),
            func.max(case((interaction, a.occurred_at))).label("last_interaction_at"),
        )
        .group_by(a.user_id)
        .subquery()
    )
    rows = select(
        counts.c.user_id,
        counts.c.purchases,
        counts.c.visits,
        counts.c.monetary,
        counts.c.ltv,
        counts.c.last_purchase_at,
        counts.c.last_interaction_at,
        literal(False, Boolean),
        literal(now, UtcDateTime()),
    )
    # SQLite needs a WHERE before an upsert's ON CONFLICT to parse INSERT ... SELECT.
    rows = rows.where(counts.c.user_id.is_not(None)).order_by(counts.c.user_id)
    ins = postgresql.insert(aggregates).from_select(
        [
            "user_id",
            "purchases",
            "visits",
            "monetary",
            "ltv",
            "last_purchase_at",
            "last_interaction_at",
            "abuse_review",
            "updated_at",
        ],
        rows,
    )
    stmt = ins.on_conflict_do_update(
        index_elements=["user_id"],
        set_={
            name: ins.excluded[name]
            for name in (
                "purchases",
                "visits",
                "monetary",
                "ltv",
                "last_purchase_at",
                "last_interaction_at",
                "updated_at",
            )
        },
    )
    result = await conn.execute(stmt)
    return max(result.rowcount or 0, 0)


# -- activities on PostgreSQL: one set-based statement per batch --------------------------

# The batch arrives as one JSON array of rows (`encoding.ActivityBatch`), in the order it
# was sent (one parameter: an array per column costs asyncpg a check per element), and for
# REST batches the outbox payloads as one bytea array (JSON would have them parsed). New
# activities (not seen before, not of an erased user from before the erasure) are inserted
# and, from what the INSERT returned, folded into the aggregates and the monthly buckets
# and, for REST batches, announced through the outbox - all in one statement and one round
# trip. Rows are locked in key order (ids, then users, then user-months) so that concurrent
# batches touching the same users wait for each other instead of deadlocking. It also returns
# the users the abuse check has to look at (`RecordedBatch.review`): those not flagged yet
# whose purchases, as this batch left them, reach the threshold - what `FLAG_ABUSE` would
# keep of the others anyway, found without reading every buyer's aggregates row again.
_SIGNED = (
    "CASE kind WHEN 'purchase' THEN coalesce(amount, 0.0) "
    "WHEN 'refund' THEN -coalesce(amount, 0.0) ELSE 0.0 END"
)
_INTERACTIONS_SQL = ", ".join(f"'{k}'" for k in sorted(domain.INTERACTIONS))
_RECORD_BATCH = f"""
WITH input AS (
    SELECT t.*, p.payload
    FROM ROWS FROM (json_to_recordset(CAST(:batch AS json)) AS (
        id text, user_id text, kind text, occurred_at timestamptz, amount float8,
        currency text, item_id text, category text, promotion_id text, lane smallint
    )) WITH ORDINALITY AS t(id, user_id, kind, occurred_at, amount, currency, item_id,
                           category, promotion_id, lane, position)
    LEFT JOIN unnest(CAST(:payloads AS bytea[])) WITH ORDINALITY AS p(payload, position)
        ON p.position = t.position
),
window_start AS (
    SELECT coalesce(
        (SELECT ltv_window_start FROM {SCHEMA}.scoring_state WHERE id = {STATE_ID}),
        CAST(:default_start AS date)
    ) AS start
),
new AS (
    INSERT INTO {SCHEMA}.activities
        (id, user_id, kind, occurred_at, amount, currency, item_id, category, promotion_id,
         recorded_at)
    SELECT id, user_id, kind, occurred_at, amount, currency, item_id, category, promotion_id,
           CAST(:now AS timestamptz)
    FROM input i
    WHERE NOT EXISTS (
        SELECT 1 FROM {SCHEMA}.erasures e
        WHERE e.user_id = i.user_id AND i.occurred_at <= e.erased_at
    )
    ORDER BY id
    ON CONFLICT (id) DO NOTHING
    RETURNING id, user_id, kind, occurred_at, amount
),
folded AS (
    INSERT INTO {SCHEMA}.aggregates AS t
        (user_id, purchases, visits, monetary, ltv, last_purchase_at, last_interaction_at,
         abuse_review, updated_at)
    SELECT user_id,
           count(*) FILTER (WHERE kind = 'purchase'),
           count(*) FILTER (WHERE kind = 'visit'),
           sum({_SIGNED}),
           coalesce(sum({_SIGNED}) FILTER (
               WHERE date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date
                     >= (SELECT start FROM window_start)
           ), 0.0),
           max(occurred_at) FILTER (WHERE kind = 'purchase'),
           max(occurred_at) FILTER (WHERE kind IN ({_INTERACTIONS_SQL})),
           false,
           CAST(:now AS timestamptz)
    FROM new
    GROUP BY user_id
    ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET
        purchases = t.purchases + excluded.purchases,
        visits = t.visits + excluded.visits,
        monetary = t.monetary + excluded.monetary,
        ltv = t.ltv + excluded.ltv,
        last_purchase_at = greatest(t.last_purchase_at, excluded.last_purchase_at),
        last_interaction_at = greatest(t.last_interaction_at, excluded.last_interaction_at),
        updated_at = excluded.updated_at
    RETURNING t.user_id, t.purchases, t.abuse_review
),
months AS (
    INSERT INTO {SCHEMA}.user_months AS t (user_id, month, amount, purchases)
    SELECT user_id, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month,
           sum({_SIGNED}), count(*) FILTER (WHERE kind = 'purchase')
    FROM new
    WHERE kind IN ('purchase', 'refund')
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (user_id, month) DO UPDATE SET
        amount = t.amount + excluded.amount,
        purchases = t.purchases + excluded.purchases
)
{{announce}}
SELECT ARRAY(SELECT id FROM new) AS new_ids,
       ARRAY(
           SELECT user_id FROM folded
           WHERE purchases >= CAST(:threshold AS integer) AND NOT abuse_review
       ) AS review
"""
# The new activities' events, one packed outbox row per lane (`shared.outbox.pack`), each in
# the batch's order: fewer rows for PostgreSQL to write here and for the relay to delete.
_ANNOUNCE = f""",
announced AS (
    INSERT INTO {SCHEMA}.{outbox.name} (lane, topic, key, payload, pack, messages, created_at)
    SELECT i.lane, CAST(:topic AS text), NULL, NULL,
           {pack_sql("i.user_id", "i.payload", "i.position")}, count(*),
           CAST(:now AS timestamptz)
    FROM input i JOIN new n ON n.id = i.id
    GROUP BY i.lane
    ORDER BY i.lane
)"""
RECORD_BATCH = text(_RECORD_BATCH.replace("{announce}", ""))
RECORD_BATCH_ANNOUNCED = text(_RECORD_BATCH.replace("{announce}", _ANNOUNCE))

# Users who bought one item `threshold` times within `window` (inclusive), among the pairs
# of new purchases: each purchase counts those of the same pair in the window after it.
# Only users not flagged yet with `threshold` purchases in all (their aggregates, just
# updated by this batch) are looked at: fewer cannot hold that many of one item. Nor are
# pairs whose user bought fewer than `threshold` times in the calendar months (UTC, as the
# monthly buckets count purchases) of the pair's span: the purchases in the span are fewer
# still. That spares reading the activities of users whose purchases are spread over time.
_FLAG_ABUSE = f"""
WITH pairs AS (
    SELECT p.user_id, p.item_id,
           min(p.occurred_at) - CAST(:window AS interval) AS since,
           max(p.occurred_at) + CAST(:window AS interval) AS until
    FROM json_to_recordset(CAST(:purchases AS json))
         AS p(user_id text, item_id text, occurred_at timestamptz)
    JOIN {SCHEMA}.aggregates g ON g.user_id = p.user_id
    WHERE g.purchases >= CAST(:threshold AS integer) AND NOT g.abuse_review
    GROUP BY p.user_id, p.item_id
),
likely AS (
    SELECT p.* FROM pairs p
    WHERE (
        SELECT coalesce(sum(m.purchases), 0) FROM {SCHEMA}.user_months m
        WHERE m.user_id = p.user_id
          AND m.month BETWEEN date_trunc('month', p.since AT TIME ZONE 'UTC')::date
                          AND date_trunc('month', p.until AT TIME ZONE 'UTC')::date
    ) >= CAST(:threshold AS integer)
),
bought AS (
    SELECT a.user_id,
           count(*) OVER (
               PARTITION BY a.user_id, a.item_id ORDER BY a.occurred_at
               RANGE BETWEEN CURRENT ROW AND CAST(:window AS interval) FOLLOWING
           ) AS purchases
    FROM likely p
    JOIN {SCHEMA}.activities a ON a.user_id = p.user_id AND a.item_id = p.item_id
    WHERE a.kind = 'purchase' AND a.occurred_at BETWEEN p.since AND p.until
)
UPDATE {SCHEMA}.aggregates SET abuse_review = true, updated_at = CAST(:now AS timestamptz)
WHERE user_id IN (SELECT user_id FROM bought WHERE purchases >= CAST(:threshold AS integer))
  AND NOT abuse_review
RETURNING user_id
"""
FLAG_ABUSE = text(_FLAG_ABUSE)


class RecordedBatch(NamedTuple):
    """What `record_batch_postgres` did: the ids that were new, and the users that the abuse
    check has to look at (not flagged, with `abuse_threshold` purchases or more now)."""

    new_ids: list[str]
    review: set[str]


async def record_batch_postgres(
    conn: AsyncConnection,
    batch: ActivityBatch,
    *,
    now: datetime,
    default_start: date,
    topic: str | None,
    abuse_threshold: int | None = None,
) -> RecordedBatch:
    """Insert, fold and (with `topic`) announce a batch.

    An announced batch needs its lanes and payloads (`encoding.activity_batch`'s announce);
    its outbox rows have no headers (`encoding.own_activity` tells them apart by their
    bytes). Without `abuse_threshold` no user is returned for review.
    """
    params: dict[str, Any] = {
        "batch": batch.rows,
        "payloads": batch.payloads,
        "now": now,
        "default_start": default_start,
        "threshold": abuse_threshold,
    }
    if topic is None:
        result = await conn.execute(RECORD_BATCH, params)
    else:
        result = await conn.execute(RECORD_BATCH_ANNOUNCED, {**params, "topic": topic})
    # One row of two arrays: asyncpg decodes them whole, no result row per activity.
    new_ids, review = result.one()
    return RecordedBatch(new_ids, set(review))


async def flag_abuse_postgres(
    conn: AsyncConnection,
    purchases: Sequence[tuple[str, str, datetime]],
    *,
    threshold: int,
    window: timedelta,
    now: datetime,
) -> list[str]:
    """Flag the users among these (user, item, time) purchases who bought an item too often."""
    if not purchases:
        return []
    rows = [{"user_id": u, "item_id": i, "occurred_at": at} for u, i, at in purchases]
    result = await conn.execute(
        FLAG_ABUSE,
        {
            "purchases": orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC).decode(),
            "window": window,
            "threshold": threshold,
            "now": now,
        },
    )
    return list(result.scalars())
