"""The scenario and the invariant checks shared by the process-level end-to-end tests
(test_processes.py, test_faults.py): users enrolled through REST, promotions ended, the
manual clock moved until the stack settles, and PRODUCT.md's invariants checked from
what the loopback provider received and what scheduling reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, get_args
from zoneinfo import ZoneInfo

import orjson
import pytest

from services.sandbox import HttpRequest
from shared.events import Reason
from tests.e2e.stack import RECEIPT_SECRET, ProcessStack, json_of
from tests.support.provider_server import Answer, Call, ProviderServer

TIMEZONES = ("UTC", "Asia/Shanghai", "America/New_York")
CHANNELS = ("sms", "email", "push")
# Two overlapping promotions: every user is in p-1, half of them also in p-2.
P1, P2 = "p-1", "p-2"
FINAL_STATUSES = {"sent", "suppressed", "failed", "cancelled"}
REASONS = set(get_args(Reason))  # PRODUCT.md's suppression and failure reasons


def next_start() -> datetime:
    """15:00 UTC tomorrow: the services' manual clocks start at the wall time and only go
    forward. 15:00 UTC is daytime in New York and London, night in Shanghai."""
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    return tomorrow.replace(hour=15, minute=0, second=0, microsecond=0)


def user_id(i: int) -> str:
    return f"u-{i:04d}"


@dataclass
class Scenario:
    """What the test did, at which manual time, to compare with what the provider saw."""

    start: datetime
    users: int = 0
    tz: dict[str, str] = field(default_factory=dict)
    consent: dict[str, dict[str, bool]] = field(default_factory=dict)
    ended: dict[str, datetime] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)
    # user -> [(since, channel or None for every channel, why)]
    stopped: dict[str, list[tuple[datetime, str | None, str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    erased: set[str] = field(default_factory=set)


def profile(rng: random.Random, i: int) -> tuple[str, dict[str, bool], dict[str, Any]]:
    user = user_id(i)
    tz = TIMEZONES[i % len(TIMEZONES)]
    if i % 10 == 0:
        consent = dict.fromkeys(CHANNELS, False)  # never agreed to anything
    else:
        consent = {c: rng.random() < 0.7 for c in CHANNELS}
    body = {
        "birth_year": rng.choice([1970, 1984, 1991, 1999, 2004]),
        "timezone": tz,
        "locale": "en-US",
        "addresses": {
            "sms": f"+1555{i:07d}",
            "email": f"{user}@example.com",
            "push": f"device-{user}",
        },
        "consent": consent,
    }
    return tz, consent, body


def sign(body: bytes) -> str:
    return "sha256=" + hmac.new(RECEIPT_SECRET.encode(), body, hashlib.sha256).hexdigest()


class Driver:
    def __init__(self, stack: ProcessStack, provider: ProviderServer, scenario: Scenario):
        self.stack = stack
        self.provider = provider
        self.scenario = scenario
        self.now = scenario.start
        self.c = stack.clients

    async def move(self, now: datetime) -> None:
        self.now = now
        await self.stack.set_clock(now)
        await self.settle()

    async def _snapshot(self) -> Any:
        plans = [
            await json_of(await self.c["scheduling"].get(f"/v1/promotions/{p}/plan"))
            for p in self.scenario.ended
        ]
        return plans, len(self.provider.calls), await self.stack.bus_counts()

    async def settle(self, quiet_s: float = 0.8, timeout_s: float = 30.0) -> None:
        """Until the plans, the provider's calls and the events produced and consumed by
        every service stay unchanged for `quiet_s`."""
        deadline = time.monotonic() + timeout_s
        last = await self._snapshot()
        since = time.monotonic()
        while time.monotonic() - since < quiet_s:
            if time.monotonic() > deadline:
                pytest.fail(f"the services did not settle at {self.now}", pytrace=False)
            await asyncio.sleep(0.2)
            current = await self._snapshot()
            if current != last:
                last, since = current, time.monotonic()

    async def receipt(self, touch_id: str, event: str) -> None:
        body = orjson.dumps({"id": touch_id, "event": event, "at": self.now.isoformat()})
        answer = await self.c["delivery"].post(
            "/v1/receipts",
            content=body,
            headers={"content-type": "application/json", "X-Afterglow-Signature": sign(body)},
        )
        assert answer.status_code in (200, 202), answer.text


def accepted_calls(provider: ProviderServer) -> list[Call]:
    return [c for c in provider.calls if c.answered.startswith("2")]


class FailSome:
    """The first call for one touch in eight fails with 503 (retried); SMS to users whose
    number ends in 7 is refused for good (400: the touch falls back or fails)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, request: HttpRequest) -> Answer | None:
        key = request.headers.get("idempotency-key", "")
        message = request.json()
        if message.get("channel") == "sms" and str(message.get("to", "")).endswith("7"):
            return Answer.error(400)
        if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 8 == 0 and key not in self.seen:
            self.seen.add(key)
            return Answer.error(503)
        return None


async def enrol(d: Driver, rng: random.Random, users: int) -> None:
    s = d.scenario
    s.users = users
    for i in range(users):
        tz, consent, body = profile(rng, i)
        s.tz[user_id(i)], s.consent[user_id(i)] = tz, consent
        await json_of(await d.c["segmentation"].put(f"/v1/users/{user_id(i)}", json=body))
    purchases = [
        {
            "id": f"hist-{i}-{n}",
            "user_id": user_id(i),
            "kind": "purchase",
            "occurred_at": (s.start - timedelta(days=rng.randint(2, 120))).isoformat(),
            "amount": round(rng.uniform(10, 600), 2),
            "currency": "USD",
            "item_id": f"sku-{rng.randint(1, 30)}",
            "category": rng.choice(["beauty", "home", "fashion"]),
        }
        for i in range(users)
        if i % 4 != 3
        for n in range(1 + i % 3)
    ]
    await json_of(await d.c["segmentation"].post("/v1/activities", json={"activities": purchases}))
    s.members[P1] = {user_id(i) for i in range(users)}
    s.members[P2] = {user_id(i) for i in range(users) if i % 2 == 0}
    for promotion, members in s.members.items():
        answer = await d.c["segmentation"].post(
            f"/v1/promotions/{promotion}/participants", json={"user_ids": sorted(members)}
        )
        assert answer.status_code == 202, answer.text


async def end_promotion(d: Driver, promotion: str) -> None:
    body = {"ended_at": d.now.isoformat(), "name": promotion, "policy": "default"}
    answer = await d.c["scheduling"].post(f"/v1/promotions/{promotion}/end", json=body)
    assert answer.status_code == 202, answer.text
    d.scenario.ended[promotion] = d.now


async def react(d: Driver, rng: random.Random, day: int) -> None:
    """Users answer what they got: opens, clicks, unsubscribes, complaints; some erase
    themselves or withdraw their email consent."""
    s = d.scenario
    fresh = [c.json() for c in accepted_calls(d.provider) if d.stack.timeline.at(c.at) == d.now]
    for message in fresh:
        user, channel = message["user_id"], message["channel"]
        roll = rng.random()
        if roll < 0.04:
            await d.receipt(message["id"], "unsubscribed")
            s.stopped[user].append((d.now, channel, "unsubscribed"))
        elif roll < 0.07:
            await d.receipt(message["id"], "complained")
            s.stopped[user].append((d.now, None, "complained"))
        elif roll < 0.4:
            await d.receipt(message["id"], "opened")
    if day in (2, 9):
        for i in range(day, s.users, 37):
            user = user_id(i)
            if user in s.erased:
                continue
            answer = await d.c["segmentation"].delete(f"/v1/users/{user}")
            assert answer.status_code in (200, 202, 204), answer.text
            s.erased.add(user)
            s.stopped[user].append((d.now, None, "erased"))
    if day == 5:
        for i in range(5, s.users, 29):
            user = user_id(i)
            if user in s.erased or not s.consent[user]["email"]:
                continue
            _, _, body = profile(random.Random(i), i)
            body["timezone"] = s.tz[user]
            body["consent"] = {**s.consent[user], "email": False}
            await json_of(await d.c["segmentation"].put(f"/v1/users/{user}", json=body))
            s.stopped[user].append((d.now, "email", "consent withdrawn"))


def in_quiet_hours(at: datetime, tz: str) -> bool:
    local = at.astimezone(ZoneInfo(tz)).time()
    return local.hour >= 21 or local.hour < 9


def windows_over(times: list[datetime], days: int, cap: int) -> bool:
    times = sorted(times)
    return any(
        sum(1 for t in times[i:] if t - first < timedelta(days=days)) > cap
        for i, first in enumerate(times)
    )


@dataclass
class Outcome:
    """What the checks found: the problems (empty when every invariant held) and the
    figures a test may assert on further."""

    problems: list[str]
    # touch id -> (manual time of its first accepted call, the message)
    touches_sent: dict[str, tuple[datetime, dict[str, Any]]]
    statuses: dict[str, int]
    plans: dict[str, Any]
    touches: dict[str, dict[str, Any]]  # touch id -> what scheduling lists
    repeated: set[str]  # keys called again after a delivery crash, as allowed

    def assert_clean(self) -> None:
        assert not self.problems, f"{len(self.problems)} problems:\n" + "\n".join(
            self.problems[:40]
        )


def replayed_after_crash(provider: ProviderServer, killed_at: float | None) -> set[str]:
    """The keys a killed delivery process called again, as PRODUCT.md allows: a touch
    whose call the provider had accepted before the kill (monotonic `killed_at`: a moment
    after the kill and before the restart, when delivery can neither call nor answer) but whose
    answer delivery had not recorded yet stays `sending`, and the redelivered event repeats
    that very call - same Idempotency-Key, same body - after the restart, so that the
    provider (which honours the key) sends it once. Any other repeat is a double send."""
    if killed_at is None:
        return set()
    repeats = set()
    for key, accepted in provider.accepted.items():
        if accepted < 2:
            continue
        first, *again = [c for c in provider.calls_to(key) if c.answered.startswith("2")]
        if first.at < killed_at and all(
            c.at > killed_at and c.body == first.body and c.path == first.path for c in again
        ):
            repeats.add(key)
    return repeats


async def check_invariants(
    d: Driver,
    policy: dict[str, Any],
    *,
    on_time: bool = True,
    delivery_killed_at: float | None = None,
) -> Outcome:
    """PRODUCT.md's invariants from the provider's side and scheduling's: no accepted
    Idempotency-Key twice; no send in quiet hours, without consent, after an unsubscribe,
    complaint or erasure; caps in every rolling window; every planned touch of every
    participant in a final state with a known reason, `sent` exactly when the provider
    accepted it; nothing pending in the plans. With `on_time`, every send also lands on
    its wave's day (not before its local day, not after its deadline): faults may delay
    sends past it, so fault tests leave that check out. `delivery_killed_at`: see
    `replayed_after_crash`."""
    scenario, provider, running = d.scenario, d.provider, d.stack
    waves = {w["name"]: w for w in policy["waves"]}
    problems: list[str] = []
    if not all(c.key for c in provider.calls):
        problems.append("a provider call without an Idempotency-Key")
    repeated = replayed_after_crash(provider, delivery_killed_at)
    twice = sorted(k for k, n in provider.accepted.items() if n > 1 and k not in repeated)
    if twice:
        problems.append(f"{len(twice)} touches accepted twice: {twice[:10]}")

    touches_sent: dict[str, tuple[datetime, dict[str, Any]]] = {}
    per_user: dict[str, list[datetime]] = defaultdict(list)
    for call in accepted_calls(provider):
        at = running.timeline.at(call.at)
        message = call.json()
        user, channel = message["user_id"], message["channel"]
        tz = scenario.tz[user]
        if in_quiet_hours(at, tz):
            problems.append(f"{message['id']} to {user} at {at} is in quiet hours ({tz})")
        if not scenario.consent[user][channel]:
            problems.append(f"{message['id']} to {user} on {channel} without consent")
        for since, stopped_channel, why in scenario.stopped.get(user, []):
            if at > since and stopped_channel in (None, channel):
                problems.append(f"{message['id']} to {user} on {channel} at {at} after {why}")
        if message["id"] not in touches_sent:
            touches_sent[message["id"]] = (at, message)
            per_user[user].append(at)
        # The wave lands on its day: not before its local day, not after its deadline.
        wave = waves[message["wave"]]
        ended = scenario.ended[message["promotion_id"]]
        earliest = min(wave["after_days"], wave.get("silent_after_days") or wave["after_days"])
        local = ZoneInfo(tz)
        if (
            at.astimezone(local).date()
            < (ended.astimezone(local) + timedelta(days=earliest)).date()
        ):
            problems.append(f"{message['id']} ({message['wave']}) at {at}: before its day")
        latest = ended + timedelta(days=wave["after_days"] + 1, hours=wave["deadline_hours"] + 12)
        if on_time and at > latest:
            problems.append(f"{message['id']} ({message['wave']}) at {at}: after its deadline")

    for user, times in per_user.items():
        if windows_over(times, 7, policy["caps"]["per_7d"]):
            problems.append(f"{user} got more than {policy['caps']['per_7d']} in 7 days")
        if windows_over(times, 30, policy["caps"]["per_30d"]):
            problems.append(f"{user} got more than {policy['caps']['per_30d']} in 30 days")

    # Every planned touch ended sent, suppressed or failed with a reason, and `sent` is
    # exactly what the provider accepted; every participant has touches planned.
    statuses: dict[str, int] = defaultdict(int)
    touches: dict[str, dict[str, Any]] = {}
    for i in range(scenario.users):
        user = user_id(i)
        if user in scenario.erased:
            continue
        listed = (await json_of(await d.c["scheduling"].get(f"/v1/users/{user}/touches")))[
            "touches"
        ]
        for promotion in scenario.ended:
            if user in scenario.members[promotion] and not any(
                t["promotion_id"] == promotion for t in listed
            ):
                problems.append(f"{user} took part in {promotion} but has no touch planned")
        for touch in listed:
            touches[touch["id"]] = touch
            statuses[touch["status"]] += 1
            if touch["status"] not in FINAL_STATUSES:
                problems.append(f"{touch['id']} of {user} is still {touch['status']}")
            if touch["status"] in ("suppressed", "failed") and touch["reason"] not in REASONS:
                problems.append(f"{touch['id']} is {touch['status']} without a known reason")
            if (touch["status"] == "sent") != (touch["id"] in touches_sent):
                problems.append(
                    f"{touch['id']} of {user} is {touch['status']} but the provider "
                    f"{'accepted' if touch['id'] in touches_sent else 'never accepted'} it"
                )
    for touch_id in touches_sent:
        user = touches_sent[touch_id][1]["user_id"]
        if touch_id not in touches and user not in scenario.erased:
            problems.append(f"the provider accepted {touch_id}, which scheduling does not list")

    plans = {}
    for promotion in scenario.ended:
        plan = plans[promotion] = await json_of(
            await d.c["scheduling"].get(f"/v1/promotions/{promotion}/plan")
        )
        for wave in plan["waves"]:
            if wave["pending"]:
                problems.append(f"{promotion} {wave['wave']}: {wave['pending']} still pending")
    return Outcome(problems, touches_sent, dict(statuses), plans, touches, repeated)
