"""Several scheduling replicas on one PostgreSQL database, racing for the same due touches:
no touch is emitted twice and no user goes over a cap."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.scheduling import dispatcher, store
from services.scheduling.config import SchedulingSettings
from services.scheduling.policy import default_policy
from services.scheduling.state import user_lock_key
from shared.events import AudienceMemberResolved, TouchDue, TouchSuppressed
from shared.service import ServiceContext
from tests.integration.scheduling_harness import days, scheduling

END = datetime(2026, 3, 6, 12, 0, tzinfo=UTC)
CONSENT = {"sms": True, "email": True, "push": True}


def over_cap(sends: list[datetime], window: timedelta, cap: int) -> bool:
    return any(sum(1 for x in sends if s - window < x <= s) > cap for s in sends)


async def test_racing_dispatchers_never_double_send_nor_exceed_caps(
    fresh_postgres_url: str,
) -> None:
    config = SchedulingSettings(dispatch_batch=7, dispatchers=3, dispatch_idle_s=0.05)
    async with scheduling(fresh_postgres_url, END, replicas=2, config=config) as service:
        assert service.apps[0].state.ctx.db is not service.apps[1].state.ctx.db
        body = default_policy().model_dump(mode="json")
        body["experiment"]["holdout_share"] = 0
        body["experiment"]["wave_holdout_share"] = 0
        assert (await service.client.put("/v1/policies/race", json=body)).status_code == 200
        promotions = [("p-1", END), ("p-2", END), ("p-3", END + days(1))]
        for promotion, ended in promotions:
            response = await service.client.post(
                f"/v1/promotions/{promotion}/end",
                json={"ended_at": ended.isoformat(), "policy": "race"},
            )
            assert response.status_code == 202
        users = [f"u-{i}" for i in range(60)]
        await service.publish(
            *(
                AudienceMemberResolved(
                    user_id=user,
                    promotion_id=promotion,
                    ended_at=ended,
                    policy="race",
                    consent=CONSENT,
                )
                for promotion, ended in promotions
                for user in users
            )
        )

        async def planned() -> bool:
            return await service.planned_members() == len(users) * len(promotions)

        await service.wait_for(planned)
        await service.run_until(END + days(45))

        due = service.emitted(TouchDue)
        counts = Counter(e.data.touch_id for e in due)
        assert counts and max(counts.values()) == 1
        decided = {e.data.touch_id for e in due} | {
            e.data.touch_id for e in service.emitted(TouchSuppressed)
        }
        assert len(decided) == len(users) * len(promotions) * 5
        sends: dict[str, list[datetime]] = defaultdict(list)
        for event in due:
            sends[event.data.user_id].append(event.time)
        for user, times in sends.items():
            assert not over_cap(times, timedelta(days=7), 2), (user, sorted(times))
            assert not over_cap(times, timedelta(days=30), 5), (user, sorted(times))


async def test_a_dispatch_holds_its_touches_and_users_until_it_commits(
    fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keeps racing replicas apart: while one dispatch decides, the touches it claimed
    and its users' locks stay held by its transaction, not only during the claim statement."""
    config = SchedulingSettings(dispatchers=0)
    async with scheduling(fresh_postgres_url, END, config=config) as service:
        users = [f"u-{i}" for i in range(20)]
        await service.publish(
            *(
                AudienceMemberResolved(
                    user_id=user, promotion_id="p-1", ended_at=END, consent=CONSENT
                )
                for user in users
            )
        )

        async def planned() -> bool:
            return await service.planned_members() == len(users)

        await service.wait_for(planned)
        service.clock.set(END + days(1))
        t = store.touches
        due = select(t.c.user_id).where(t.c.status == "planned", t.c.due_at <= service.clock.now())
        async with service.ctx.db.connect() as conn:
            due_users = set((await conn.execute(due)).scalars())
        assert due_users
        seen: dict[str, Any] = {}
        decide = dispatcher._promotions

        async def probing(ctx: ServiceContext, conn: AsyncConnection, ids: set[str]) -> Any:
            async with ctx.db.connect() as other:
                free = await other.execute(due.with_for_update(skip_locked=True))
                seen["free"] = list(free.scalars())
                seen["users"] = [
                    await other.scalar(
                        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": user_lock_key(u)}
                    )
                    for u in sorted(due_users)
                ]
            return await decide(ctx, conn, ids)

        monkeypatch.setattr(dispatcher, "_promotions", probing)
        assert await dispatcher.dispatch_once(service.ctx, batch=100) == len(due_users)
        assert seen == {"free": [], "users": [False] * len(due_users)}
