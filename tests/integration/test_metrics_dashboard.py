"""The dashboard in headless Chromium against the metrics service on a loopback port, with
data fed through the real event path (bus, consumer, aggregates, alert evaluation): the
charts are in the DOM with the right numbers and the screenshot is not blank.

Chromium comes from Debian's `chromium` package; without it these tests skip locally and
fail with CI=true.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.bus import OutMessage
from shared.events import EngagementRecorded, EventData, TouchPlanned, TouchSuppressed, encode
from tests.integration.metrics_harness import Metrics, running_metrics
from tests.integration.test_metrics_alerts import CONVERTED, T0, P, eventually, stream

ADMIN, READER = "t-admin", "t-reader"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
COLOURS = {"sent": (59, 111, 216), "converted": (214, 69, 93), "opened": (27, 163, 156)}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "chromium is not installed (Debian: apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"CI=true and {reason}", pytrace=False)
        pytest.skip(reason)
    return found


async def browse(url: str, *args: str, budget_ms: int = 8000) -> str:
    """Run headless Chromium once on `url` (a fresh profile); returns its stdout."""
    binary = chromium()
    with tempfile.TemporaryDirectory(prefix="afterglow-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1280,2000",
            f"--virtual-time-budget={budget_ms}",
            *args,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def extra_stream() -> list[OutMessage]:
    """Day 3 e-mails to day 1's users (opened by 6, clicked by 2) and a holdout of 5."""
    out: list[OutMessage] = []

    def add(data: EventData) -> None:
        at = T0 + timedelta(days=3, hours=9)
        out.append(OutMessage(data.topic, data.partition_key(), encode(data, source="t", time=at)))

    at = T0 + timedelta(days=3, hours=9)
    for i in range(10):
        common: dict[str, Any] = {
            "touch_id": f"t3-{i}",
            "user_id": f"u-0-{i}",
            "promotion_id": P,
            "wave": "day3",
        }
        add(TouchPlanned(**common, due_at=at, segment="head"))
        if i < 6:
            add(EngagementRecorded(**common, channel="sms", kind="opened", at=at))
        if i < 2:
            add(EngagementRecorded(**common, channel="sms", kind="clicked", at=at))
    for i in range(5):
        held: dict[str, Any] = {
            "touch_id": f"th-{i}",
            "user_id": f"u-held-{i}",
            "promotion_id": P,
            "wave": "launch",
        }
        add(TouchPlanned(**held, due_at=at, segment="core"))
        add(TouchSuppressed(**held, reason="holdout", at=at))
    return out


@pytest.fixture(params=["postgres"])
async def served(
    request: pytest.FixtureRequest, tmp_path: Path, unique: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Metrics]:
    chromium()
    monkeypatch.setenv("AFTERGLOW_METRICS_ALERT_MIN_SAMPLE", "5")
    tokens = {ADMIN: frozenset({"*"}), READER: frozenset({"metrics:read"})}
    async with running_metrics(request, tmp_path, unique, start=T0, tokens=tokens, serve=True) as m:
        await m.bus.publish(stream() + extra_stream())

        async def counted() -> bool:
            answer = await m.client.get("/v1/funnel", params={"promotion_id": P})
            rows = {r["wave"]: r for r in answer.json()["rows"]}
            return (
                rows.get("launch", {}).get("converted") == sum(CONVERTED)
                and rows.get("launch", {}).get("holdout") == 5
                and rows.get("day3", {}).get("opened") == 6
            )

        await eventually(counted, "the stream counted")
        answer = await m.client.put(
            "/v1/admin/clock", json={"now": (T0 + timedelta(days=6, minutes=1)).isoformat()}
        )
        assert answer.status_code == 200, answer.text

        async def red() -> bool:
            answer = await m.client.get("/v1/traffic-lights", params={"promotion_id": P})
            return [x["light"] for x in answer.json()["traffic_lights"]] == ["red"]

        await eventually(red, "the traffic light")
        yield m


def bars(dom: str) -> dict[tuple[str, str], str]:
    """(wave or group, measure) -> data-value of every chart bar in the DOM."""
    found: dict[tuple[str, str], str] = {}
    for tag in re.findall(r"<rect [^>]*class=\"bar\"[^>]*>", dom):
        attrs = dict(re.findall(r'([a-z-]+)="([^"]*)"', tag))
        where = attrs.get("data-wave") or attrs.get("data-group", "")
        found[(where, attrs["data-measure"])] = attrs["data-value"]
    return found


async def test_the_charts_render_the_funnel_lights_alerts_and_experiment(
    served: Metrics,
) -> None:
    assert served.url is not None
    page = f"{served.url}/dashboard?promotion_id={P}&refresh=600#token={READER}"
    dom = await browse(page, "--dump-dom")
    assert f'data-loaded="{P}"' in dom, dom[:3000]
    values = bars(dom)
    # Funnel per wave: 60 launch e-mails planned and sent, 24 converted; day 3 opened by 6.
    assert values[("launch", "planned")] == "65"  # with the 5 held out
    assert values[("launch", "sent")] == "60"
    assert values[("launch", "converted")] == str(sum(CONVERTED))
    assert values[("day3", "opened")] == "6"
    assert values[("day3", "clicked")] == "2"
    # Breakdowns: conversion by channel (e-mail) and by segment (core: the launch users).
    assert float(values[("email", "conversion_rate")]) == pytest.approx(24 / 60)
    assert float(values[("core", "conversion_rate")]) == pytest.approx(24 / 60)
    # The red light, the alerts and the experiment's uplift interval.
    assert 'data-light="red"' in dom
    assert dom.count("conversion_rate") >= 3
    assert 'class="ci"' in dom and 'class="uplift"' in dom
    assert "variant" in dom


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered rows (RGB or RGBA, 8 bits) of a PNG, with zlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, previous, strict=True))
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = previous[i], previous[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, bpp, rows


async def test_the_screenshot_shows_the_charts(served: Metrics, tmp_path: Path) -> None:
    assert served.url is not None
    shot = tmp_path / "dashboard.png"
    page = f"{served.url}/dashboard?promotion_id={P}&refresh=600#token={READER}"
    await browse(page, f"--screenshot={shot}")
    width, bpp, rows = png_pixels(shot.read_bytes())
    assert width == 1280 and len(rows) == 2000
    # The funnel chart sits in the top part of the page: read its pixels.
    colours: Counter[tuple[int, ...]] = Counter()
    for line in rows[100:900]:
        for x in range(0, width * bpp, bpp):
            colours[tuple(line[x : x + 3])] += 1
    background = {(246, 247, 250), (255, 255, 255)}
    painted = sum(n for c, n in colours.items() if c not in background)
    assert painted > 0.05 * width * 800, painted
    assert len(colours) > 20, len(colours)
    for measure, rgb in COLOURS.items():
        assert colours[rgb] > 200, (measure, colours[rgb])


async def test_the_page_is_public_its_data_is_not(served: Metrics) -> None:
    assert served.url is not None
    async with httpx.AsyncClient(base_url=served.url) as anonymous:
        page = await anonymous.get("/dashboard")
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert "dashboard.js" in page.text and P not in page.text
        assert (await anonymous.get("/dashboard/dashboard.js")).status_code == 200
        assert (await anonymous.get("/v1/funnel", params={"promotion_id": P})).status_code == 401
    # Without a token the page asks for one and shows no figure.
    dom = await browse(f"{served.url}/dashboard?promotion_id={P}", "--dump-dom", budget_ms=3000)
    assert 'id="token-form"' in dom and 'id="token-form" hidden' not in dom
    assert 'class="bar"' not in dom
