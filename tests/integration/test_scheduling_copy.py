"""On PostgreSQL planning writes its rows as binary COPY data it encodes itself: the rows
that land are exactly those of the generic bulk insert."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import text

from services.scheduling import planning, store
from services.scheduling.policy import default_policy
from services.scheduling.state import OUTBOX_COLUMNS, FastEncoder, bulk_insert
from shared.db import Database
from shared.events import AudienceMemberResolved, SegmentSnapshot
from shared.migrations import upgrade_async
from shared.outbox import unpack

NOW = datetime(2026, 3, 6, 12, 0, 0, 123456, tzinfo=UTC)


def members() -> list[AudienceMemberResolved]:
    tiers = [None, "silent", "high_potential", "potential_churn"]
    zones = ["UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", ""]
    return [
        AudienceMemberResolved(
            user_id=f'u-{i}"é' if i % 13 == 0 else f"u-{i}",
            promotion_id=f"p-{i % 3}",
            ended_at=datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=i * 7919, microseconds=i),
            timezone=zones[i % len(zones)],
            segment=SegmentSnapshot(
                ltv_tier=tiers[i % len(tiers)],
                silent=i % 3 == 0,
                abuse_review=i % 4 == 0,
                value_layer="core" if i % 2 else None,
                channel_order=["sms", "push"] if i % 2 else [],
            ),
        )
        for i in range(600)
    ]


async def test_binary_copy_writes_the_rows_of_the_generic_insert(fresh_postgres_url: str) -> None:
    await upgrade_async(fresh_postgres_url, "scheduling")
    db = Database(fresh_postgres_url, "scheduling")
    await db.start()
    ctx: Any = SimpleNamespace(
        topic=lambda name: f"t.{name}", outbox=SimpleNamespace(source="afterglow/x", lanes=8)
    )
    policy = default_policy()
    written = []
    try:
        for binary in (True, False):
            async with db.begin() as conn:
                await conn.execute(text("TRUNCATE scheduling.touches, scheduling.outbox"))
                rows: list[tuple[Any, ...]] = []
                encoder = FastEncoder(ctx, NOW)
                copy = planning._CopyBuffers(NOW, encoder) if binary else None
                for member in members():
                    planning._plan_one(member, policy, NOW, rows, encoder, copy)
                if copy is not None:
                    await copy.write(conn)
                else:
                    await bulk_insert(conn, store.touches, planning.TOUCH_COLUMNS, rows)
                    await bulk_insert(conn, store.outbox, OUTBOX_COLUMNS, encoder.rows)
            async with db.connect() as conn:
                touches = (
                    await conn.execute(text("SELECT * FROM scheduling.touches ORDER BY touch_id"))
                ).all()
                rows = (
                    await conn.execute(
                        text(
                            "SELECT lane, topic, key, payload, headers, created_at, pack, messages"
                            " FROM scheduling.outbox ORDER BY id"
                        )
                    )
                ).all()
            written.append((touches, messages_by_key(rows)))
    finally:
        await db.stop()
    (copied, copied_events), (inserted, inserted_events) = written
    assert len(copied) > 1000 and len(copied_events) > len(copied)
    assert copied == inserted
    # The same messages in the same order for each key (COPY packs them, a row per lane).
    assert copied_events == inserted_events


def messages_by_key(rows: Any) -> list[tuple[Any, ...]]:
    """Every message of the outbox rows (in id order, packs unpacked), then sorted by key:
    a key's messages stay in the order they would be published."""
    out: list[tuple[Any, ...]] = []
    for lane, topic, key, payload, headers, created_at, packed, count in rows:
        if packed is None:
            assert count == 1
            out.append((lane, topic, key, bytes(payload), headers, created_at))
            continue
        unpacked = unpack(bytes(packed))
        assert count == len(unpacked) and (key, payload) == (None, None)
        out += ((lane, topic, k, v, headers, created_at) for k, v in unpacked)
    return sorted(out, key=lambda m: m[2])
