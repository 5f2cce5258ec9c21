"""The metrics service end to end on the in-process bus: migrations (0001, 0002), the
batch consumer, redelivery, `GET /v1/funnel` with filters and group_by, and
`GET /v1/experiments/{promotion_id}` over a small known stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.bus import OutMessage
from shared.bus.memory import InProcessBus
from shared.events import DeliverySent, Event, TouchSuppressed, encode
from tests.integration.metrics_harness import running_metrics
from tests.integration.test_metrics_exactness import (
    DAY3,
    LAUNCH,
    T0,
    P,
    check,
    ev,
    purchase,
    stream,
)

TOKEN = "t-admin"
READER = "t-reader"


@pytest.fixture(params=["sqlite", "postgres"])
async def service(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str
) -> AsyncIterator[tuple[httpx.AsyncClient, InProcessBus]]:
    tokens = {TOKEN: frozenset({"*"}), READER: frozenset({"segmentation:read"})}
    async with running_metrics(request, tmp_path, unique, start=T0, tokens=tokens) as m:
        yield m.client, m.bus


def out(event: Event[Any]) -> OutMessage:
    value = encode(event.data, source="test", time=event.time, event_id=event.id)
    return OutMessage(topic=event.data.topic, key=event.key, value=value)


async def funnel_rows(client: httpx.AsyncClient, **params: str) -> list[dict[str, Any]]:
    answer = await client.get("/v1/funnel", params={"promotion_id": P, **params})
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["rows"]
    return rows


async def test_funnel_over_the_bus(service: tuple[httpx.AsyncClient, InProcessBus]) -> None:
    client, bus = service
    events = stream()
    # Every event twice: the second copy is a redelivery.
    await bus.publish([out(e) for e in events] + [out(e) for e in events])

    deadline = time.monotonic() + 20
    while True:
        rows = {r["wave"]: r for r in await funnel_rows(client)}
        if (
            rows.get("day3", {}).get("failed") == 1
            and rows.get("launch", {}).get("planned") == LAUNCH["planned"]
        ):
            break
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)
    # Topics are consumed independently: wait for every figure to settle.
    while True:
        rows = {r["wave"]: r for r in await funnel_rows(client)}
        try:
            check(rows["launch"], LAUNCH)
            check(rows["day3"], DAY3)
            break
        except AssertionError as error:
            assert time.monotonic() < deadline, (error, rows)
            await asyncio.sleep(0.05)

    body = (await client.get("/v1/funnel", params={"promotion_id": P})).json()
    assert body["group_by"] == ["wave"]
    grouped = await funnel_rows(client, group_by="wave,segment", segment="high")
    assert {(r["wave"], r["segment"]) for r in grouped} == {("launch", "high"), ("day3", "high")}


async def test_funnel_refuses_bad_input(service: tuple[httpx.AsyncClient, InProcessBus]) -> None:
    client, _ = service
    bad = await client.get("/v1/funnel", params={"promotion_id": P, "group_by": "wave,user"})
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")
    empty = await client.get("/v1/funnel", params={"promotion_id": "nothing"})
    assert empty.json()["rows"] == []
    forbidden = await client.get(
        "/v1/funnel",
        params={"promotion_id": P},
        headers={"Authorization": f"Bearer {READER}"},
    )
    assert forbidden.status_code == 403
    assert (
        await client.get("/v1/funnel", params={"promotion_id": P}, headers={"Authorization": ""})
    ).status_code == 401


def experiment_stream() -> list[Event[Any]]:
    """Promotion p-exp: variant A (a1..a4, and c1 in wave w2), variant B (b1, b2), the holdout
    (h1..h4) and c1 held out of wave w1 only. Buyers: a1, a2, b1, h1 and c1 (while held out)."""
    q, day, hour = "p-exp", timedelta(days=1), timedelta(hours=1)

    def t(tid: str, user: str, wave: str, variant: str) -> dict[str, Any]:
        return {
            "touch_id": tid,
            "user_id": user,
            "promotion_id": q,
            "wave": wave,
            "variant": variant,
        }

    events: list[Event[Any]] = []
    for user, variant in [
        ("a1", "A"),
        ("a2", "A"),
        ("a3", "A"),
        ("a4", "A"),
        ("b1", "B"),
        ("b2", "B"),
    ]:
        data = DeliverySent(**t(f"{user}-launch", user, "launch", variant), channel="email", at=T0)
        events.append(ev(f"{user}-launch.sent", data))
    for user in ("h1", "h2", "h3", "h4"):
        held = TouchSuppressed(**t(f"{user}-launch", user, "launch", "A"), reason="holdout", at=T0)
        events.append(ev(f"{user}-launch.held", held))
        held2 = TouchSuppressed(
            **t(f"{user}-day3", user, "day3", "A"), reason="holdout", at=T0 + day
        )
        events.append(ev(f"{user}-day3.held", held2))
    held = TouchSuppressed(**t("c1-launch", "c1", "launch", "A"), reason="holdout", at=T0)
    events.append(ev("c1-launch.held", held))
    sent = DeliverySent(**t("c1-day3", "c1", "day3", "A"), channel="sms", at=T0 + day)
    events.append(ev("c1-day3.sent", sent, T0 + day))
    for user in ("a1", "a2", "b1", "h1"):
        events.append(purchase(f"{user}-buy", user, T0 + hour, 10.0))
    events.append(purchase("c1-buy", "c1", T0 + 2 * hour, 10.0))
    return events


def approx_ci(d: float, se: float) -> Any:
    return pytest.approx(
        {"uplift": d, "ci_low": d - 1.959964 * se, "ci_high": d + 1.959964 * se}, abs=1e-5
    )


async def test_experiment_over_the_bus(service: tuple[httpx.AsyncClient, InProcessBus]) -> None:
    client, bus = service
    await bus.publish([out(e) for e in experiment_stream()])
    expected_groups = {"holdout": (4, 1), "A": (5, 2), "B": (2, 1)}
    deadline = time.monotonic() + 20
    while True:
        answer = await client.get("/v1/experiments/p-exp")
        if answer.status_code == 200:
            body = answer.json()
            groups = {g["name"]: (g["exposed"], g["converted"]) for g in body["variants"]}
            groups["holdout"] = (body["holdout"]["exposed"], body["holdout"]["converted"])
            waves = {w["wave"]: w for w in body["waves"]}
            if groups == expected_groups and waves.get("launch", {}).get("held_out", {}).get(
                "converted"
            ):
                break
        assert time.monotonic() < deadline, answer.text
        await asyncio.sleep(0.05)

    assert "Wald" in body["method"]
    assert body["holdout"]["conversion_rate"] == 0.25
    a, b = body["variants"]
    pick = ("uplift", "ci_low", "ci_high")
    # A: 2/5 against 1/4, se = sqrt(0.4*0.6/5 + 0.25*0.75/4) = 0.308018
    assert a["conversion_rate"] == 0.4
    assert {k: a[k] for k in pick} == approx_ci(0.15, 0.308018)
    assert (a["sample_needed_per_group"], a["still_needed"], a["still_needed_baseline"]) == (
        152,
        147,
        148,
    )
    assert a["significant"] is False
    # B: 1/2 against 1/4, se = sqrt(0.25/2 + 0.1875/4) = 0.414578; n = 57.67 -> 58
    assert {k: b[k] for k in pick} == approx_ci(0.25, 0.414578)
    assert (b["sample_needed_per_group"], b["still_needed"], b["still_needed_baseline"]) == (
        58,
        56,
        54,
    )
    # Wave w1: 3/6 who got it against 1/1 held out of w1 only (c1; h1..h4 are the holdout).
    w1, w2 = waves["launch"], waves["day3"]
    assert (w1["treated"]["exposed"], w1["treated"]["converted"]) == (6, 3)
    assert (w1["held_out"]["exposed"], w1["held_out"]["converted"]) == (1, 1)
    assert {k: w1[k] for k in pick} == approx_ci(-0.5, 0.204124)
    assert (w1["sample_needed_per_group"], w1["still_needed"], w1["still_needed_baseline"]) == (
        11,
        5,
        10,
    )
    # Wave w2: c1 got it, nobody was held out of w2 alone: no comparison.
    assert (w2["treated"]["exposed"], w2["held_out"]["exposed"]) == (1, 0)
    assert w2["uplift"] is None and w2["sample_needed_per_group"] is None

    unknown = await client.get("/v1/experiments/nothing-here")
    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("application/problem+json")
    assert "nothing-here" in unknown.json()["detail"]
    forbidden = await client.get(
        "/v1/experiments/p-exp", headers={"Authorization": f"Bearer {READER}"}
    )
    assert forbidden.status_code == 403
