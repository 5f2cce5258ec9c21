"""Segmentation's commands and event handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, func, literal, select, update

from services.segmentation import domain, encoding, store
from services.segmentation.config import SegmentationConfig, load_config
from shared.bus.base import Message, OutMessage
from shared.db import insert_ignore, upsert
from shared.events import (
    ActivityRecorded,
    AudienceMemberResolved,
    EngagementRecorded,
    Event,
    PromotionEnded,
    SegmentSnapshot,
    UserErased,
    UserUpdated,
)
from shared.outbox import lane_for
from shared.service import ServiceContext

log = logging.getLogger(__name__)

PARTICIPANT_CHUNK = 5000
ACTIVITY_CHUNK = 1000
CONFIG_KEY = "segmentation_config"
EVENT_IDS_KEY = "segmentation_event_ids"
# Replicas rank one at a time (PostgreSQL advisory lock, released at commit).
RANKING_LOCK = 0x5E6A_11C0_0000_0001
PROFILE_FIELDS = ("birth_year", "timezone", "locale", "addresses", "consent")
CONTACT_FIELDS = ("timezone", "locale", "addresses", "consent")


def config_of(ctx: ServiceContext) -> SegmentationConfig:
    """The service's configuration (set by the composition root, else from the environment)."""
    config = ctx.extras.get(CONFIG_KEY)
    if config is None:
        config = ctx.extras[CONFIG_KEY] = load_config()
    assert isinstance(config, SegmentationConfig)
    return config


# -- users ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    user_id: str
    birth_year: int | None
    timezone: str
    locale: str | None
    addresses: dict[str, str]
    consent: dict[str, bool]
    created_at: datetime
    updated_at: datetime


def _profile(row: Any) -> Profile:
    return Profile(
        user_id=row.user_id,
        birth_year=row.birth_year,
        timezone=row.timezone,
        locale=row.locale,
        addresses=dict(row.addresses or {}),
        consent=dict(row.consent or {}),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def get_user(ctx: ServiceContext, user_id: str) -> Profile | None:
    async with ctx.db.connect() as conn:
        row = (
            await conn.execute(select(store.users).where(store.users.c.user_id == user_id))
        ).one_or_none()
    return None if row is None else _profile(row)


async def put_user(
    ctx: ServiceContext, user_id: str, changes: Mapping[str, Any]
) -> tuple[Profile, bool]:
    """Create or update a profile; fields not given keep their value. Returns (profile, created).

    Announces `user.updated` (through the outbox, same transaction) when the contact
    state - timezone, locale, addresses, consent - is new or changed.
    """
    now = ctx.clock.now()
    t = store.users
    async with ctx.db.begin() as conn:
        query = select(t).where(t.c.user_id == user_id)
        if ctx.db.is_postgres:
            query = query.with_for_update()
        row = (await conn.execute(query)).one_or_none()
        before: dict[str, Any] = (
            {"birth_year": None, "timezone": "UTC", "locale": None, "addresses": {}, "consent": {}}
            if row is None
            else {name: getattr(row, name) for name in PROFILE_FIELDS}
        )
        after = {**before, **{k: v for k, v in changes.items() if k in PROFILE_FIELDS}}
        if row is None:
            await conn.execute(
                t.insert(), {"user_id": user_id, **after, "created_at": now, "updated_at": now}
            )
            await conn.execute(
                insert_ignore(store.aggregates),
                {
                    "user_id": user_id,
                    "purchases": 0,
                    "visits": 0,
                    "monetary": 0.0,
                    "ltv": 0.0,
                    "abuse_review": False,
                    "updated_at": now,
                },
            )
        elif after != before:
            await conn.execute(
                update(t).where(t.c.user_id == user_id).values(**after, updated_at=now)
            )
        if row is None or any(after[k] != before[k] for k in CONTACT_FIELDS):
            await ctx.outbox.add(
                conn,
                [
                    UserUpdated(
                        user_id=user_id,
                        timezone=after["timezone"],
                        locale=after["locale"],
                        addresses=after["addresses"],
                        consent=after["consent"],
                    )
                ],
                now=now,
            )
        saved = (await conn.execute(select(t).where(t.c.user_id == user_id))).one()
    ctx.outbox.notify()
    return _profile(saved), row is None


async def erase_user(ctx: ServiceContext, user_id: str) -> int:
    """Delete the user's personal data here and announce the erasure to the other services."""
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        removed = await store.erase(conn, user_id)
        await conn.execute(
            upsert(store.erasures, ["user_id"]), {"user_id": user_id, "erased_at": now}
        )
        await ctx.outbox.add(conn, [UserErased(user_id=user_id, erased_at=now)], now=now)
    ctx.outbox.notify()
    log.info("user erased", extra={"rows": removed})
    return removed


# -- activities -------------------------------------------------------------------------


async def record_activity_items(ctx: ServiceContext, items: Sequence[Mapping[str, Any]]) -> int:
    """A validated REST batch (dicts of `api.ActivityCreate`): stored, folded and announced.

    Each new activity is announced as `activity.recorded` (through the outbox, same
    transaction): other services (metrics attribution) see every purchase on the
    `activities` topic. Returns how many were new.
    """
    if not ctx.db.is_postgres:
        return await record_activities(ctx, [_activity(i) for i in items], publish=True)
    unique = list({i["id"]: i for i in reversed(items)}.values())[::-1]
    now = ctx.clock.now()
    outbox = ctx.outbox
    lanes = outbox.lanes
    announce = encoding.Announce(
        lane=lambda user_id: lane_for(user_id, lanes),
        source=outbox.source,
        time=now,
        ids=_event_ids(ctx),
    )
    recorded = await _record_postgres(
        ctx,
        unique,
        encoding.activity_batch(unique, announce),
        now=now,
        topic=outbox.topic_name(ActivityRecorded.topic),
    )
    if recorded:
        outbox.notify()
    return recorded


def _activity(item: Mapping[str, Any]) -> domain.Activity:
    return domain.Activity(
        id=item["id"],
        user_id=item["user_id"],
        kind=item["kind"],
        occurred_at=item["occurred_at"],
        amount=item.get("amount"),
        item_id=item.get("item_id"),
        promotion_id=item.get("promotion_id"),
        currency=item.get("currency"),
        category=item.get("category"),
    )


def own_activities(ctx: ServiceContext) -> Callable[[Message], bool]:
    """Whether a consumed message is an `activity.recorded` this service published (and so
    applied when it accepted it), told from the first bytes of the event: `on_activities`
    would skip it after decoding it, the consumer passes it by undecoded."""
    own = encoding.own_activity(ctx.outbox.source)
    return lambda message: own(message.value)


def _event_ids(ctx: ServiceContext) -> encoding.EventIds:
    ids = ctx.extras.get(EVENT_IDS_KEY)
    if not isinstance(ids, encoding.EventIds):
        ids = ctx.extras[EVENT_IDS_KEY] = encoding.EventIds()
    return ids


async def _record_postgres(
    ctx: ServiceContext,
    items: Sequence[Mapping[str, Any]],
    batch: encoding.ActivityBatch,
    *,
    now: datetime,
    topic: str | None,
) -> int:
    """One statement inserts, folds and announces; a second one looks for abuse among the
    new purchases of the users the first one returned (few: most have fewer purchases than
    the threshold, or are flagged already)."""
    config = config_of(ctx)
    async with ctx.db.begin() as conn:
        recorded = await store.record_batch_postgres(
            conn,
            batch,
            now=now,
            default_start=domain.ltv_window_start(now, config.ltv.window_months),
            topic=topic,
            abuse_threshold=config.abuse.same_item_purchases,
        )
        review = recorded.review
        new_ids = set(recorded.new_ids) if review else set()
        purchases = [
            (i["user_id"], i["item_id"], i["occurred_at"])
            for i in items
            if i["user_id"] in review
            and i["kind"] == "purchase"
            and i.get("item_id") is not None
            and i["id"] in new_ids
        ]
        if purchases:
            flagged = await store.flag_abuse_postgres(
                conn,
                purchases,
                threshold=config.abuse.same_item_purchases,
                window=timedelta(hours=config.abuse.within_hours),
                now=now,
            )
            if flagged:
                log.info("users flagged for abuse review", extra={"users": len(flagged)})
    return len(recorded.new_ids)


async def record_activities(
    ctx: ServiceContext, batch: Sequence[domain.Activity], *, publish: bool = False
) -> int:
    """Store new activities and fold them into the aggregates; returns how many were new.

    `publish`: also announce each new activity as `activity.recorded` (through the outbox,
    same transaction), for activities that did not come from the topic (the REST ingest).
    On PostgreSQL a batch is one set-based statement (`store.record_batch_postgres`).
    """
    recorded = 0
    for start in range(0, len(batch), ACTIVITY_CHUNK):
        chunk = batch[start : start + ACTIVITY_CHUNK]
        if ctx.db.is_postgres and not publish:
            unique = [a.__dict__ for a in {a.id: a for a in reversed(chunk)}.values()][::-1]
            recorded += await _record_postgres(
                ctx, unique, encoding.activity_batch(unique), now=ctx.clock.now(), topic=None
            )
        else:
            recorded += await _record_chunk(ctx, chunk, publish=publish)
    if recorded and publish:
        ctx.outbox.notify()
    return recorded


async def _record_chunk(
    ctx: ServiceContext, chunk: Sequence[domain.Activity], *, publish: bool
) -> int:
    config = config_of(ctx)
    now = ctx.clock.now()
    unique = list({a.id: a for a in reversed(chunk)}.values())[::-1]
    async with ctx.db.begin() as conn:
        erased = await store.erased_among(conn, list({a.user_id for a in unique}))
        if erased:
            unique = [
                a for a in unique if not store.late_for_erased(erased, a.user_id, a.occurred_at)
            ]
        new_ids = await store.insert_new_activities(
            conn,
            [
                {
                    "id": a.id,
                    "user_id": a.user_id,
                    "kind": a.kind,
                    "occurred_at": a.occurred_at,
                    "amount": a.amount,
                    "currency": a.currency,
                    "item_id": a.item_id,
                    "category": a.category,
                    "promotion_id": a.promotion_id,
                    "recorded_at": now,
                }
                for a in unique
            ],
        )
        new = [a for a in unique if a.id in new_ids]
        if not new:
            return 0
        start = await store.window_start(conn, now, config)
        await store.add_to_aggregates(conn, domain.fold_activities(new, start), now)
        await store.add_to_months(conn, domain.month_amounts(new))
        await _check_abuse(conn, new, config, now)
        if publish:
            await ctx.outbox.add(conn, [recorded_event(a) for a in new], now=now)
    return len(new)


async def _check_abuse(
    conn: Any, new: Sequence[domain.Activity], config: SegmentationConfig, now: datetime
) -> None:
    purchases = [a for a in new if a.kind == "purchase" and a.item_id is not None]
    if not purchases:
        return
    window = timedelta(hours=config.abuse.within_hours)
    pairs = sorted({(a.user_id, str(a.item_id)) for a in purchases})
    times = await store.purchase_times(
        conn,
        pairs,
        min(a.occurred_at for a in purchases) - window,
        max(a.occurred_at for a in purchases) + window,
    )
    flagged = {
        user_id
        for (user_id, _), found in times.items()
        if domain.abuse_detected(found, threshold=config.abuse.same_item_purchases, window=window)
    }
    if flagged:
        await store.flag_abuse(conn, sorted(flagged), now)
        log.info("users flagged for abuse review", extra={"users": len(flagged)})


def activity_of(data: ActivityRecorded) -> domain.Activity:
    return domain.Activity(
        id=data.id,
        user_id=data.user_id,
        kind=data.kind,
        occurred_at=data.occurred_at,
        amount=data.amount,
        item_id=data.item_id,
        promotion_id=data.promotion_id,
        currency=data.currency,
        category=data.category,
    )


def recorded_event(activity: domain.Activity) -> ActivityRecorded:
    return ActivityRecorded(
        id=activity.id,
        user_id=activity.user_id,
        kind=activity.kind,
        occurred_at=activity.occurred_at,
        amount=activity.amount,
        currency=activity.currency,
        item_id=activity.item_id,
        category=activity.category,
        promotion_id=activity.promotion_id,
    )


async def on_activities(ctx: ServiceContext, events: list[Event[Any]]) -> None:
    """Activities from the `activities` topic: the same path as the REST batch.

    Events segmentation published itself (REST-ingested activities) were applied when
    they were accepted: they are skipped here, not counted twice (the consumer passes most
    of them by undecoded: see `own_activities`).
    """
    own = ctx.outbox.source
    foreign = [activity_of(e.data) for e in events if e.source != own]
    if foreign:
        await record_activities(ctx, foreign)


async def on_engagements(ctx: ServiceContext, events: list[Event[Any]]) -> None:
    """An open or a click ends silence and teaches the user's channel order."""
    useful: list[EngagementRecorded] = [
        e.data
        for e in events
        if e.data.kind in domain.ENGAGEMENT_KINDS and e.data.channel is not None
    ]
    if not useful:
        return
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        seen = await conn.execute(
            insert_ignore(store.engagements_seen).returning(
                store.engagements_seen.c.touch_id, store.engagements_seen.c.kind
            ),
            [{"touch_id": e.touch_id, "kind": e.kind} for e in useful],
        )
        new_keys = {(row.touch_id, row.kind) for row in seen}
        erased = await store.erased_among(conn, list({e.user_id for e in useful}))
        counts: dict[tuple[str, str], tuple[int, int, datetime]] = {}
        last: dict[str, datetime] = {}
        for e in useful:
            if (e.touch_id, e.kind) not in new_keys:
                continue
            if store.late_for_erased(erased, e.user_id, e.at):
                continue
            new_keys.discard((e.touch_id, e.kind))
            key = (e.user_id, str(e.channel))
            opens, clicks, at = counts.get(key, (0, 0, e.at))
            counts[key] = (
                opens + (e.kind == "opened"),
                clicks + (e.kind == "clicked"),
                max(at, e.at),
            )
            last[e.user_id] = max(last.get(e.user_id, e.at), e.at)
        await store.add_engagement(conn, counts)
        await store.touch_aggregates(conn, last, now)


# -- participants and audiences -----------------------------------------------------------


async def add_participants(ctx: ServiceContext, promotion_id: str, user_ids: Sequence[str]) -> int:
    """Record participants idempotently; returns how many were new."""
    now = ctx.clock.now()
    unique = list(dict.fromkeys(user_ids))
    added = 0
    async with ctx.db.begin() as conn:
        # One multi-row statement per chunk: its row count is exact on both dialects
        # and it stays under the driver's limit of bind parameters.
        for start in range(0, len(unique), PARTICIPANT_CHUNK):
            rows = [
                {"promotion_id": promotion_id, "user_id": user_id, "added_at": now}
                for user_id in unique[start : start + PARTICIPANT_CHUNK]
            ]
            result = await conn.execute(insert_ignore(store.participants).values(rows))
            added += result.rowcount
    return added


@dataclass(frozen=True)
class Ranking:
    cuts: domain.Cuts | None
    scored_at: datetime | None
    users: int = 0


async def current_ranking(conn: Any) -> Ranking:
    state = await store.scoring_state_of(conn)
    if state is None or state.cuts is None:
        return Ranking(None, None)
    return Ranking(domain.Cuts.from_json(state.cuts), state.scored_at, state.users)


async def _windows_of(
    conn: Any, user_ids: Sequence[str] | Any, config: SegmentationConfig, now: datetime
) -> dict[str, dict[int, domain.WindowCounts]]:
    windows: dict[str, dict[int, domain.WindowCounts]] = {}
    for days in domain.tag_windows(config):
        for user_id, counts in (await store.window_counts(conn, user_ids, days, now)).items():
            windows.setdefault(user_id, {})[days] = counts
    return windows


def _segment_from_row(
    row: Any,
    *,
    engagement: Mapping[Any, tuple[int, int]],
    windows: Mapping[int, domain.WindowCounts],
    ranking: Ranking,
    now: datetime,
    config: SegmentationConfig,
) -> domain.Segment:
    agg = (
        store.aggregates_of(row)
        if row.purchases is not None
        else domain.Aggregates(user_id=row.user_id)
    )
    ranked = None if row.ranked_layer is None else (row.ranked_layer, row.ranked_ltv)
    return domain.segment_of(
        agg,
        birth_year=row.birth_year,
        engagement=engagement,
        windows=windows,
        cuts=ranking.cuts,
        ranked=ranked,
        scored_at=ranking.scored_at,
        now=now,
        config=config,
    )


async def segment(ctx: ServiceContext, user_id: str) -> domain.Segment | None:
    """The user's segment now, or None when nothing is known about them."""
    config = config_of(ctx)
    now = ctx.clock.now()
    async with ctx.db.connect() as conn:
        row = (await conn.execute(store.segment_query(user_id))).one_or_none()
        if row is None:
            return None
        ranking = await current_ranking(conn)
        engagement = (await store.engagement_of(conn, [user_id])).get(user_id, {})
        windows = (await _windows_of(conn, [user_id], config, now)).get(user_id, {})
    return _segment_from_row(
        row, engagement=engagement, windows=windows, ranking=ranking, now=now, config=config
    )


def snapshot_of(seg: domain.Segment) -> SegmentSnapshot:
    """An audience event's snapshot by the model path (`AudienceEncoder` is the fast one)."""
    return SegmentSnapshot(
        rfm_tier=seg.rfm_tier,
        ltv=seg.ltv,
        ltv_tier=seg.ltv_tier,
        age_band=seg.age_band,
        value_layer=seg.value_layer,
        silent=seg.silent,
        tags=seg.tags,
        channel_order=seg.channel_order,
        abuse_review=seg.abuse_review,
        r=seg.scores.r if seg.scores else None,
        f=seg.scores.f if seg.scores else None,
        m=seg.scores.m if seg.scores else None,
    )


async def on_promotion_ended(ctx: ServiceContext, event: Event[Any]) -> None:
    """Emit one audience event per participant, streamed in chunks, in bounded memory."""
    ended: PromotionEnded = event.data
    await start_audience(ctx, ended)
    await emit_audience(ctx, ended)


async def start_audience(ctx: ServiceContext, ended: PromotionEnded) -> None:
    async with ctx.db.begin() as conn:
        await conn.execute(
            insert_ignore(store.audiences),
            {
                "promotion_id": ended.promotion_id,
                "policy": ended.policy,
                "ended_at": ended.ended_at,
                "cursor": None,
                "completed_at": None,
            },
        )


async def emit_audience_chunk(ctx: ServiceContext, ended: PromotionEnded) -> bool:
    """One chunk of the audience and its cursor; False once the audience is complete."""
    return await emit_audience(ctx, ended, max_chunks=1)


@dataclass(frozen=True)
class _Chunk:
    messages: list[OutMessage]
    last: str


async def emit_audience(
    ctx: ServiceContext, ended: PromotionEnded, *, max_chunks: int | None = None
) -> bool:
    """Publish the audience from its cursor on; True when it stopped after `max_chunks`.

    One query streams the participants with their profile, aggregates, ranking and the
    window counts the tag rules read, in user id order (a server-side cursor on
    PostgreSQL), `audience_chunk` rows at a time (encoded by position, not by name).
    Each chunk is published straight to the bus and, once the broker acknowledged all of
    it, the cursor moves past it (its own short transaction): a crash re-emits at most the
    chunk in flight (at least once, like the outbox; consumers are idempotent), never skips.
    The next chunk is read and encoded while the current one is being acknowledged.
    """
    config = config_of(ctx)
    audiences = store.audiences
    promotion_id = ended.promotion_id
    async with ctx.db.connect() as conn:
        state = (
            await conn.execute(select(audiences).where(audiences.c.promotion_id == promotion_id))
        ).one()
        ranking = await current_ranking(conn)
    if state.completed_at is not None:
        return False
    now = ctx.clock.now()
    encoder = encoding.AudienceEncoder(
        config=config,
        cuts=ranking.cuts,
        source=ctx.outbox.source,
        promotion_id=promotion_id,
        ended_at=ended.ended_at,
        policy=ended.policy,
        now=now,
    )
    topic = ctx.topic(AudienceMemberResolved.topic)
    size = config.audience_chunk
    query = store.audience_query(
        promotion_id,
        state.cursor,
        postgres=ctx.db.is_postgres,
        windows=encoder.windows,
        now=now,
    ).execution_options(yield_per=size)

    async def next_chunk(partitions: Any) -> _Chunk | None:
        rows = await anext(partitions, None)
        if not rows:
            return None
        first, last = rows[0][0], rows[-1][0]
        async with ctx.db.connect() as conn:
            engagement = await store.engagement_of(
                conn, store.participants_between(promotion_id, first, last)
            )
        encode_row = encoder.encode_row
        engaged = engagement.get
        # Rows unpacked by position (the query's column order): the user id is the first.
        messages = [OutMessage(topic, row[0], encode_row(row, engaged(row[0]))) for row in rows]
        return _Chunk(messages, last)

    emitted = 0
    async with ctx.db.connect() as reader:
        result = await reader.stream(query)
        partitions = result.partitions(size)
        pending: asyncio.Future[_Chunk | None] = asyncio.ensure_future(next_chunk(partitions))
        try:
            while True:
                chunk = await pending
                if chunk is None:
                    break
                emitted += 1
                more = max_chunks is None or emitted < max_chunks
                if more:
                    pending = asyncio.ensure_future(next_chunk(partitions))
                await ctx.bus.publish(chunk.messages)
                async with ctx.db.begin() as conn:
                    await conn.execute(
                        update(audiences)
                        .where(audiences.c.promotion_id == promotion_id)
                        .values(cursor=chunk.last)
                    )
                if not more:
                    return True
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending
    async with ctx.db.begin() as conn:
        await conn.execute(
            update(audiences)
            .where(audiences.c.promotion_id == promotion_id)
            .values(completed_at=now)
        )
    log.info("audience emitted", extra={"promotion_id": promotion_id})
    return False


# -- ranking ---------------------------------------------------------------------------------


async def rescore(ctx: ServiceContext, *, wait: bool = True) -> Ranking | None:
    """Rank every user from the kept aggregates.

    Replicas rank one at a time: with `wait` this waits for a ranking in progress elsewhere
    (then ranks again, on what is there now); without it (the periodic pass) it returns
    None at once when another one is ranking.
    """
    config = config_of(ctx)
    now = ctx.clock.now()
    started = time.perf_counter()
    layers = config.value_layers
    async with ctx.db.begin() as conn:
        if ctx.db.is_postgres:
            key = literal(RANKING_LOCK, BigInteger)
            if wait:
                await conn.execute(select(func.pg_advisory_xact_lock(key)))
            elif not await conn.scalar(select(func.pg_try_advisory_xact_lock(key))):
                return None
        state = await store.scoring_state_of(conn)
        start = domain.ltv_window_start(now, config.ltv.window_months)
        moved = state is not None and state.ltv_window_start is not None
        if moved and store.as_date(state.ltv_window_start) != start:
            await store.recompute_ltv(conn, start)
        cuts = await store.rank_everyone(
            conn, ctx.db.is_postgres, (layers.base, layers.core, layers.head)
        )
        ranked = int(await conn.scalar(select(func.count()).select_from(store.user_scores)) or 0)
        seconds = time.perf_counter() - started
        await store.save_state(
            conn, scored_at=now, users_ranked=ranked, cuts=cuts, start=start, seconds=seconds
        )
    log.info("users ranked", extra={"users": ranked, "seconds": round(seconds, 3)})
    return Ranking(cuts, now, ranked)


async def rescoring_loop(ctx: ServiceContext) -> None:
    """Rank everyone every `rescore_interval_s` of the service clock (at start if never)."""
    interval = timedelta(seconds=config_of(ctx).rescore_interval_s)
    while True:
        try:
            async with ctx.db.connect() as conn:
                state = await store.scoring_state_of(conn)
            last = None if state is None else state.scored_at
            due = ctx.clock.now() if last is None else last + interval
            if ctx.clock.now() >= due:
                await rescore(ctx, wait=False)
                due = ctx.clock.now() + interval
        except Exception:
            log.warning("ranking failed; trying again later", exc_info=True)
            due = ctx.clock.now() + timedelta(seconds=30)
        await ctx.clock.sleep_until(due, max_wait_s=min(interval.total_seconds(), 60.0))


# -- counts ------------------------------------------------------------------------------------


async def segment_counts(ctx: ServiceContext) -> dict[str, Any]:
    """Users per RFM tier, LTV tier, value layer and age band, as of the last ranking."""
    config = config_of(ctx)
    now = ctx.clock.now()
    async with ctx.db.connect() as conn:
        ranking = await current_ranking(conn)
        rows = await store.tier_counts(conn, config)
        years = await store.birth_year_counts(conn)
        silent = await store.silent_count(conn, now - timedelta(days=config.silence_days))
        abuse = await store.abuse_count(conn)
    rfm = dict.fromkeys(config.tier_names(), 0)
    ltv = dict.fromkeys(("high_potential", "potential_churn", "silent"), 0)
    layer = dict.fromkeys(("base", "core", "head"), 0)
    for row in rows:
        tier = domain.rfm_tier(domain.Scores(row.r, row.f, row.m, row.value_layer), config)
        rfm[tier] = rfm.get(tier, 0) + row.users
        ltv[row.ltv_tier] = ltv.get(row.ltv_tier, 0) + row.users
        layer[row.value_layer] = layer.get(row.value_layer, 0) + row.users
    bands = dict.fromkeys([*(b.name for b in config.age_bands), domain.UNKNOWN_AGE], 0)
    for row in years:
        name, _ = domain.age_band(row.birth_year, now, config)
        bands[name] += row.users
    return {
        "scored_at": ranking.scored_at,
        "users": ranking.users,
        "rfm": rfm,
        "ltv_tier": ltv,
        "value_layer": layer,
        "age_band": bands,
        "silent": silent,
        "abuse_review": abuse,
    }


async def rebuild(ctx: ServiceContext) -> int:
    """Recount every user's aggregates from the raw activities; returns how many users.

    On PostgreSQL the monthly buckets and the per-user counts are rebuilt concurrently, in
    two transactions (each pass is atomic; running the rebuild again repairs a failed one).
    """
    config = config_of(ctx)
    now = ctx.clock.now()
    if not ctx.db.is_postgres:
        async with ctx.db.begin() as conn:
            start = await store.window_start(conn, now, config)
            return await store.rebuild_from_activities(conn, start, now)
    async with ctx.db.connect() as conn:
        start = await store.window_start(conn, now, config)

    async def months() -> None:
        async with ctx.db.begin() as conn:
            await store.rebuild_months(conn)

    async def users() -> int:
        async with ctx.db.begin() as conn:
            return await store.rebuild_aggregates(conn, start, now)

    async with asyncio.TaskGroup() as passes:
        passes.create_task(months())
        rebuilt = passes.create_task(users())
    return rebuilt.result()
