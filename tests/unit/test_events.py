"""The event registry: known types decode, anything else is refused with a reason."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from shared.events import (
    ALL_SCHEMAS,
    TOPICS,
    ActivityRecorded,
    EventError,
    PromotionEnded,
    Registry,
    TouchSuppressed,
    default_registry,
    encode,
)

NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)


def envelope(**overrides: object) -> bytes:
    body = orjson.loads(
        encode(PromotionEnded(promotion_id="p-1", ended_at=NOW), source="test", time=NOW)
    )
    body.update(overrides)
    return orjson.dumps(body)


def test_every_schema_is_on_a_known_topic_with_a_versioned_type() -> None:
    for schema in ALL_SCHEMAS:
        assert schema.topic in TOPICS
        assert schema.event_type().startswith("afterglow.")
        assert schema.event_type().endswith(f".v{schema.event_version}")


def test_round_trip_keeps_data_key_and_envelope() -> None:
    registry = default_registry()
    data = TouchSuppressed(
        user_id="u-1", touch_id="t-1", promotion_id="p-1", wave="day3", reason="cap_7d", at=NOW
    )
    raw = encode(data, source="afterglow/scheduling", time=NOW, event_id="e-1")
    event = registry.decode(raw)
    assert event.data == data
    assert event.key == "u-1"
    assert (event.id, event.source, event.type) == (
        "e-1",
        "afterglow/scheduling",
        "afterglow.touch.suppressed.v1",
    )
    body = orjson.loads(raw)
    assert body["specversion"] == "1.0"
    assert body["datacontenttype"] == "application/json"


def test_promotion_events_are_keyed_by_promotion() -> None:
    assert PromotionEnded(promotion_id="p-9", ended_at=NOW).partition_key() == "p-9"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not_json"),
        (b"[1, 2]", "not_cloudevent"),
        (envelope(specversion="0.3"), "invalid_envelope"),
        (envelope(type="com.example.other.v1"), "invalid_envelope"),
        (envelope(type="afterglow.promotion.ended.v7"), "unknown_version"),
        (envelope(type="afterglow.promotion.exploded.v1"), "unknown_type"),
        (envelope(data={"promotion_id": "p-1"}), "invalid_data"),
        (envelope(data={"promotion_id": "p-1", "ended_at": "yesterday"}), "invalid_data"),
    ],
)
def test_refusals_carry_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(EventError) as caught:
        default_registry().decode(raw)
    assert caught.value.reason == reason


def test_invalid_data_names_the_field() -> None:
    with pytest.raises(EventError) as caught:
        default_registry().decode(envelope(data={"promotion_id": "p-1"}))
    assert "ended_at" in caught.value.detail


@pytest.mark.parametrize("amount", [-5.0, "NaN", "Infinity"])
def test_an_activity_from_the_topic_with_an_impossible_amount_is_refused(amount: object) -> None:
    # The REST API refuses these; an activity from the `activities` topic is held to the same
    # rule, so that no producer can put a negative or endless amount into revenue.
    activity = ActivityRecorded(id="a-1", user_id="u-1", kind="purchase", occurred_at=NOW)
    body = orjson.loads(encode(activity, source="test", time=NOW))
    body["data"]["amount"] = amount
    with pytest.raises(EventError) as caught:
        default_registry().decode(orjson.dumps(body))
    assert caught.value.reason == "invalid_data"
    assert "amount" in caught.value.detail


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = envelope(data={"promotion_id": "p-1", "ended_at": NOW.isoformat(), "new_field": 1})
    assert default_registry().decode(raw).data == PromotionEnded(promotion_id="p-1", ended_at=NOW)


def test_a_type_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="twice"):
        Registry(PromotionEnded, PromotionEnded)
