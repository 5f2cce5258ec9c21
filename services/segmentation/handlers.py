"""Segmentation's commands and event handlers."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, func, literal, select, update

from services.segmentation import domain, store
from services.segmentation.config import SegmentationConfig, load_config
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
from shared.service import ServiceContext

log = logging.getLogger(__name__)

PARTICIPANT_CHUNK = 5000
ACTIVITY_CHUNK = 1000
CONFIG_KEY = "segmentation_config"
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


async def record_activities(
    ctx: ServiceContext, batch: Sequence[domain.Activity], *, publish: bool = False
) -> int:
    """Store new activities and fold them into the aggregates; returns how many were new.

    `publish`: also announce each new activity as `activity.recorded` (through the outbox,
    same transaction), for activities that did not come from the topic (the REST ingest):
    other services (metrics attribution) see every purchase on the `activities` topic.
    """
    recorded = 0
    for start in range(0, len(batch), ACTIVITY_CHUNK):
        recorded += await _record_chunk(ctx, batch[start : start + ACTIVITY_CHUNK], publish=publish)
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
    they were accepted: they are skipped here, not counted twice.
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


def _snapshot(seg: domain.Segment) -> SegmentSnapshot:
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
    """Emit one audience event per participant, a chunk per transaction, in bounded memory."""
    ended: PromotionEnded = event.data
    await start_audience(ctx, ended)
    while await emit_audience_chunk(ctx, ended):
        pass


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
    """One chunk of the audience with its cursor, in one transaction; False once complete."""
    async with ctx.db.begin() as conn:
        more = await _emit_chunk(ctx, conn, ended, config_of(ctx))
    if more:
        ctx.outbox.notify()
    return more


async def _emit_chunk(
    ctx: ServiceContext, conn: Any, ended: PromotionEnded, config: SegmentationConfig
) -> bool:
    """Emit the next chunk and move the cursor; False when the audience is complete."""
    audiences = store.audiences
    state = (
        await conn.execute(select(audiences).where(audiences.c.promotion_id == ended.promotion_id))
    ).one()
    if state.completed_at is not None:
        return False
    now = ctx.clock.now()
    rows = list(
        await conn.execute(
            store.audience_query(ended.promotion_id, state.cursor, config.audience_chunk)
        )
    )
    if not rows:
        await conn.execute(
            update(audiences)
            .where(audiences.c.promotion_id == ended.promotion_id)
            .values(completed_at=now)
        )
        return False
    user_ids = [row.user_id for row in rows]
    chunk = store.participants_between(ended.promotion_id, user_ids[0], user_ids[-1])
    ranking = await current_ranking(conn)
    engagement = await store.engagement_of(conn, chunk)
    windows = await _windows_of(conn, chunk, config, now)
    events = []
    for row in rows:
        seg = _segment_from_row(
            row,
            engagement=engagement.get(row.user_id, {}),
            windows=windows.get(row.user_id, {}),
            ranking=ranking,
            now=now,
            config=config,
        )
        consent = {k: bool(v) for k, v in (row.consent or {}).items()}
        addresses = {k: v for k, v in (row.addresses or {}).items() if consent.get(k)}
        events.append(
            AudienceMemberResolved(
                user_id=row.user_id,
                promotion_id=ended.promotion_id,
                ended_at=ended.ended_at,
                policy=ended.policy,
                timezone=row.timezone or "UTC",
                locale=row.locale,
                consent=consent,
                addresses=addresses,
                segment=_snapshot(seg),
            )
        )
    await ctx.outbox.add(conn, events, now=now)
    await conn.execute(
        update(audiences)
        .where(audiences.c.promotion_id == ended.promotion_id)
        .values(cursor=user_ids[-1])
    )
    return True


# -- ranking ---------------------------------------------------------------------------------


async def rescore(ctx: ServiceContext) -> Ranking | None:
    """Rank every user from the kept aggregates; None when another replica is ranking."""
    config = config_of(ctx)
    now = ctx.clock.now()
    started = time.perf_counter()
    layers = config.value_layers
    async with ctx.db.begin() as conn:
        if ctx.db.is_postgres:
            key = literal(RANKING_LOCK, BigInteger)
            if not await conn.scalar(select(func.pg_try_advisory_xact_lock(key))):
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
                await rescore(ctx)
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
    """Recount every user's aggregates from the raw activities; returns how many users."""
    config = config_of(ctx)
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        start = await store.window_start(conn, now, config)
        return await store.rebuild_from_activities(conn, start, now)
