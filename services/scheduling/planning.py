"""Planning from audience events: one durable timer row per touch, written in bulk (COPY on
PostgreSQL) together with the touch.planned events, one transaction per batch of events."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduling import domain, store
from services.scheduling.policy import Policy
from services.scheduling.state import (
    DEFAULT_POLICY,
    OUTBOX_COLUMNS,
    FastEncoder,
    UnknownPolicy,
    among,
    bulk_insert,
    current_policy,
    policy_at,
    wake_dispatcher,
)
from shared.db import insert_ignore
from shared.events import AudienceMemberResolved, Event, TouchPlanned, TouchSuppressed
from shared.outbox import pack_length
from shared.service import ServiceContext

_KEY_CHUNK = 5000
# PostgreSQL: one cached statement per batch instead of a multi-row VALUES compiled each time.
_CLAIM_PG = text(
    "INSERT INTO scheduling.plan_members (promotion_id, user_id) "
    "SELECT * FROM unnest(CAST(:p AS text[]), CAST(:u AS text[])) "
    "ON CONFLICT DO NOTHING RETURNING promotion_id, user_id"
)
# Only the users known before can be erased: those it inserts are not looked up again. Before,
# each id's index entry led to its new row, which the statement's snapshot does not see; a
# batch of 500 new users took 6.8 ms, now 4.9-5.9 ms (pg_stat_statements, benchmark at 300,000).
_SEED_PG = text(
    "WITH seeded AS ("
    " INSERT INTO scheduling.users (user_id, timezone, consent, fatigue, unanswered,"
    " first_seen_at, updated_at)"
    " SELECT u, tz, CAST(c AS json), 'normal', 0, :now, :now"
    " FROM unnest(CAST(:u AS text[]), CAST(:tz AS text[]), CAST(:consent AS text[])) AS s(u, tz, c)"
    " ON CONFLICT DO NOTHING RETURNING user_id)"
    " SELECT user_id FROM scheduling.users WHERE user_id = ANY(ARRAY("
    " SELECT unnest(CAST(:u AS text[])) EXCEPT SELECT user_id FROM seeded))"
    " AND erased_at IS NOT NULL"
)


# -- planning ---------------------------------------------------------------------

TOUCH_COLUMNS = (
    "touch_id",
    "promotion_id",
    "user_id",
    "wave",
    "channel",
    "variant",
    "due_at",
    "status",
    "reason",
    "updated_at",
    "planned_due_at",
    "deadline",
    "rank",
    "parallel",
    "coupon",
    "essential",
    "channel_order",
    "segment",
)


PLANNED_TYPE = TouchPlanned.event_type()
SUPPRESSED_TYPE = TouchSuppressed.event_type()

# -- COPY in PostgreSQL's binary format ---------------------------------------------
# asyncpg's copy_records_to_table encodes every value on its own (a timestamptz costs about
# 0.6 us, a touch row 2.8 us, an outbox row 1.3 us). Planning's rows repeat most of their
# values (the participant's, the wave's, the batch's time), so they are written here as bytes
# with those parts encoded once: per field, int32 length (-1: NULL) and the value in network
# order; per row, int16 field count.

# The order of the fields in the binary rows (a participant's columns first).
COPY_TOUCH_COLUMNS = (
    "promotion_id",
    "user_id",
    "channel",
    "updated_at",
    "channel_order",
    "segment",
    "wave",
    "rank",
    "coupon",
    "essential",
    "touch_id",
    "due_at",
    "planned_due_at",
    "deadline",
    "variant",
    "status",
    "reason",
    "parallel",
)
# One packed row (`shared.outbox.pack`) per lane and batch: planning's events are most of
# what the service publishes.
COPY_OUTBOX_COLUMNS = ("lane", "topic", "key", "payload", "pack", "messages", "created_at")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
_COPY_TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_pack_len = struct.Struct(">i").pack
_pack_ts = struct.Struct(">iq").pack
_pack_int2 = struct.Struct(">ih").pack
_pack_int4 = struct.Struct(">ii").pack
_pack_count = struct.Struct(">h").pack
_TRUE, _FALSE = _pack_len(1) + b"\x01", _pack_len(1) + b"\x00"


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    raw = value.encode()
    return _pack_len(len(raw)) + raw


def _timestamptz(value: datetime) -> bytes:
    """Microseconds since 2000-01-01 UTC, as PostgreSQL stores a timestamptz."""
    return _pack_ts(8, (value - _PG_EPOCH) // _MICROSECOND)


_JSON_CACHE_MAX = 100_000
_json_texts: dict[str | None, bytes] = {}


def _cached_json(cache: dict[Any, bytes], value: Any) -> bytes:
    """orjson's encoding of `value`, kept in `cache` (cleared when it grows past its bound)."""
    found = cache.get(value)
    if found is None:
        if len(cache) >= _JSON_CACHE_MAX:
            cache.clear()
        # A copy: orjson's bytes keep a buffer of some kilobytes however short the text.
        found = cache[value] = memoryview(orjson.dumps(value)).tobytes()
    return found


def _time_parts(value: datetime) -> tuple[bytes, bytes]:
    """A due time's or deadline's timestamptz (binary COPY) and JSON (orjson's isoformat())."""
    # A copy: orjson's bytes keep a buffer of some kilobytes however short the text.
    return _timestamptz(value), memoryview(orjson.dumps(value)).tobytes()


def _json_text(value: str | None) -> bytes:
    """orjson's encoding of a wave, variant, reason, segment or promotion id (few values)."""
    return _cached_json(_json_texts, value)


# The constant parts of planning's events (see _plan_one).
_ID_HEAD = b'{"specversion":"1.0","id":"'
_DATA_USER = b',"datacontenttype":"application/json","data":{"user_id":'
_TOUCH_ID = b',"touch_id":"'
_PROMOTION_ID = b'","promotion_id":'
_DUE_AT, _DEADLINE, _REASON, _SEGMENT = (
    b',"due_at":',
    b',"deadline":',
    b',"reason":',
    b',"segment":',
)
_heads: dict[tuple[str, str], tuple[bytes, bytes, bytes]] = {}
_wave_fields: dict[tuple[str, str], bytes] = {}


def _event_heads(source: str, at: str) -> tuple[bytes, bytes, bytes]:
    """The part of a touch.planned and of a touch.suppressed from the id's suffix to
    "subject", and the touch.suppressed's tail: the same for a whole batch."""
    found = _heads.get((source, at))
    if found is None:
        if len(_heads) >= 64:
            _heads.clear()
        middle = b'","source":' + orjson.dumps(source) + b',"type":"%s","time":'
        middle += orjson.dumps(at) + b',"subject":'
        found = _heads[(source, at)] = (
            b".planned" + middle.replace(b"%s", PLANNED_TYPE.encode(), 1),
            b".suppressed" + middle.replace(b"%s", SUPPRESSED_TYPE.encode(), 1),
            b',"at":' + orjson.dumps(at) + b"}}",
        )
    return found


def _wave_json(wave: str, variant: str) -> bytes:
    """The "wave", "channel" and "variant" members of a touch event, cached."""
    if len(_wave_fields) >= _JSON_CACHE_MAX:
        _wave_fields.clear()
    found = _wave_fields[(wave, variant)] = b"".join(
        (b',"wave":', _json_text(wave), b',"channel":null,"variant":', _json_text(variant))
    )
    return found


# What the rows and events of a wave slot (`domain.wave_slots`) share, encoded once: the
# wave's name, its COPY fields from wave to essential, the COPY due_at, planned_due_at and
# deadline, the events' "due_at" and "deadline" members, and its parallel figure. Kept per
# tuple of slots (by id, the tuple held so that its id is not reused), since a promotion's
# participants share a few of them.
_SlotParts = tuple[domain.WaveSlot, str, bytes, bytes, bytes, int]
_SLOT_PARTS_MAX = domain.SLOTS_CACHED
_slot_parts: dict[int, tuple[tuple[domain.WaveSlot, ...], tuple[_SlotParts, ...]]] = {}


def _encode_slots(slots: tuple[domain.WaveSlot, ...]) -> tuple[_SlotParts, ...]:
    parts = []
    for slot in slots:
        wave = slot.wave
        due_b, due_j = _time_parts(slot.due)
        deadline_b, deadline_j = _time_parts(slot.deadline)
        parts.append(
            (
                slot,
                wave.name,
                b"".join(
                    (
                        _text(wave.name),
                        _pack_int2(2, wave.rank),
                        _TRUE if wave.coupon else _FALSE,
                        _TRUE if wave.essential else _FALSE,
                    )
                ),
                due_b + due_b + deadline_b,
                b"".join((_DUE_AT, due_j, _DEADLINE, deadline_j)),
                slot.parallel,
            )
        )
    if len(_slot_parts) >= _SLOT_PARTS_MAX:
        _slot_parts.clear()
    found = tuple(parts)
    _slot_parts[id(slots)] = (slots, found)
    return found


class _CopyBuffers:
    """One batch's touches as binary COPY data, and its events packed by lane (PostgreSQL)."""

    def __init__(self, now: datetime, encoder: FastEncoder) -> None:
        self.touches = bytearray(_COPY_HEADER)
        # Per lane: the pack's bytes (a message is the key's then the value's length and
        # bytes, `shared.outbox.pack`) and how many messages it holds.
        self.packs: dict[int, bytearray] = {}
        self.counts: dict[int, int] = {}
        self.now = _timestamptz(now)
        self.created = _timestamptz(encoder.now)
        self.topic = _text(encoder.topic)
        self.cols: dict[tuple[str, str, str | None, int], bytes] = {}

    def touch_head(self, promotion_id: str, user_id: str, order: str, label: str | None) -> bytes:
        """Field count, then promotion_id .. segment of COPY_TOUCH_COLUMNS."""
        return b"".join(
            (
                _pack_count(len(COPY_TOUCH_COLUMNS)),
                _text(promotion_id),
                _text(user_id),
                _NULL,
                self.now,
                _text(order),
                _text(label),
            )
        )

    def touch_cols(self, variant: str, status: str, reason: str | None, parallel: int) -> bytes:
        key = (variant, status, reason, parallel)
        found = self.cols.get(key)
        if found is None:
            found = self.cols[key] = b"".join(
                (_text(variant), _text(status), _text(reason), _pack_int2(2, parallel))
            )
        return found

    def pack_for(self, lane: int) -> bytearray:
        found = self.packs.get(lane)
        if found is None:
            found = self.packs[lane] = bytearray()
            self.counts[lane] = 0
        return found

    def _events(self) -> bytearray:
        """The outbox rows: one per lane, its pack and message count."""
        rows = bytearray(_COPY_HEADER)
        for lane, packed in self.packs.items():
            rows += b"".join(
                (
                    _pack_count(len(COPY_OUTBOX_COLUMNS)),
                    _pack_int2(2, lane),
                    self.topic,
                    _NULL,  # key and payload: NULL in a packed row (shared.outbox)
                    _NULL,
                    _pack_len(len(packed)),
                    packed,
                    _pack_int4(4, self.counts[lane]),
                    self.created,
                )
            )
        return rows

    async def write(self, conn: AsyncConnection) -> None:
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        for table, columns, data in (
            (store.touches, COPY_TOUCH_COLUMNS, self.touches),
            (store.outbox, COPY_OUTBOX_COLUMNS, self._events()),
        ):
            if len(data) == len(_COPY_HEADER):
                continue
            data += _COPY_TRAILER
            await driver.copy_to_table(
                table.name,
                schema_name=table.schema,
                columns=list(columns),
                source=data,
                format="binary",
            )


async def on_audience_members(ctx: ServiceContext, events: list[Event[Any]]) -> None:
    """Plan every participant in the batch: one timer row per touch, written with its events
    in one transaction (COPY on PostgreSQL)."""
    members: list[AudienceMemberResolved] = [e.data for e in events]
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        promotions = await _promotions_for(ctx, conn, members)
        if len(promotions) == len({m.promotion_id for m in members}):
            await _plan_batch(ctx, conn, members, promotions, now)
            missing = None
        else:
            missing = [m for m in members if m.promotion_id not in promotions]
    if missing is not None:
        # A promotion that ended elsewhere and is first seen here is recorded in a short
        # transaction of its own, committed at once: the batches of its other partitions,
        # which insert it too, wait for this one and not for a whole batch.
        async with ctx.db.begin() as conn:
            await _record_promotions(conn, missing, now)
        async with ctx.db.begin() as conn:
            promotions = await _promotions_for(ctx, conn, members)
            await _plan_batch(ctx, conn, members, promotions, now)
    ctx.outbox.notify()
    wake_dispatcher(ctx)


async def _plan_batch(
    ctx: ServiceContext,
    conn: AsyncConnection,
    members: Sequence[AudienceMemberResolved],
    promotions: dict[str, tuple[str, Policy]],
    now: datetime,
) -> None:
    """The batch's participants not planned before: their rows and events, in `conn`."""
    touch_rows: list[tuple[Any, ...]] = []
    encoder = FastEncoder(ctx, now)
    copy = _CopyBuffers(now, encoder) if conn.dialect.name == "postgresql" else None
    fresh = await _claim_members(conn, members)
    if not fresh:
        return
    erased = await _seed_users(
        conn, [m for m in members if (m.promotion_id, m.user_id) in fresh], now
    )
    for member in members:
        key = (member.promotion_id, member.user_id)
        if key not in fresh:
            continue
        fresh.discard(key)
        status, policy = promotions[member.promotion_id]
        if status == "cancelled" or member.user_id in erased:
            continue
        _plan_one(member, policy, now, touch_rows, encoder, copy)
    if copy is not None:
        await copy.write(conn)
    else:
        await bulk_insert(conn, store.touches, TOUCH_COLUMNS, touch_rows)
        await bulk_insert(conn, store.outbox, OUTBOX_COLUMNS, encoder.rows)


def _plan_one(
    member: AudienceMemberResolved,
    policy: Policy,
    now: datetime,
    touch_rows: list[tuple[Any, ...]],
    encoder: FastEncoder,
    copy: _CopyBuffers | None = None,
) -> None:
    """One participant's timer rows, and their touch.planned (and touch.suppressed) events as
    `FastEncoder.add` writes them, built here without a call and two dicts per event.

    To `touch_rows` and `encoder.rows`, or with `copy` straight into its COPY buffers."""
    segment = member.segment
    user_id, promotion_id = member.user_id, member.promotion_id
    slots = domain.wave_slots(
        policy,
        member.ended_at,
        member.timezone,
        segment.ltv_tier,
        segment.value_layer,
        segment.silent,
        segment.abuse_review,
    )
    cached = _slot_parts.get(id(slots))
    parts = cached[1] if cached is not None and cached[0] is slots else _encode_slots(slots)
    draws = domain.member_draws(policy, user_id, promotion_id, slots)
    order = ",".join(segment.channel_order)
    label = segment.ltv_tier
    lane = encoder.lane(user_id)
    # {"specversion":"1.0","id":"<touch>.planned","source":..,"type":..,"time":..,
    #  "subject":<user>,"datacontenttype":"application/json","data":{"user_id":<user>,
    #  "touch_id":"<touch>","promotion_id":..,"wave":..,"channel":null,"variant":..,
    #  "due_at":..,"deadline":..,"segment":..}} (touch.suppressed: "reason" and "at" after
    #  "variant"): the key order of FastEncoder.add. Touch ids are hex and dashes.
    planned_head, suppressed_head, suppressed_tail = _event_heads(encoder.source, encoder.time)
    user_b = orjson.dumps(user_id)
    user_mid = b"".join((user_b, _DATA_USER, user_b, _TOUCH_ID))
    planned_mid = planned_head + user_mid
    promotion_b = _PROMOTION_ID + _json_text(promotion_id)
    planned_tail = _SEGMENT + _json_text(label) + b"}}"
    wave_fields_get = _wave_fields.get
    if copy is None:
        append, emit = touch_rows.append, encoder.rows.append
        topic, created = encoder.topic, encoder.now
    else:
        # The columns of one participant's rows, encoded once (see _CopyBuffers).
        touch_head = copy.touch_head(promotion_id, user_id, order, label)
        # Each event goes to the lane's pack behind its key (`shared.outbox.pack`'s layout).
        user_raw = user_id.encode()
        event_head = pack_length(len(user_raw)) + user_raw
        touches_out, events_out = copy.touches, copy.pack_for(lane)
        # The cache's lookup without a call when it hits (most of the time).
        touches_get, touch_cols = copy.cols.get, copy.touch_cols
    events = 0
    for (slot, wave, copy_wave, copy_times, json_times, parallel), (
        tid,
        variant,
        reason,
    ) in zip(parts, draws, strict=True):
        status = "planned" if reason is None else "suppressed"
        tid_b = tid.encode()
        if copy is None:
            w = slot.wave
            append(
                (
                    tid,
                    promotion_id,
                    user_id,
                    wave,
                    None,
                    variant,
                    slot.due,
                    status,
                    reason,
                    now,
                    slot.due,
                    slot.deadline,
                    w.rank,
                    parallel,
                    w.coupon,
                    w.essential,
                    order,
                    label,
                )
            )
        else:
            touches_out += b"".join(
                (
                    touch_head,
                    copy_wave,
                    _pack_len(len(tid_b)),
                    tid_b,
                    copy_times,
                    touches_get((variant, status, reason, parallel))
                    or touch_cols(variant, status, reason, parallel),
                )
            )
        # The event as orjson writes `FastEncoder.add`'s dict, put together from parts
        # encoded once per participant (or per batch, or per slot) and the touch's own values.
        wave_b = wave_fields_get((wave, variant)) or _wave_json(wave, variant)
        payload = b"".join(
            (_ID_HEAD, tid_b, planned_mid, tid_b, promotion_b, wave_b, json_times, planned_tail)
        )
        if copy is None:
            emit((lane, topic, user_id, payload, created))
        else:
            # Appended piece by piece: joining them first copied the payload once more.
            events_out += event_head
            events_out += pack_length(len(payload))
            events_out += payload
            events += 1
        if reason is not None:
            # The touch.suppressed shares the touch's fields up to the variant.
            payload = b"".join(
                (
                    _ID_HEAD,
                    tid_b,
                    suppressed_head,
                    user_mid,
                    tid_b,
                    promotion_b,
                    wave_b,
                    _REASON,
                    _json_text(reason),
                    suppressed_tail,
                )
            )
            # Written as the touch.planned above: one loop over both took 0.2-1.5 us more a
            # participant of 5 touches (three alternated runs; about 21 us in all).
            if copy is None:
                emit((lane, topic, user_id, payload, created))
            else:
                events_out += event_head
                events_out += pack_length(len(payload))
                events_out += payload
                events += 1
    if copy is not None:
        copy.counts[lane] += events


async def _promotions_for(
    ctx: ServiceContext, conn: AsyncConnection, members: Sequence[AudienceMemberResolved]
) -> dict[str, tuple[str, Policy]]:
    """Status and policy of each promotion of the batch that is recorded here."""
    p = store.promotions
    ids = sorted({m.promotion_id for m in members})
    rows = (
        await conn.execute(
            select(p.c.promotion_id, p.c.status, p.c.policy, p.c.policy_version).where(
                among(conn, p.c.promotion_id, ids)
            )
        )
    ).all()
    return {
        r.promotion_id: (r.status, await policy_at(ctx, conn, r.policy, r.policy_version))
        for r in rows
    }


async def _record_promotions(
    conn: AsyncConnection, members: Sequence[AudienceMemberResolved], now: datetime
) -> None:
    """Record the promotions of `members` (ended elsewhere), with their policy's current
    version (the default policy for an unknown one); those recorded already stay as they are."""
    p = store.promotions
    seen: set[str] = set()
    for member in members:
        pid = member.promotion_id
        if pid in seen:
            continue
        seen.add(pid)
        name = member.policy
        try:
            version, _ = await current_policy(conn, name, now)
        except UnknownPolicy:
            name = DEFAULT_POLICY
            version, _ = await current_policy(conn, name, now)
        await conn.execute(
            insert_ignore(p),
            {
                "promotion_id": pid,
                "name": "",
                "policy": name,
                "policy_version": version,
                "ended_at": member.ended_at,
                "status": "ended",
                "created_at": now,
            },
        )


async def _claim_members(
    conn: AsyncConnection, members: Sequence[AudienceMemberResolved]
) -> set[tuple[str, str]]:
    """The (promotion, user) pairs planned for the first time by this batch."""
    keys = list(dict.fromkeys((m.promotion_id, m.user_id) for m in members))
    if conn.dialect.name == "postgresql":
        result = await conn.execute(
            _CLAIM_PG, {"p": [p for p, _ in keys], "u": [u for _, u in keys]}
        )
        return {(p, u) for p, u in result.all()}
    fresh: set[tuple[str, str]] = set()
    pm = store.plan_members
    for start in range(0, len(keys), _KEY_CHUNK):
        chunk = keys[start : start + _KEY_CHUNK]
        result = await conn.execute(
            insert_ignore(pm)
            .values([{"promotion_id": p, "user_id": u} for p, u in chunk])
            .returning(pm.c.promotion_id, pm.c.user_id)
        )
        fresh.update((p, u) for p, u in result.all())
    return fresh


async def _seed_users(
    conn: AsyncConnection, members: Sequence[AudienceMemberResolved], now: datetime
) -> set[str]:
    """Seed timezone and consent from the snapshot (user.updated stays authoritative);
    returns the users already erased."""
    if conn.dialect.name == "postgresql":
        # The last snapshot of a user in the batch wins, as below.
        seeds = {m.user_id: m for m in members}
        result = await conn.execute(
            _SEED_PG,
            {
                "u": list(seeds),
                "tz": [m.timezone for m in seeds.values()],
                "consent": [orjson.dumps(m.consent).decode() for m in seeds.values()],
                "now": now,
            },
        )
        return set(result.scalars())
    u = store.users
    rows = {
        m.user_id: {
            "user_id": m.user_id,
            "timezone": m.timezone,
            "consent": dict(m.consent),
            "fatigue": "normal",
            "unanswered": 0,
            "first_seen_at": now,
            "updated_at": now,
        }
        for m in members
    }
    ids = list(rows)
    erased: set[str] = set()
    for start in range(0, len(ids), _KEY_CHUNK):
        chunk = ids[start : start + _KEY_CHUNK]
        await conn.execute(insert_ignore(u).values([rows[i] for i in chunk]))
        erased.update(
            (
                await conn.execute(
                    select(u.c.user_id).where(u.c.user_id.in_(chunk), u.c.erased_at.is_not(None))
                )
            ).scalars()
        )
    return erased
