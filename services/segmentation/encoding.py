"""Events encoded without models: audience snapshots and REST-ingested activities.

An ended promotion of 1,000,000 participants is 1,000,000 events; building each
through `domain.segment_of`, a pydantic model and `shared.events.encode` costs more
than publishing it. `AudienceEncoder` computes the same snapshot from the same
inputs - memoizing what depends on few values (the RFM tier of a score triple, the
age band of a birth year, the channel order of a band without history) - and
writes the CloudEvent with orjson. `activity_batch` does the same for the
`activity.recorded` events of a REST batch. The tests decode both with the event
registry and compare them with the model path (`shared.events.encode`).
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

from services.segmentation import domain
from services.segmentation.config import ALL_CHANNELS, SegmentationConfig
from shared.events import SPEC_VERSION, ActivityRecorded, AudienceMemberResolved

_NO_WINDOW = domain.WindowCounts()


class EventIds:
    """Unique CloudEvent ids, UUID-shaped: a random prefix (74 bits) and a counter.

    Cheaper than a uuid4 per event, which costs more than encoding the event.
    """

    def __init__(self) -> None:
        self._prefix = ""
        self._count = _MAX_COUNT

    def next(self) -> str:
        if self._count >= _MAX_COUNT:
            self._prefix = str(uuid.uuid4())[:24]
            self._count = 0
        self._count += 1
        return f"{self._prefix}{self._count:012x}"


_MAX_COUNT = (1 << 48) - 1


ACTIVITY_TYPE = ActivityRecorded.event_type()


@dataclass(frozen=True)
class Announce:
    """How a batch's activities are announced: the outbox lane of a user, the event ids."""

    lane: Callable[[str], int]
    source: str
    time: datetime
    ids: EventIds


@dataclass(frozen=True)
class ActivityBatch:
    """A batch for `store.record_batch_postgres`: the rows as one JSON array, in order, and
    for an announced batch each row's `activity.recorded` CloudEvent (the outbox payload)."""

    rows: str
    payloads: list[bytes] | None = None


def activity_batch(
    items: Sequence[Mapping[str, Any]], announce: Announce | None = None
) -> ActivityBatch:
    """Validated activities (dicts of `api.ActivityCreate`) as an `ActivityBatch`.

    With `announce` each row also holds its outbox lane, and each CloudEvent is written as
    `shared.events.encode` writes it. The payloads stay apart from the JSON rows: PostgreSQL
    would parse them as JSON for nothing.
    """
    dumps = orjson.dumps
    if announce is None:
        rows: list[dict[str, Any]] = [_activity_fields(item) for item in items]
        return ActivityBatch(dumps(rows, option=orjson.OPT_NAIVE_UTC).decode())
    stamp = announce.time.isoformat()
    next_id = announce.ids.next
    lane = announce.lane
    source = announce.source
    rows = []
    payloads = []
    for item in items:
        data = _activity_fields(item)
        user_id = data["user_id"]
        rows.append({**data, "lane": lane(user_id)})
        payloads.append(
            dumps(
                {
                    "specversion": SPEC_VERSION,
                    "id": next_id(),
                    "source": source,
                    "type": ACTIVITY_TYPE,
                    "time": stamp,
                    "subject": user_id,
                    "datacontenttype": "application/json",
                    "data": data,
                }
            )
        )
    return ActivityBatch(dumps(rows, option=orjson.OPT_NAIVE_UTC).decode(), payloads)


def _activity_fields(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "user_id": item["user_id"],
        "id": item["id"],
        "kind": item["kind"],
        "occurred_at": item["occurred_at"],
        "amount": item.get("amount"),
        "currency": item.get("currency"),
        "item_id": item.get("item_id"),
        "category": item.get("category"),
        "promotion_id": item.get("promotion_id"),
    }


class AudienceEncoder:
    """Encodes `audience.member_resolved` events of one promotion as of `now`."""

    def __init__(
        self,
        *,
        config: SegmentationConfig,
        cuts: domain.Cuts | None,
        source: str,
        promotion_id: str,
        ended_at: datetime,
        policy: str,
        now: datetime,
    ) -> None:
        self.config = config
        self.cuts = cuts
        self.now = now
        self.silent_before = now - timedelta(days=config.silence_days)
        self.promotion_id = promotion_id
        self.policy = policy
        # As pydantic writes a datetime (UTC as "Z"), so that the bytes match `encode`.
        self.ended_at = _iso(ended_at)
        self.time = now.isoformat()
        self.source = source
        self.type = AudienceMemberResolved.event_type()
        self._ids = EventIds()
        self._tiers: dict[tuple[int, int, int], str] = {}
        self._bands: dict[int | None, tuple[str, list[Any]]] = {}
        self._orders: dict[tuple[Any, ...], list[Any]] = {}
        ltv = config.ltv
        self._high = ltv.high_potential_above
        self._churn = ltv.potential_churn_from
        self._tags = [
            (rule.name, rule.metric, rule.within_days, domain.TAG_OPS[rule.op], rule.value)
            for rule in config.tags
        ]
        # Only the rules without a window read the kept figures.
        self._kept_tags = any(rule.within_days is None for rule in config.tags)
        if cuts is not None:
            self._recency = _Thresholds(cuts.recency)
            self._frequency = _Thresholds(cuts.frequency)
            self._monetary = _Thresholds(cuts.monetary)

    # -- the snapshot ------------------------------------------------------------------

    def _rfm_tier(self, r: int, f: int, m: int) -> str:
        key = (r, f, m)
        tier = self._tiers.get(key)
        if tier is None:
            tier = self._tiers[key] = domain.rfm_tier(domain.Scores(r, f, m, ""), self.config)
        return tier

    def _band(self, birth_year: int | None) -> tuple[str, list[Any]]:
        found = self._bands.get(birth_year)
        if found is None:
            name, default = domain.age_band(birth_year, self.now, self.config)
            found = self._bands[birth_year] = (name, [*default, *_missing(default)])
        return found

    def _order(
        self, band: str, default: list[Any], engagement: Mapping[Any, tuple[int, int]] | None
    ) -> list[Any]:
        if not engagement:
            return default
        weight = self.config.click_weight
        key = (band, *sorted((c, o + weight * k) for c, (o, k) in engagement.items()))
        order = self._orders.get(key)
        if order is None:
            order = self._orders[key] = domain.channel_order(
                default, engagement, click_weight=weight
            )
        return order

    def snapshot(
        self,
        row: Any,
        engagement: Mapping[Any, tuple[int, int]] | None,
        windows: Mapping[int, domain.WindowCounts] | None,
    ) -> dict[str, Any]:
        """`SegmentSnapshot` as JSON of one row of `store.audience_query` (see `segment_of`)."""
        if row.purchases is None:
            purchases, monetary, ltv = 0, 0.0, 0.0
            last_purchase, last_interaction, abuse = None, None, False
        else:
            purchases, monetary, ltv = row.purchases, row.monetary, row.ltv
            last_purchase, last_interaction = row.last_purchase_at, row.last_interaction_at
            abuse = bool(row.abuse_review)
        cuts = self.cuts
        r = f = m = None
        layer = tier = None
        if cuts is not None:
            r = self._recency.quintile(last_purchase)
            f = self._frequency.quintile(purchases)
            m = self._monetary.quintile(monetary)
            if row.ranked_layer is not None and row.ranked_ltv == ltv:
                layer = row.ranked_layer
            else:
                layer = cuts.layer(ltv)
            tier = self._rfm_tier(r, f, m)
        band, default = self._band(row.birth_year)
        tags: list[str] = []
        if self._tags:
            kept: dict[str, Any] = {}
            if self._kept_tags:
                kept = {"r": r, "f": f, "m": m, "purchases": purchases, "spend": monetary}
                kept["ltv"] = ltv
            for name, metric, days, op, value in self._tags:
                measured: float | None
                if days is not None:
                    measured = getattr(
                        windows.get(days, _NO_WINDOW) if windows else _NO_WINDOW, metric
                    )
                else:
                    measured = kept.get(metric)
                if measured is not None and op(measured, value):
                    tags.append(name)
        return {
            "rfm_tier": tier,
            "ltv": round(ltv, 2),
            "ltv_tier": (
                "high_potential"
                if ltv > self._high
                else "potential_churn"
                if ltv >= self._churn
                else "silent"
            ),
            "age_band": band,
            "value_layer": layer,
            "silent": last_interaction is None or last_interaction <= self.silent_before,
            "tags": tags,
            "channel_order": self._order(band, default, engagement),
            "abuse_review": abuse,
            "r": r,
            "f": f,
            "m": m,
        }

    # -- the event -----------------------------------------------------------------------

    def encode(
        self,
        row: Any,
        engagement: Mapping[Any, tuple[int, int]] | None,
        windows: Mapping[int, domain.WindowCounts] | None,
    ) -> bytes:
        """The structured-mode CloudEvent of one participant (as `shared.events.encode`)."""
        consent_raw = row.consent
        if consent_raw:
            consent = {k: bool(v) for k, v in _json(consent_raw).items()}
            addresses_raw = row.addresses
            addresses = (
                {k: v for k, v in _json(addresses_raw).items() if consent.get(k)}
                if addresses_raw
                else {}
            )
        else:
            consent, addresses = {}, {}
        user_id = row.user_id
        return orjson.dumps(
            {
                "specversion": SPEC_VERSION,
                "id": self._ids.next(),
                "source": self.source,
                "type": self.type,
                "time": self.time,
                "subject": user_id,
                "datacontenttype": "application/json",
                "data": {
                    "user_id": user_id,
                    "promotion_id": self.promotion_id,
                    "ended_at": self.ended_at,
                    "policy": self.policy,
                    "timezone": row.timezone or "UTC",
                    "consent": consent,
                    "addresses": addresses,
                    "segment": self.snapshot(row, engagement, windows),
                    "locale": row.locale,
                },
            }
        )


class _Thresholds:
    """`domain.Cuts.quintile` by bisection: 1 + how many cuts are None or below the value."""

    def __init__(self, cuts: Sequence[Any]) -> None:
        self._none = sum(1 for c in cuts if c is None)
        self._below = sorted(c for c in cuts if c is not None)

    def quintile(self, value: Any) -> int:
        if value is None:
            return 1
        return 1 + self._none + bisect.bisect_left(self._below, value)


def _missing(default: Sequence[Any]) -> list[Any]:
    return [c for c in ALL_CHANNELS if c not in default]


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    loaded = orjson.loads(value)
    return loaded if isinstance(loaded, dict) else {}


def _iso(when: datetime) -> str:
    text = domain.aware(when).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text
