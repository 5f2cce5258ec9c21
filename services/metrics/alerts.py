"""Business alerts: deviations from the trailing mean, and a traffic light per promotion.

Definitions (README, "Business alerts"), over whole UTC days of the per-minute aggregates
(a day's value is its cohort's: conversions and revenue count at the minute of the
attributed touch, like the funnel):

- metrics, per promotion, wave and channel: conversion_rate = converted / sent,
  aov = revenue / orders, complaint_rate = complained / sent, unsubscribe_rate =
  unsubscribed / sent; a day has a value when its denominator is at least `min_sample`.
- trailing mean of a day: the mean of the same series' values on the `trailing_days`
  days before it (days without a value left out), defined when at least
  `min_history_days` of them have one.
- deviation: a day whose value is more than `threshold` (15%) away from its trailing
  mean, relative to that mean (|value - mean| / mean > threshold, mean > 0). Severity
  warning when the move is the bad way (conversion or AOV down, complaints or
  unsubscribes up), info otherwise.
- baseline of a promotion on a day: the trailing mean of its daily conversion rate
  (all waves and channels together), as above.
- traffic light: walking back from the last complete day over the days with a value,
  the number of days in a row whose conversion was under that day's baseline; red for
  3 or more, yellow for 1 or 2, green for none (or no baseline yet).

Evaluation is deterministic: it reads the aggregates and the service clock only, for the
last `lookback_days` complete days; alert ids derive from what they are about, so an
evaluation repeated (another replica, a restart) raises nothing twice. A deviation alert
stays open until a later day of its series has a value; a traffic light alert until the
light changes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.metrics import periodic, store
from services.metrics.config import MetricsSettings
from shared.db import insert_ignore, upsert
from shared.events import AlertRaised
from shared.service import ServiceContext

log = logging.getLogger(__name__)

# metric -> (numerator, denominator, the bad direction: +1 up is bad, -1 down is bad)
METRICS: dict[str, tuple[str, str, int]] = {
    "conversion_rate": ("converted", "sent", -1),
    "aov": ("revenue", "orders", -1),
    "complaint_rate": ("complained", "sent", +1),
    "unsubscribe_rate": ("unsubscribed", "sent", +1),
}
MEASURES = sorted({m for num, den, _ in METRICS.values() for m in (num, den)})
LIGHTS = ("green", "yellow", "red")
RED_STREAK = 3

Day = dict[str, float]  # measure -> sum over the day
SeriesKey = tuple[str, str, str]  # promotion, wave, channel


@dataclass(frozen=True)
class Rules:
    threshold: float = 0.15
    trailing_days: int = 7
    min_history_days: int = 3
    min_sample: int = 30

    @classmethod
    def of(cls, settings: MetricsSettings) -> Rules:
        return cls(
            threshold=settings.alert_threshold,
            trailing_days=settings.alert_trailing_days,
            min_history_days=settings.alert_min_history_days,
            min_sample=settings.alert_min_sample,
        )


def value_of(metric: str, measures: Mapping[str, float] | None, rules: Rules) -> float | None:
    """The day's value of `metric`, or None when its denominator is under min_sample."""
    if not measures:
        return None
    numerator, denominator, _ = METRICS[metric]
    below = measures.get(denominator, 0.0)
    if below < rules.min_sample or below <= 0:
        return None
    return measures.get(numerator, 0.0) / below


def trailing_mean(values: Mapping[date, float | None], day: date, rules: Rules) -> float | None:
    past = [
        v
        for k in range(1, rules.trailing_days + 1)
        if (v := values.get(day - timedelta(days=k))) is not None
    ]
    if len(past) < rules.min_history_days:
        return None
    return sum(past) / len(past)


@dataclass(frozen=True)
class Finding:
    promotion_id: str
    wave: str
    channel: str
    metric: str
    day: date
    value: float
    baseline: float

    @property
    def change(self) -> float:
        return (self.value - self.baseline) / self.baseline

    @property
    def severity(self) -> str:
        bad = METRICS[self.metric][2]
        return "warning" if self.change * bad > 0 else "info"


def deviations(
    series: Mapping[SeriesKey, Mapping[date, Day]], days: Iterable[date], rules: Rules
) -> list[Finding]:
    """Every (series, metric, day in `days`) more than `threshold` from its trailing mean."""
    out: list[Finding] = []
    wanted = sorted(days)
    for (promotion, wave, channel), daily in sorted(series.items()):
        for metric in METRICS:
            values = {d: value_of(metric, m, rules) for d, m in daily.items()}
            for day in wanted:
                value = values.get(day)
                mean = trailing_mean(values, day, rules)
                if value is None or mean is None or mean <= 0:
                    continue
                if abs(value - mean) / mean > rules.threshold:
                    out.append(Finding(promotion, wave, channel, metric, day, value, mean))
    return out


def latest_with_value(daily: Mapping[date, Day], metric: str, rules: Rules) -> date | None:
    days = [d for d, m in daily.items() if value_of(metric, m, rules) is not None]
    return max(days) if days else None


@dataclass(frozen=True)
class Light:
    light: str
    streak: int
    day: date | None  # the latest day with a value (the one conversion/baseline are of)
    conversion: float | None
    baseline: float | None


def traffic_light(daily: Mapping[date, Day], last_day: date, rules: Rules) -> Light:
    """The promotion's light as of `last_day` from its promotion-wide daily measures."""
    conversions = {d: value_of("conversion_rate", m, rules) for d, m in daily.items()}
    streak = 0
    latest: tuple[date, float, float | None] | None = None
    for day in sorted((d for d in conversions if d <= last_day), reverse=True):
        value = conversions[day]
        if value is None:
            continue  # no sends that day: neither extends nor breaks a streak
        baseline = trailing_mean(conversions, day, rules)
        if latest is None:
            latest = (day, value, baseline)
        if baseline is None or value >= baseline:
            break
        streak += 1
    light = "red" if streak >= RED_STREAK else "yellow" if streak else "green"
    if latest is None:
        return Light(light, streak, None, None, None)
    return Light(light, streak, latest[0], latest[1], latest[2])


def alert_id(*parts: str) -> str:
    return "al-" + hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()


def describe(metric: str, value: float | None, baseline: float | None) -> str:
    def show(v: float | None) -> str:
        if v is None:
            return "n/a"
        return f"{v:.2f}" if metric == "aov" else f"{v:.2%}"

    return f"{show(value)} against {show(baseline)}"


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def _as_date(raw: Any) -> date:
    if isinstance(raw, datetime):
        return raw.date()
    if isinstance(raw, date):
        return raw
    return date.fromisoformat(str(raw)[:10])


# -- reading and writing ------------------------------------------------------------

_LOCK = text("SELECT pg_advisory_xact_lock(8004000001)")


async def read_days(
    conn: AsyncConnection, first: date, last: date
) -> dict[SeriesKey, dict[date, Day]]:
    m = store.minute_counts
    if conn.dialect.name == "postgresql":
        day = func.date_trunc("day", func.timezone("UTC", m.c.minute))
    else:
        day = func.date(m.c.minute)
    query = (
        select(
            m.c.promotion_id,
            m.c.wave,
            m.c.channel,
            day,
            *(func.sum(m.c[store.measure_column(x)]) for x in MEASURES),
        )
        .where(
            m.c.minute >= midnight(first),
            m.c.minute < midnight(last + timedelta(days=1)),
        )
        .group_by(m.c.promotion_id, m.c.wave, m.c.channel, day)
    )
    out: dict[SeriesKey, dict[date, Day]] = {}
    for promotion, wave, channel, raw_day, *totals in (await conn.execute(query)).all():
        bucket = out.setdefault((promotion, wave, channel), {}).setdefault(_as_date(raw_day), {})
        for measure, total in zip(MEASURES, totals, strict=True):
            if total:
                bucket[measure] = bucket.get(measure, 0.0) + float(total)
    return out


def promotion_days(series: Mapping[SeriesKey, Mapping[date, Day]]) -> dict[str, dict[date, Day]]:
    out: dict[str, dict[date, Day]] = {}
    for (promotion, _, _), daily in series.items():
        for day, measures in daily.items():
            bucket = out.setdefault(promotion, {}).setdefault(day, {})
            for name, v in measures.items():
                bucket[name] = bucket.get(name, 0.0) + v
    return out


def _row(
    *,
    aid: str,
    promotion: str,
    kind: str,
    metric: str,
    wave: str,
    channel: str,
    day: date,
    value: float | None,
    baseline: float | None,
    severity: str,
    message: str,
    now: datetime,
) -> dict[str, Any]:
    return {
        "alert_id": aid,
        "promotion_id": promotion,
        "kind": kind,
        "metric": metric,
        "wave": wave,
        "channel": channel,
        "day": midnight(day),
        "value": value,
        "baseline": baseline,
        "severity": severity,
        "status": "open",
        "message": message[:512],
        "raised_at": now,
        "resolved_at": None,
    }


async def evaluate(
    conn: AsyncConnection, now: datetime, settings: MetricsSettings
) -> list[AlertRaised]:
    """Raise and resolve alerts and set the traffic lights as of `now`; returns the alerts
    raised by this call (to publish)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(_LOCK)  # replicas evaluate one after the other
    rules = Rules.of(settings)
    last = now.astimezone(UTC).date() - timedelta(days=1)
    first = last - timedelta(days=settings.alert_lookback_days - 1)
    series = await read_days(conn, first - timedelta(days=rules.trailing_days), last)
    days = [first + timedelta(days=k) for k in range((last - first).days + 1)]
    rows: list[dict[str, Any]] = []
    for f in deviations(series, days, rules):
        rows.append(
            _row(
                aid=alert_id(f.promotion_id, f.wave, f.channel, f.metric, f.day.isoformat()),
                promotion=f.promotion_id,
                kind="deviation",
                metric=f.metric,
                wave=f.wave,
                channel=f.channel,
                day=f.day,
                value=f.value,
                baseline=f.baseline,
                severity=f.severity,
                message=(
                    f"{f.metric} of {f.wave} on {f.channel or 'no channel'} on {f.day}: "
                    f"{describe(f.metric, f.value, f.baseline)} (trailing mean), "
                    f"{f.change:+.0%}"
                ),
                now=now,
            )
        )
    a = store.alerts
    newest: dict[tuple[str, str, str, str], date | None] = {}

    def superseded(promotion: str, wave: str, channel: str, metric: str, day: date) -> bool:
        """A later day of the series has a value: the alert is resolved."""
        key = (promotion, wave, channel, metric)
        if key not in newest:
            daily = series.get((promotion, wave, channel), {})
            newest[key] = latest_with_value(
                {d: m for d, m in daily.items() if d <= last}, metric, rules
            )
        latest = newest[key]
        return latest is not None and day < latest

    for r in rows:
        if superseded(r["promotion_id"], r["wave"], r["channel"], r["metric"], r["day"].date()):
            r["status"], r["resolved_at"] = "resolved", now
    open_rows = (
        await conn.execute(
            select(
                a.c.alert_id, a.c.promotion_id, a.c.kind, a.c.metric, a.c.wave, a.c.channel, a.c.day
            ).where(a.c.status == "open")
        )
    ).all()
    resolve = [
        r.alert_id
        for r in open_rows
        if r.kind == "deviation"
        and superseded(r.promotion_id, r.wave, r.channel, r.metric, _as_date(r.day))
    ]

    # Traffic lights, for every promotion with data in the window.
    t = store.traffic_lights
    by_promotion = promotion_days(series)
    before = (
        {
            r.promotion_id: r.light
            for r in (
                await conn.execute(
                    select(t.c.promotion_id, t.c.light).where(
                        t.c.promotion_id.in_(sorted(by_promotion))
                    )
                )
            ).all()
        }
        if by_promotion
        else {}
    )
    lights: list[dict[str, Any]] = []
    for promotion, daily in sorted(by_promotion.items()):
        light = traffic_light(daily, last, rules)
        lights.append(
            {
                "promotion_id": promotion,
                "light": light.light,
                "streak": light.streak,
                "day": midnight(light.day) if light.day else None,
                "conversion": light.conversion,
                "baseline": light.baseline,
                "updated_at": now,
            }
        )
        if before.get(promotion, "green") == light.light:
            continue
        resolve.extend(
            r.alert_id
            for r in open_rows
            if r.kind == "traffic_light" and r.promotion_id == promotion
        )
        if light.light != "green" and light.day is not None:
            rows.append(
                _row(
                    aid=alert_id(promotion, "traffic_light", light.light, light.day.isoformat()),
                    promotion=promotion,
                    kind="traffic_light",
                    metric="traffic_light",
                    wave="",
                    channel="",
                    day=light.day,
                    value=light.conversion,
                    baseline=light.baseline,
                    severity="critical" if light.light == "red" else "warning",
                    message=(
                        f"{promotion} is {light.light}: conversion under its baseline "
                        f"{light.streak} day(s) in a row up to {light.day} "
                        f"({describe('conversion_rate', light.conversion, light.baseline)})"
                    ),
                    now=now,
                )
            )
    if lights:
        await conn.execute(upsert(t, ["promotion_id"]), lights)
    if resolve:
        await conn.execute(
            update(a)
            .where(a.c.alert_id.in_(sorted(set(resolve))), a.c.status == "open")
            .values(status="resolved", resolved_at=now)
        )
    raised: list[AlertRaised] = []
    if rows:
        rows.sort(key=lambda r: r["alert_id"])
        new = {
            r[0] for r in (await conn.execute(insert_ignore(a).returning(a.c.alert_id), rows)).all()
        }
        for r in rows:
            if r["alert_id"] not in new:
                continue
            raised.append(
                AlertRaised(
                    alert_id=r["alert_id"],
                    promotion_id=r["promotion_id"],
                    metric=r["metric"],
                    wave=r["wave"] or None,
                    channel=r["channel"] or None,
                    severity=r["severity"],
                    value=r["value"],
                    baseline=r["baseline"],
                    message=r["message"],
                    at=now,
                )
            )
    return raised


class BusinessMetrics:
    """Prometheus series of the business alerts; labels bounded (metric, wave, channel,
    light), never a promotion, user or touch id: /v1/alerts names the promotions."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge(
            "afterglow_business_alerts_open",
            "Open business alerts (deviation from the trailing mean) by metric, wave, channel",
            ("metric", "wave", "channel"),
            registry=registry,
        )
        self.lights = Gauge(
            "afterglow_promotions_traffic_light",
            "Promotions by traffic light (red: conversion under its baseline 3 days in a row)",
            ("light",),
            registry=registry,
        )
        self.raised = Counter(
            "afterglow_business_alerts_raised_total",
            "Business alerts raised by this instance, by metric and severity",
            ("metric", "severity"),
            registry=registry,
        )
        for light in LIGHTS:
            self.lights.labels(light=light).set(0)

    async def refresh(self, conn: AsyncConnection) -> None:
        a, t = store.alerts, store.traffic_lights
        counts = (
            await conn.execute(
                select(a.c.metric, a.c.wave, a.c.channel, func.count())
                .where(a.c.status == "open", a.c.kind == "deviation")
                .group_by(a.c.metric, a.c.wave, a.c.channel)
            )
        ).all()
        self.open.clear()
        for metric, wave, channel, n in counts:
            self.open.labels(metric=metric, wave=wave, channel=channel).set(n)
        found = await conn.execute(select(t.c.light, func.count()).group_by(t.c.light))
        lights: dict[str, int] = {light: int(n) for light, n in found.all()}
        for light in LIGHTS:
            self.lights.labels(light=light).set(lights.get(light, 0))


BUSINESS_KEY = "metrics_business"


def business_metrics(ctx: ServiceContext) -> BusinessMetrics:
    found = ctx.extras.get(BUSINESS_KEY)
    if not isinstance(found, BusinessMetrics):
        found = ctx.extras[BUSINESS_KEY] = BusinessMetrics(ctx.metrics.registry)
    return found


async def evaluate_once(ctx: ServiceContext, settings: MetricsSettings) -> list[AlertRaised]:
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        raised = await evaluate(conn, now, settings)
        await ctx.outbox.add(conn, raised, now=now)
    if raised:
        ctx.outbox.notify()
    gauges = business_metrics(ctx)
    for alert in raised:
        gauges.raised.labels(metric=alert.metric, severity=alert.severity).inc()
        log.info(
            "business alert raised",
            extra={"alert_id": alert.alert_id, "metric": alert.metric, "severity": alert.severity},
        )
    async with ctx.db.connect() as conn:
        await gauges.refresh(conn)
    return raised


async def run(ctx: ServiceContext, settings: MetricsSettings) -> None:
    """Evaluate now, then every `alert_interval_s` of the service clock (at once when a
    manual clock moves)."""
    business_metrics(ctx)
    await periodic.every(
        ctx,
        settings.alert_interval_s,
        functools.partial(evaluate_once, ctx, settings),
        "alert evaluation",
    )


def page_key(row: Mapping[str, Any]) -> str:
    return f"{row['day'].astimezone(UTC).isoformat()}|{row['alert_id']}"


def alert_public(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "alert_id": row["alert_id"],
        "promotion_id": row["promotion_id"],
        "kind": row["kind"],
        "metric": row["metric"],
        "wave": row["wave"] or None,
        "channel": row["channel"] or None,
        "day": row["day"].date().isoformat(),
        "value": row["value"],
        "baseline": row["baseline"],
        "severity": row["severity"],
        "status": row["status"],
        "message": row["message"],
        "raised_at": row["raised_at"],
        "resolved_at": row["resolved_at"],
    }


async def list_alerts(
    conn: AsyncConnection,
    *,
    promotion_id: str | None,
    status: str | None,
    limit: int,
    after: tuple[datetime, str] | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest day first, then by id; `after` is the last (day, alert_id) of the page before."""
    a = store.alerts
    query = select(a).order_by(a.c.day.desc(), a.c.alert_id).limit(limit + 1)
    if promotion_id is not None:
        query = query.where(a.c.promotion_id == promotion_id)
    if status is not None:
        query = query.where(a.c.status == status)
    if after is not None:
        day, aid = after
        query = query.where((a.c.day < day) | ((a.c.day == day) & (a.c.alert_id > aid)))
    rows = [dict(r._mapping) for r in (await conn.execute(query)).all()]
    more = len(rows) > limit
    rows = rows[:limit]
    return [alert_public(r) for r in rows], page_key(rows[-1]) if more and rows else None


async def list_lights(conn: AsyncConnection, promotion_id: str | None) -> list[dict[str, Any]]:
    t = store.traffic_lights
    query = select(t).order_by(t.c.promotion_id)
    if promotion_id is not None:
        query = query.where(t.c.promotion_id == promotion_id)
    return [
        {
            "promotion_id": r.promotion_id,
            "light": r.light,
            "streak": int(r.streak),
            "day": r.day.date().isoformat() if r.day else None,
            "conversion": r.conversion,
            "baseline": r.baseline,
            "updated_at": r.updated_at,
        }
        for r in (await conn.execute(query)).all()
    ]


def parse_cursor(raw: str) -> tuple[datetime, str] | None:
    day, sep, aid = raw.partition("|")
    if not sep or not aid:
        return None
    try:
        when = datetime.fromisoformat(day)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when, aid
