"""The scheduling service on SQLite and PostgreSQL, on a manual clock: policies, ending and
cancelling promotions, 35 days of waves in users' timezones, caps across promotions,
fatigue, consent and erasure."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.scheduling import domain, handlers
from services.scheduling.policy import default_policy
from shared.events import (
    AudienceMemberResolved,
    EngagementRecorded,
    PromotionCancelled,
    PromotionEnded,
    SegmentSnapshot,
    TouchDue,
    TouchPlanned,
    TouchSuppressed,
    UserErased,
    UserUpdated,
)
from tests.integration.scheduling_harness import Harness, days, scheduling

END = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)
CONSENT = {"sms": True, "email": True, "push": True, "in_app": True, "social": True}


@pytest.fixture
async def service(database_url: str) -> AsyncIterator[Harness]:
    async with scheduling(database_url, END) as harness:
        yield harness


def member(user: str, promotion: str = "p-1", tz: str = "UTC", **kwargs: Any) -> Any:
    return AudienceMemberResolved(
        user_id=user,
        promotion_id=promotion,
        ended_at=kwargs.pop("ended_at", END),
        policy=kwargs.pop("policy", "default"),
        timezone=tz,
        consent=kwargs.pop("consent", CONSENT),
        segment=SegmentSnapshot(channel_order=["push", "sms"], **kwargs),
    )


async def put_policy(service: Harness, name: str, **changes: Any) -> int:
    body = default_policy().model_dump(mode="json")
    body["experiment"]["holdout_share"] = 0
    body["experiment"]["wave_holdout_share"] = 0
    for key, value in changes.items():
        body[key] = value
    response = await service.client.put(f"/v1/policies/{name}", json=body)
    assert response.status_code == 200, response.text
    version: int = response.json()["version"]
    return version


async def end(service: Harness, promotion: str, policy: str, ended_at: datetime = END) -> None:
    response = await service.client.post(
        f"/v1/promotions/{promotion}/end",
        json={"ended_at": ended_at.isoformat(), "name": "Spring sale", "policy": policy},
    )
    assert response.status_code == 202, response.text


async def plan_users(service: Harness, *members: Any) -> None:
    before = await service.planned_members()
    await service.publish(*members)

    async def planned() -> bool:
        return await service.planned_members() >= before + len(members)

    await service.wait_for(planned)


async def test_policies_are_versioned_and_nonsense_is_refused(service: Harness) -> None:
    got = await service.client.get("/v1/policies/default")
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["version"] == 1
    assert body["policy"]["caps"] == {"per_7d": 2, "per_30d": 5}
    assert [w["name"] for w in body["policy"]["waves"]] == [
        "launch",
        "day3",
        "day7",
        "day14",
        "day30",
    ]
    policy = body["policy"]
    zero = {**policy, "caps": {"per_7d": 0, "per_30d": 5}}
    refused = await service.client.put("/v1/policies/default", json=zero)
    assert refused.status_code == 422
    assert refused.json()["field"] == "caps.per_7d"
    late = {**policy, "waves": [dict(w) for w in policy["waves"]]}
    late["waves"][1]["deadline_hours"] = 24
    refused = await service.client.put("/v1/policies/default", json=late)
    assert refused.json()["field"] == "waves[1].deadline_hours"
    pigeon = {**policy, "waves": [dict(w) for w in policy["waves"]]}
    pigeon["waves"][0]["channels"] = ["pigeon"]
    refused = await service.client.put("/v1/policies/default", json=pigeon)
    assert refused.status_code == 422
    assert refused.json()["field"] == "waves[0].channels[0]"

    assert await put_policy(service, "default") == 2
    assert await put_policy(service, "default") == 2
    assert (await service.client.get("/v1/policies/default")).json()["version"] == 2
    missing = await service.client.get("/v1/policies/nope")
    assert missing.status_code == 404
    unknown = await service.client.post(
        "/v1/promotions/p-9/end", json={"ended_at": END.isoformat(), "policy": "nope"}
    )
    assert unknown.status_code == 422 and unknown.json()["field"] == "policy"


async def test_ending_twice_plans_once(service: Harness) -> None:
    await put_policy(service, "plain")
    await end(service, "p-1", "plain")
    again = await service.client.post(
        "/v1/promotions/p-1/end", json={"ended_at": END.isoformat(), "policy": "plain"}
    )
    assert again.json()["already_ended"] is True
    await plan_users(service, member("u-1"), member("u-2"))
    await service.publish(member("u-1"))  # a redelivered audience event
    await service.settle()
    assert len(service.emitted(PromotionEnded)) == 1
    planned = service.emitted(TouchPlanned)
    assert len(planned) == 10 and len({e.data.touch_id for e in planned}) == 10
    plan = (await service.client.get("/v1/promotions/p-1/plan")).json()
    assert plan["policy"] == "plain" and plan["policy_version"] == 1
    assert [w["planned"] for w in plan["waves"]] == [2, 2, 2, 2, 2]
    assert plan["waves"][0]["dispatched"] == 2  # launch went out at once


ZONE_USERS = {
    "u-kolkata": "Asia/Kolkata",
    "u-newyork": "America/New_York",
    "u-adelaide": "Australia/Adelaide",
    "u-kathmandu": "Asia/Kathmandu",
    "u-engaged": "UTC",
}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


async def test_35_days_of_waves_in_each_users_timezone(service: Harness) -> None:
    await put_policy(service, "timing", caps={"per_7d": 3, "per_30d": 5})
    await end(service, "p-1", "timing")
    await plan_users(service, *(member(u, tz=tz) for u, tz in ZONE_USERS.items()))

    answered: set[str] = set()

    async def engage() -> None:
        for event in service.emitted(TouchDue):
            due = event.data
            if due.user_id == "u-engaged" and due.touch_id not in answered:
                answered.add(due.touch_id)
                await service.publish(
                    EngagementRecorded(
                        user_id=due.user_id,
                        touch_id=due.touch_id,
                        promotion_id=due.promotion_id,
                        wave=due.wave,
                        channel=due.channel,
                        kind="opened",
                        at=service.clock.now(),
                    )
                )

    await service.run_until(END + days(35), on_step=engage)
    sent = {
        (e.data.user_id, e.data.wave): (e.data.due_at, e.time) for e in service.emitted(TouchDue)
    }
    for at, emitted in sent.values():
        assert emitted == at  # dispatched at its due moment
    expected = {
        # Kolkata +05:30: 10:00 local is 04:30 UTC.
        ("u-kolkata", "launch"): utc(2026, 3, 6, 12),
        ("u-kolkata", "day3"): utc(2026, 3, 9, 4, 30),
        ("u-kolkata", "day7"): utc(2026, 3, 13, 4, 30),
        ("u-kolkata", "day30"): utc(2026, 4, 5, 4, 30),
        # New York: 07:00 EST at the end is quiet, the launch waits for 09:00 (its deadline);
        # EDT from 8 March: 10:00 local is 14:00 UTC.
        ("u-newyork", "launch"): utc(2026, 3, 6, 14),
        ("u-newyork", "day3"): utc(2026, 3, 9, 14),
        ("u-newyork", "day7"): utc(2026, 3, 13, 14),
        ("u-newyork", "day30"): utc(2026, 4, 5, 14),
        # Adelaide: ACDT +10:30 until 5 April, then ACST +09:30.
        ("u-adelaide", "day3"): utc(2026, 3, 8, 23, 30),
        ("u-adelaide", "day7"): utc(2026, 3, 12, 23, 30),
        ("u-adelaide", "day14"): utc(2026, 3, 19, 23, 30),
        ("u-adelaide", "day30"): utc(2026, 4, 5, 0, 30),
        ("u-kathmandu", "launch"): utc(2026, 3, 6, 12),
        ("u-kathmandu", "day3"): utc(2026, 3, 9, 4, 15),
        ("u-kathmandu", "day7"): utc(2026, 3, 13, 4, 15),
        ("u-kathmandu", "day30"): utc(2026, 4, 5, 4, 15),
        ("u-engaged", "launch"): utc(2026, 3, 6, 12),
        ("u-engaged", "day3"): utc(2026, 3, 9, 10),
        ("u-engaged", "day7"): utc(2026, 3, 13, 10),
        ("u-engaged", "day14"): utc(2026, 3, 20, 10),
        ("u-engaged", "day30"): utc(2026, 4, 5, 10),
    }
    assert {k: v[0] for k, v in sent.items()} == expected
    suppressed = {
        (e.data.user_id, e.data.wave): e.data.reason for e in service.emitted(TouchSuppressed)
    }
    assert suppressed == {
        # 22:30 local at the end: the morning is past the launch's 2-hour deadline.
        ("u-adelaide", "launch"): "quiet_hours",
        # Three touches ignored in a row: low frequency, only essential waves.
        ("u-kolkata", "day14"): "fatigue",
        ("u-newyork", "day14"): "fatigue",
        ("u-kathmandu", "day14"): "fatigue",
    }
    fatigue = (await service.client.get("/v1/users/u-kolkata/fatigue")).json()
    assert fatigue["state"] == "low_frequency"
    assert [h["signal"] for h in fatigue["history"]] == ["ignored_streak"]
    touches = (await service.client.get("/v1/users/u-newyork/touches")).json()["touches"]
    # Handed to delivery, not yet confirmed: `planned` to callers, with dispatched_at set.
    assert [(t["wave"], t["status"], t["dispatched_at"] is not None) for t in touches] == [
        ("launch", "planned", True),
        ("day3", "planned", True),
        ("day7", "planned", True),
        ("day14", "suppressed", False),
        ("day30", "planned", True),
    ]
    assert touches[0]["deferrals"] == 1


def over_cap(sends: list[datetime], window: timedelta, cap: int) -> bool:
    return any(sum(1 for x in sends if s - window < x <= s) > cap for s in sends)


async def test_caps_hold_across_two_overlapping_promotions(service: Harness) -> None:
    await put_policy(service, "plain")
    await end(service, "p-1", "plain")
    await end(service, "p-2", "plain", END + days(2))
    users = [f"u-{i}" for i in range(6)]
    await plan_users(
        service,
        *(member(u) for u in users),
        *(member(u, "p-2", ended_at=END + days(2), policy="plain") for u in users),
    )
    await service.run_until(END + days(45))
    sends: dict[str, list[datetime]] = defaultdict(list)
    for event in service.emitted(TouchDue):
        sends[event.data.user_id].append(event.time)
    assert len({e.data.touch_id for e in service.emitted(TouchDue)}) == len(
        service.emitted(TouchDue)
    )
    for user, times in sends.items():
        assert not over_cap(times, timedelta(days=7), 2), (user, sorted(times))
        assert not over_cap(times, timedelta(days=30), 5), (user, sorted(times))
        for at in times:
            assert not domain.is_quiet(at, domain.zone("UTC"), default_policy().quiet_hours)
        assert len(times) >= 5  # the 30-day cap is used to the full
    plan = (await service.client.get("/v1/promotions/p-2/plan")).json()
    deferred = sum(w["deferred"] for w in plan["waves"])
    capped = sum(
        n for w in plan["waves"] for r, n in w["suppressed"].items() if r.startswith("cap_")
    )
    assert deferred > 0 and capped > 0
    assert all(w["pending"] == 0 for w in plan["waves"])


async def test_an_audience_of_a_promotion_ended_elsewhere_is_planned(service: Harness) -> None:
    # No end here: the first batch records each promotion, with the policy its members name
    # (the default one when it is not known here), then plans them.
    await put_policy(service, "plain")
    await plan_users(
        service,
        member("u-1", "p-else", policy="plain"),
        member("u-2", "p-else", policy="plain"),
        member("u-1", "p-odd", policy="no-such-policy"),
    )
    await service.settle()
    plans = {
        p: (await service.client.get(f"/v1/promotions/{p}/plan")).json()
        for p in ("p-else", "p-odd")
    }
    assert (plans["p-else"]["policy"], plans["p-else"]["status"]) == ("plain", "ended")
    assert [w["planned"] for w in plans["p-else"]["waves"]] == [2, 2, 2, 2, 2]
    assert plans["p-odd"]["policy"] == "default"
    assert sum(w["planned"] for w in plans["p-odd"]["waves"]) == len(default_policy().waves)


async def test_an_erased_user_is_not_planned_by_a_later_audience(service: Harness) -> None:
    # Planning seeds the users it has not seen and skips those erased: in one batch, a user
    # erased here, one known and one new.
    await put_policy(service, "plain")
    await end(service, "p-1", "plain")
    await plan_users(service, member("u-gone"), member("u-known"))
    await service.settle()
    await service.publish(UserErased(user_id="u-gone", erased_at=service.clock.now()))

    async def erased() -> bool:
        return any(e.data.reason == "erased" for e in service.emitted(TouchSuppressed))

    await service.wait_for(erased)
    await end(service, "p-2", "plain")
    await plan_users(
        service, member("u-gone", "p-2"), member("u-known", "p-2"), member("u-new", "p-2")
    )
    await service.settle()
    plan = (await service.client.get("/v1/promotions/p-2/plan")).json()
    assert [w["planned"] for w in plan["waves"]] == [2, 2, 2, 2, 2]
    planned = {
        e.data.user_id for e in service.emitted(TouchPlanned) if e.data.promotion_id == "p-2"
    }
    assert planned == {"u-known", "u-new"}


async def test_cancel_stops_what_is_pending(service: Harness) -> None:
    await put_policy(service, "plain")
    await end(service, "p-1", "plain")
    await plan_users(service, member("u-1"), member("u-2"), member("u-3"))
    await service.settle()
    assert len(service.emitted(TouchDue)) == 3
    response = await service.client.post("/v1/promotions/p-1/cancel")
    assert response.status_code == 202 and response.json()["cancelled_touches"] == 12
    again = await service.client.post("/v1/promotions/p-1/cancel")
    assert again.json()["cancelled_touches"] == 0
    await service.run_until(END + days(35))
    assert len(service.emitted(TouchDue)) == 3
    plan = (await service.client.get("/v1/promotions/p-1/plan")).json()
    assert plan["status"] == "cancelled"
    assert [w["cancelled"] for w in plan["waves"]] == [0, 3, 3, 3, 3]
    late = await service.client.post("/v1/promotions/p-404/cancel")
    assert late.status_code == 404


@pytest.fixture
def two_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancellation walks the participants two a transaction."""
    monkeypatch.setattr(handlers, "CANCEL_CHUNK", 2)


@pytest.mark.usefixtures("two_a_chunk")
async def test_two_cancellations_at_once_make_one_owner_that_counts_every_touch(
    service: Harness,
) -> None:
    # The API's cancel and the promotion.cancelled handler walk the participants at the same
    # time: one of them cancels the promotion (one event) and reports all it stopped.
    await put_policy(service, "plain")
    await end(service, "p-1", "plain")
    await plan_users(service, *(member(f"u-{i}") for i in range(7)))
    await service.settle()
    counts = await asyncio.gather(
        handlers.cancel_promotion(service.ctx, "p-1"),
        handlers.cancel_promotion(service.ctx, "p-1"),
    )
    assert max(c or 0 for c in counts) == 28
    await service.settle()
    assert len(service.emitted(PromotionCancelled)) == 1
    told = [e.data for e in service.emitted(TouchSuppressed) if e.data.reason == "cancelled"]
    assert len(told) == len({e.touch_id for e in told}) == 28


@pytest.mark.usefixtures("two_a_chunk")
async def test_cancel_walks_the_participants_a_chunk_at_a_time(service: Harness) -> None:
    # Two participants a transaction: the walk over plan_members must resume after the last
    # user of each chunk, and leave the same users' touches of another promotion alone.
    await put_policy(service, "plain")
    await end(service, "p-1", "plain")
    await end(service, "p-2", "plain")
    users = [f"u-{i}" for i in range(5)]
    await plan_users(service, *(member(u) for u in users), *(member(u, "p-2") for u in users))
    await service.settle()
    assert len(service.emitted(TouchDue)) == 10
    response = await service.client.post("/v1/promotions/p-1/cancel")
    assert response.status_code == 202 and response.json()["cancelled_touches"] == 20

    def cancelled_events() -> list[Any]:
        return [e.data for e in service.emitted(TouchSuppressed) if e.data.reason == "cancelled"]

    async def all_told() -> bool:
        return len(cancelled_events()) >= 20

    await service.wait_for(all_told)
    cancelled = cancelled_events()
    assert sorted((e.user_id, e.wave) for e in cancelled) == sorted(
        (u, w) for u in users for w in ("day3", "day7", "day14", "day30")
    )
    assert {e.promotion_id for e in cancelled} == {"p-1"}
    plans = {
        p: (await service.client.get(f"/v1/promotions/{p}/plan")).json() for p in ("p-1", "p-2")
    }
    assert [w["cancelled"] for w in plans["p-1"]["waves"]] == [0, 5, 5, 5, 5]
    assert [w["pending"] for w in plans["p-2"]["waves"]] == [0, 5, 5, 5, 5]
    assert [w["planned"] for w in plans["p-2"]["waves"]] == [5, 5, 5, 5, 5]


async def test_consent_erasure_and_complaints_stop_touches(service: Harness) -> None:
    await put_policy(service, "plain")
    await end(service, "p-1", "plain")
    await plan_users(service, member("u-ok"), member("u-off"), member("u-gone"), member("u-angry"))
    await service.settle()
    await service.publish(
        UserUpdated(
            user_id="u-off", timezone="UTC", consent={"sms": False, "push": False, "email": True}
        ),
        UserErased(user_id="u-gone", erased_at=service.clock.now()),
        EngagementRecorded(
            user_id="u-angry",
            touch_id=domain.touch_id("p-1", "u-angry", "launch"),
            promotion_id="p-1",
            wave="launch",
            channel="push",
            kind="complained",
            at=service.clock.now(),
        ),
    )

    async def erased() -> bool:
        return any(
            e.data.user_id == "u-gone" and e.data.reason == "erased"
            for e in service.emitted(TouchSuppressed)
        )

    await service.wait_for(erased)

    async def complained() -> bool:
        got = (await service.client.get("/v1/users/u-angry/fatigue")).json()
        return bool(got["state"] == "suppressed")

    await service.wait_for(complained)
    await service.run_until(END + days(4))
    reasons = {
        (e.data.user_id, e.data.wave): e.data.reason for e in service.emitted(TouchSuppressed)
    }
    assert reasons[("u-gone", "day3")] == "erased"
    assert reasons[("u-angry", "day3")] == "complained"
    # Email is still consented: the segment's push and sms are skipped, email remains.
    day3 = {e.data.user_id: e.data for e in service.emitted(TouchDue) if e.data.wave == "day3"}
    assert day3["u-off"].channels[0] == "email"
    assert day3["u-ok"].channels[:2] == ["push", "sms"]
    assert day3["u-ok"].content["push"].body.startswith("[day3/")
    assert day3["u-ok"].variables["coupon_code"].startswith("AG-")
