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


class EventIds:
    """Unique CloudEvent ids, UUID-shaped: a random prefix (74 bits) and a counter.

    Cheaper than a uuid4 per event, which costs more than encoding the event.
    """

    def __init__(self) -> None:
        self._prefix = ""
        self._count = _MAX_COUNT

    def next(self) -> str:
        prefix, count = self.reserve(1)
        return f"{prefix}{count:012x}"

    def reserve(self, n: int) -> tuple[str, int]:
        """`n` ids at once: the prefix and the first counter; the ids are the prefix followed
        by each of the `n` counters from there, as 12 hex digits (`next` writes them so)."""
        if self._count + n > _MAX_COUNT:
            self._prefix = str(uuid.uuid4())[:24]
            self._count = 0
        first = self._count + 1
        self._count += n
        return self._prefix, first


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

    Each activity's `data` is encoded once: the row is that object with the lane appended,
    the CloudEvent is the batch's constant envelope around it (the same bytes orjson writes
    for the whole event, at half the cost of a dict and a dump per event).
    """
    dumps = orjson.dumps
    if announce is None:
        rows: list[dict[str, Any]] = [_activity_fields(item) for item in items]
        return ActivityBatch(dumps(rows, option=orjson.OPT_NAIVE_UTC).decode())
    prefix, count = announce.ids.reserve(len(items))
    # The envelope in `shared.events.encode`'s key order, split where the id, the subject
    # and `data` go; the ids are the prefix and a counter (`EventIds`).
    head = b'{"specversion":%b,"id":"%b' % (dumps(SPEC_VERSION), prefix.encode())
    middle = b'","source":%b,"type":%b,"time":%b,"subject":' % (
        dumps(announce.source),
        dumps(ACTIVITY_TYPE),
        dumps(announce.time.isoformat()),
    )
    tail = b',"datacontenttype":"application/json","data":'
    lane = announce.lane
    rows_json: list[bytes] = []
    payloads: list[bytes] = []
    for item in items:
        user_id = item["user_id"]
        data = dumps(_activity_fields(item), option=orjson.OPT_NAIVE_UTC)
        rows_json.append(b'%b,"lane":%d}' % (data[:-1], lane(user_id)))
        payloads.append(b"%b%012x%b%b%b%b}" % (head, count, middle, dumps(user_id), tail, data))
        count += 1
    return ActivityBatch((b"[%b]" % b",".join(rows_json)).decode(), payloads)


def own_activity(source: str) -> Callable[[bytes], bool]:
    """Whether an encoded CloudEvent is an `activity.recorded` of `source`, from its first
    bytes, without decoding it.

    True only for the layout `shared.events.encode` and `activity_batch` write: the
    specversion, an id of 36 characters, then this source and this type. In JSON a string
    holds no bare quote or backslash, so with neither in the id's 36 bytes the id ends there
    and the next key is the event's own "source" (not one inside the id or `data`). Any
    other layout answers False: the event is then decoded and its source read as usual.
    """
    dumps = orjson.dumps
    start = b'{"specversion":%b,"id":"' % dumps(SPEC_VERSION)
    end = len(start) + _ID_LENGTH
    mark = b'","source":%b,"type":%b,' % (dumps(source), dumps(ACTIVITY_TYPE))

    def own(value: bytes) -> bool:
        return (
            value.startswith(mark, end)
            and value.startswith(start)
            and value.find(b'"', len(start), end) < 0
            and value.find(b"\\", len(start), end) < 0
        )

    return own


_ID_LENGTH = 36  # a UUID's text: `EventIds` and `shared.events.encode` (uuid4)


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


# The kept figures a tag rule without a window may read, in `_kept` order.
_KEPT_METRICS = ("r", "f", "m", "purchases", "spend", "ltv")


class AudienceEncoder:
    """Encodes `audience.member_resolved` events of one promotion as of `now`.

    `encode_row` takes a row of `store.audience_query` with `windows` as its window
    columns.
    """

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
        # The (days, metric) window counts the tag rules read: the query's window columns.
        self.windows: list[tuple[int, str]] = list(
            dict.fromkeys(
                (rule.within_days, rule.metric)
                for rule in config.tags
                if rule.within_days is not None
            )
        )
        # Each rule as (name, reads a window column, index in the columns or in `_kept`
        # or None for a figure no rule without a window has, op, value).
        self._tags: list[tuple[str, bool, int | None, Callable[[Any, Any], bool], float]] = [
            (
                rule.name,
                rule.within_days is not None,
                self.windows.index((rule.within_days, rule.metric))
                if rule.within_days is not None
                else _KEPT_METRICS.index(rule.metric)
                if rule.metric in _KEPT_METRICS
                else None,
                domain.TAG_OPS[rule.op],
                rule.value,
            )
            for rule in config.tags
        ]
        self._kept_tags = any(rule.within_days is None for rule in config.tags)
        if cuts is not None:
            self._recency = _Thresholds(cuts.recency)
            self._frequency = _Thresholds(cuts.frequency)
            self._monetary = _Thresholds(cuts.monetary)
        # The envelope around `data`, which only the id and the subject vary in.
        self._envelope: dict[str, Any] = {
            "specversion": SPEC_VERSION,
            "id": "",
            "source": source,
            "type": self.type,
            "time": self.time,
            "subject": "",
            "datacontenttype": "application/json",
            "data": None,
        }

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

    # -- the event -----------------------------------------------------------------------

    def encode_row(
        self, row: Sequence[Any], engagement: Mapping[Any, tuple[int, int]] | None
    ) -> bytes:
        """The structured-mode CloudEvent of one participant (as `shared.events.encode`),
        from a row of `store.audience_query` in its column order (`segment_of`'s rules)."""
        (
            user_id,
            timezone,
            locale,
            addresses_raw,
            consent_raw,
            birth_year,
            purchases,
            monetary,
            ltv,
            last_purchase,
            last_interaction,
            abuse,
            ranked_layer,
            ranked_ltv,
            *window,
        ) = row
        if consent_raw:
            consent = {k: bool(v) for k, v in _json(consent_raw).items()}
            addresses = (
                {k: v for k, v in _json(addresses_raw).items() if consent.get(k)}
                if addresses_raw
                else {}
            )
        else:
            consent, addresses = {}, {}
        if purchases is None:
            purchases, monetary, ltv = 0, 0.0, 0.0
            last_purchase, last_interaction, abuse = None, None, False
        else:
            abuse = bool(abuse)
        cuts = self.cuts
        r = f = m = None
        layer = tier = None
        if cuts is not None:
            r = self._recency.quintile(last_purchase)
            f = self._frequency.quintile(purchases)
            m = self._monetary.quintile(monetary)
            key = (r, f, m)
            tier = self._tiers.get(key) or self._rfm_tier(r, f, m)
            layer = ranked_layer if ranked_layer is not None and ranked_ltv == ltv else None
            if layer is None:
                layer = cuts.layer(ltv)
        band_default = self._bands.get(birth_year) or self._band(birth_year)
        band = band_default[0]
        tags: list[str] = []
        if self._tags:
            kept = (r, f, m, purchases, monetary, ltv) if self._kept_tags else ()
            for name, windowed, index, op, value in self._tags:
                if index is None:
                    continue
                measured = window[index] if windowed else kept[index]
                if measured is not None and op(measured, value):
                    tags.append(name)
        event = self._envelope.copy()
        event["id"] = self._ids.next()
        event["subject"] = user_id
        event["data"] = {
            "user_id": user_id,
            "promotion_id": self.promotion_id,
            "ended_at": self.ended_at,
            "policy": self.policy,
            "timezone": timezone or "UTC",
            "consent": consent,
            "addresses": addresses,
            "segment": {
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
                "channel_order": (
                    self._order(band, band_default[1], engagement)
                    if engagement
                    else band_default[1]
                ),
                "abuse_review": abuse,
                "r": r,
                "f": f,
                "m": m,
            },
            "locale": locale,
        }
        return orjson.dumps(event)


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
