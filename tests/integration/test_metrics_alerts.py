"""Business alerts end to end: a known stream over the bus, the manual clock moved past
the last day, then `GET /v1/alerts` (filters, pages), `GET /v1/traffic-lights`, the
`alerts` topic and the Prometheus gauges; on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.bus import OutMessage
from shared.bus.memory import InProcessBus
from shared.clock import ManualClock
from shared.events import (
    ActivityRecorded,
    DeliverySent,
    EventData,
    TouchPlanned,
    default_registry,
    encode,
)
from tests.integration.metrics_harness import running_metrics

TOKEN = "t-admin"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
P = "p-alerts"
# Daily conversions of 10 launch e-mails on days 1..6: three steady days, then lower three
# days in a row (each more than 15% under the trailing mean of the days before it).
CONVERTED = (5, 5, 5, 4, 3, 2)


@pytest.fixture(params=["sqlite", "postgres"])
async def service(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, InProcessBus, ManualClock]]:
    monkeypatch.setenv("AFTERGLOW_METRICS_ALERT_MIN_SAMPLE", "5")
    tokens = {TOKEN: frozenset({"*"})}
    async with running_metrics(request, tmp_path, unique, start=T0, tokens=tokens) as m:
        yield m.client, m.bus, m.clock


def stream() -> list[OutMessage]:
    out: list[OutMessage] = []

    def add(data: EventData, at: datetime) -> None:
        value = encode(data, source="test", time=at)
        out.append(OutMessage(topic=data.topic, key=data.partition_key(), value=value))

    for k, converted in enumerate(CONVERTED):
        sent_at = T0 + timedelta(days=k, hours=10)
        for i in range(10):
            user, tid = f"u-{k}-{i}", f"t-{k}-{i}"
            common: dict[str, Any] = {
                "touch_id": tid,
                "user_id": user,
                "promotion_id": P,
                "wave": "launch",
            }
            add(TouchPlanned(**common, due_at=sent_at, segment="core"), sent_at)
            add(DeliverySent(**common, channel="email", at=sent_at, cost=0.01), sent_at)
            if i < converted:
                bought = sent_at + timedelta(hours=1)
                purchase = ActivityRecorded(
                    user_id=user, id=f"a-{k}-{i}", kind="purchase", occurred_at=bought, amount=50
                )
                add(purchase, bought)
    return out


async def eventually(probe: Any, what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = await probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def all_alerts(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    answer = await client.get("/v1/alerts", params={"promotion_id": P, **params})
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["alerts"]
    return found


async def test_conversion_falling_three_days_turns_the_light_red(
    service: tuple[httpx.AsyncClient, InProcessBus, ManualClock],
) -> None:
    client, bus, _ = service
    await bus.publish(stream())

    async def counted() -> bool:
        answer = await client.get("/v1/funnel", params={"promotion_id": P, "group_by": "wave"})
        rows = answer.json()["rows"]
        return bool(rows) and rows[0]["sent"] == 60 and rows[0]["converted"] == sum(CONVERTED)

    await eventually(counted, "the stream counted")
    # Nothing is complete yet at T0: no alert, no light.
    assert await all_alerts(client) == []

    answer = await client.put(
        "/v1/admin/clock", json={"now": (T0 + timedelta(days=6, minutes=1)).isoformat()}
    )
    assert answer.status_code == 200, answer.text
    alerts = await eventually(lambda: all_alerts(client), "alerts raised")
    deviation = [a for a in alerts if a["kind"] == "deviation"]
    assert [(a["metric"], a["wave"], a["channel"], a["day"]) for a in deviation] == [
        ("conversion_rate", "launch", "email", "2026-03-06"),
        ("conversion_rate", "launch", "email", "2026-03-05"),
        ("conversion_rate", "launch", "email", "2026-03-04"),
    ]
    day4, day5, day6 = deviation[2], deviation[1], deviation[0]
    assert day4["value"] == pytest.approx(0.4) and day4["baseline"] == pytest.approx(0.5)
    assert day5["value"] == pytest.approx(0.3) and day5["baseline"] == pytest.approx(0.475)
    assert day6["value"] == pytest.approx(0.2) and day6["baseline"] == pytest.approx(0.44)
    assert {a["severity"] for a in deviation} == {"warning"}
    # Only the newest day of a series stays open.
    assert [a["status"] for a in deviation] == ["open", "resolved", "resolved"]
    (light_alert,) = [a for a in alerts if a["kind"] == "traffic_light"]
    assert light_alert["severity"] == "critical"
    assert light_alert["status"] == "open"
    assert light_alert["day"] == "2026-03-06"

    open_only = await all_alerts(client, status="open")
    assert {a["alert_id"] for a in open_only} == {day6["alert_id"], light_alert["alert_id"]}

    answer = await client.get("/v1/traffic-lights", params={"promotion_id": P})
    (light,) = answer.json()["traffic_lights"]
    assert (light["light"], light["streak"], light["day"]) == ("red", 3, "2026-03-06")
    assert light["conversion"] == pytest.approx(0.2)
    assert light["baseline"] == pytest.approx(0.44)

    # Pages of one alert each give every alert once, in the same order.
    paged: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"promotion_id": P, "limit": 1}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/v1/alerts", params=params)).json()
        paged += [a["alert_id"] for a in page["alerts"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == [a["alert_id"] for a in alerts]

    # Published on `alerts`, each once, even after evaluating again.
    await clock_move(client, T0 + timedelta(days=6, minutes=2))
    await clock_move(client, T0 + timedelta(days=6, minutes=3))

    async def published() -> list[Any]:
        registry = default_registry()
        found = [registry.decode(m.value).data for m in bus.messages("alerts")]
        return found if len(found) >= len(alerts) else []

    raised = await eventually(published, "alerts published")
    await asyncio.sleep(0.2)
    raised = await published()
    assert sorted(a.alert_id for a in raised) == sorted(a["alert_id"] for a in alerts)
    assert {(a.metric, a.wave, a.channel) for a in raised} == {
        ("conversion_rate", "launch", "email"),
        ("traffic_light", None, None),
    }

    metrics = (await client.get("/metrics")).text
    assert 'afterglow_promotions_traffic_light{light="red"} 1.0' in metrics
    assert (
        'afterglow_business_alerts_open{channel="email",metric="conversion_rate",wave="launch"} 1.0'
        in metrics
    )
    assert P not in metrics  # no promotion id in a label


async def clock_move(client: httpx.AsyncClient, now: datetime) -> None:
    answer = await client.put("/v1/admin/clock", json={"now": now.isoformat()})
    assert answer.status_code == 200, answer.text


async def test_alerts_refuse_bad_input(
    service: tuple[httpx.AsyncClient, InProcessBus, ManualClock],
) -> None:
    client, _, _ = service
    for params, field in (
        ({"status": "closed"}, "status"),
        ({"limit": 0}, "limit"),
        ({"cursor": "nonsense"}, "cursor"),
    ):
        answer = await client.get("/v1/alerts", params=params)
        assert answer.status_code == 422, answer.text
        assert field in answer.text
    answer = await client.get("/v1/alerts", headers={"Authorization": ""})
    assert answer.status_code == 401
