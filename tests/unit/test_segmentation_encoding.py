"""The fast encoders write what the model path writes: same event, same snapshot."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.segmentation import domain, encoding, handlers
from services.segmentation.config import SegmentationConfig, TagRule
from shared.events import (
    ActivityRecorded,
    AudienceMemberResolved,
    EventData,
    default_registry,
    encode,
)

NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)
ENDED = datetime(2026, 3, 8, 11, 30, 15, 250000, tzinfo=UTC)
REGISTRY = default_registry()
SOURCE = "afterglow/segmentation"
CONFIG = SegmentationConfig(
    tags=[
        TagRule(name="social_layer", metric="purchases", op=">", value=5, within_days=30),
        TagRule(name="spender", metric="spend", op=">=", value=100, within_days=7),
        TagRule(name="loyal", metric="f", op=">=", value=4),
        TagRule(name="big", metric="ltv", op=">", value=500),
    ]
)
CUTS = domain.Cuts(
    recency=(None, NOW - timedelta(days=200), NOW - timedelta(days=60), NOW - timedelta(days=9)),
    frequency=(0.0, 1.0, 3.0, 7.0),
    monetary=(0.0, 50.0, 200.0, 900.0),
    base_max=120.0,
    core_max=480.0,
)

moment = st.none() | st.integers(min_value=0, max_value=500).map(lambda d: NOW - timedelta(days=d))
money = st.sampled_from([0.0, 50.0, 120.0, 480.0, 900.0]) | st.floats(0, 5000, allow_nan=False)
channels = st.sampled_from(["sms", "email", "push", "in_app", "social"])


@st.composite
def rows(draw: st.DrawFn) -> tuple[Any, dict[Any, tuple[int, int]], dict[int, Any]]:
    known = draw(st.booleans())
    profile = draw(st.booleans())
    consent = draw(st.dictionaries(channels, st.booleans())) if profile else None
    addresses = (
        draw(st.dictionaries(channels, st.text(min_size=1, max_size=5))) if profile else None
    )
    ltv = draw(money)
    ranked_layer = draw(st.none() | st.sampled_from(["base", "core", "head"]))
    row = SimpleNamespace(
        user_id=draw(st.text(min_size=1, max_size=12)),
        timezone="Asia/Shanghai" if profile else None,
        locale=draw(st.none() | st.just("zh-CN")) if profile else None,
        addresses=None if addresses is None else json.dumps(addresses),
        consent=None if consent is None else json.dumps(consent),
        birth_year=draw(st.none() | st.integers(1940, 2015)) if profile else None,
        purchases=draw(st.integers(0, 12)) if known else None,
        monetary=draw(money) if known else None,
        ltv=ltv if known else None,
        last_purchase_at=draw(moment) if known else None,
        last_interaction_at=draw(moment) if known else None,
        abuse_review=draw(st.booleans()) if known else None,
        ranked_layer=ranked_layer,
        ranked_ltv=(ltv if draw(st.booleans()) else draw(money)) if ranked_layer else None,
    )
    engagement = draw(st.dictionaries(channels, st.tuples(st.integers(0, 3), st.integers(0, 3))))
    windows = {
        days: domain.WindowCounts(draw(st.integers(0, 9)), draw(money), draw(st.integers(0, 9)))
        for days in draw(st.sets(st.sampled_from([7, 30])))
    }
    return row, engagement, windows


def _model_path(row: Any, engagement: Any, windows: Any, cuts: domain.Cuts | None) -> bytes:
    ranking = handlers.Ranking(cuts, NOW if cuts else None)
    seg = handlers._segment_from_row(
        row, engagement=engagement, windows=windows, ranking=ranking, now=NOW, config=CONFIG
    )
    consent = {k: bool(v) for k, v in json.loads(row.consent or "{}").items()}
    addresses = {k: v for k, v in json.loads(row.addresses or "{}").items() if consent.get(k)}
    event = AudienceMemberResolved(
        user_id=row.user_id,
        promotion_id="p-1",
        ended_at=ENDED,
        policy="gentle",
        timezone=row.timezone or "UTC",
        locale=row.locale,
        consent=consent,
        addresses=addresses,
        segment=handlers.snapshot_of(seg),
    )
    return encode(event, source=SOURCE, time=NOW)


def _by_position(encoder: encoding.AudienceEncoder, row: Any, windows: Any) -> tuple[Any, ...]:
    """The row as `store.audience_query` returns it: its labels in order, then the window
    columns the encoder asked for (`store.window_counts`' figures, zero without activities)."""
    none = domain.WindowCounts()
    return (
        row.user_id,
        row.timezone,
        row.locale,
        row.addresses,
        row.consent,
        row.birth_year,
        row.purchases,
        row.monetary,
        row.ltv,
        row.last_purchase_at,
        row.last_interaction_at,
        row.abuse_review,
        row.ranked_layer,
        row.ranked_ltv,
        *(getattr(windows.get(days, none), metric) for days, metric in encoder.windows),
    )


def _decoded(raw: bytes) -> tuple[dict[str, Any], EventData]:
    event = REGISTRY.decode(raw)
    envelope = {k: v for k, v in json.loads(raw).items() if k not in ("id", "data")}
    return envelope, event.data


@settings(max_examples=300, deadline=None)
@given(rows(), st.booleans())
def test_audience_events_match_the_model_path(case: Any, ranked: bool) -> None:
    row, engagement, windows = case
    cuts = CUTS if ranked else None
    encoder = encoding.AudienceEncoder(
        config=CONFIG,
        cuts=cuts,
        source=SOURCE,
        promotion_id="p-1",
        ended_at=ENDED,
        policy="gentle",
        now=NOW,
    )
    fast = encoder.encode_row(_by_position(encoder, row, windows), engagement)
    assert _decoded(fast) == _decoded(_model_path(row, engagement, windows, cuts))
    # Byte for byte the same data, so that consumers cannot tell the paths apart.
    assert (
        json.loads(fast)["data"] == json.loads(_model_path(row, engagement, windows, cuts))["data"]
    )


def test_activity_events_match_the_model_path() -> None:
    shanghai = timezone(timedelta(hours=8))
    items: list[dict[str, Any]] = [
        {
            "id": "a-1",
            "user_id": "u-1",
            "kind": "purchase",
            "occurred_at": datetime(2026, 3, 8, 9, 30, 1, 5, tzinfo=shanghai),
            "amount": 120.5,
            "currency": "CNY",
            "item_id": "sku-1",
            "category": "beauty",
            "promotion_id": "p-1",
        },
        {"id": "a-2", "user_id": "u-2", "kind": "visit", "occurred_at": NOW},
    ]
    announce = encoding.Announce(
        lane=lambda user_id: len(user_id), source=SOURCE, time=NOW, ids=encoding.EventIds()
    )
    batch = encoding.activity_batch(items, announce)
    rows = json.loads(batch.rows)
    payloads = batch.payloads
    assert payloads is not None
    for item, row, raw in zip(items, rows, payloads, strict=True):
        expected = encode(ActivityRecorded(**item), source=SOURCE, time=NOW)
        assert _decoded(raw) == _decoded(expected)
        assert row["lane"] == len(item["user_id"])
        assert datetime.fromisoformat(row["occurred_at"]) == item["occurred_at"]
        assert {k: row[k] for k in item if k != "occurred_at"} == {
            k: v for k, v in item.items() if k != "occurred_at"
        }
    assert len({json.loads(raw)["id"] for raw in payloads}) == 2
    assert encoding.activity_batch(items).payloads is None


def test_event_ids_are_unique_and_uuid_shaped() -> None:
    ids = encoding.EventIds()
    other = encoding.EventIds()
    seen = {ids.next() for _ in range(10_000)} | {other.next() for _ in range(10_000)}
    assert len(seen) == 20_000
    assert all(len(i) == 36 and i.count("-") == 4 for i in seen)
    # A reserved run continues the same sequence, and `next` goes on after it.
    prefix, first = ids.reserve(3)
    reserved = {f"{prefix}{count:012x}" for count in range(first, first + 3)}
    assert not reserved & seen
    after = ids.next()
    assert after not in reserved | seen and after[:24] == prefix


def test_own_activities_are_told_apart_by_their_first_bytes() -> None:
    own = encoding.own_activity(SOURCE)
    activity = ActivityRecorded(id="a-1", user_id="u-1", kind="visit", occurred_at=NOW)
    announce = encoding.Announce(
        lane=lambda user_id: 0, source=SOURCE, time=NOW, ids=encoding.EventIds()
    )
    batch = encoding.activity_batch([activity.model_dump()], announce)
    assert batch.payloads is not None and own(batch.payloads[0])
    # What the model path writes (the outbox's `add`) is recognised too.
    assert own(encode(activity, source=SOURCE, time=NOW))
    # Another source, or another type of this source: not own.
    assert not own(encode(activity, source="afterglow/elsewhere", time=NOW))
    other = AudienceMemberResolved.model_construct(user_id="u-1")
    assert not own(_envelope(SOURCE, "x" * 36, other.event_type()))
    # An id that spells this source inside it is still someone else's event.
    sly = '","source":"' + SOURCE + '","type":"x'
    assert not own(_envelope("afterglow/elsewhere", sly[:36], ActivityRecorded.event_type()))
    # Ids of other lengths are decoded (and skipped by their source there).
    assert not own(_envelope(SOURCE, "short", ActivityRecorded.event_type()))
    assert not own(b"")


def _envelope(source: str, event_id: str, event_type: str) -> bytes:
    return json.dumps(
        {"specversion": "1.0", "id": event_id, "source": source, "type": event_type, "data": {}},
        separators=(",", ":"),
    ).encode()
