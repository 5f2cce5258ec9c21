"""One clock per service: the wall clock, or a manual one that tests and demos move."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Protocol

from fastapi import APIRouter
from pydantic import AwareDatetime, BaseModel

from shared.auth import ADMIN, requires
from shared.problems import Problem
from shared.settings import ClockKind, InsecureSettings, Profile, Settings

log = logging.getLogger(__name__)


def _aware(when: datetime, name: str) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must carry a UTC offset, got the naive {when.isoformat()}")
    return when.astimezone(UTC)


class Clock(Protocol):
    @property
    def kind(self) -> ClockKind: ...

    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime, *, max_wait_s: float) -> None:
        """Return at `when`, after `max_wait_s` at the latest, or when a manual clock moves."""


class WallClock:
    kind = ClockKind.WALL

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep_until(self, when: datetime, *, max_wait_s: float) -> None:
        delay = (_aware(when, "when") - self.now()).total_seconds()
        if delay > 0 and max_wait_s > 0:
            await asyncio.sleep(min(delay, max_wait_s))


class ManualClock:
    kind = ClockKind.MANUAL

    def __init__(self, start: datetime) -> None:
        self._now = _aware(start, "start")
        self._moved = asyncio.Event()

    def now(self) -> datetime:
        return self._now

    def set(self, now: datetime) -> None:
        now = _aware(now, "now")
        if now < self._now:
            raise ValueError(
                f"the clock cannot go backwards: {now.isoformat()} is before "
                f"the current time {self._now.isoformat()}"
            )
        self._now = now
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    def advance(self, delta: timedelta) -> None:
        self.set(self._now + delta)

    async def sleep_until(self, when: datetime, *, max_wait_s: float) -> None:
        if self._now >= _aware(when, "when") or max_wait_s <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_wait_s):
                await self._moved.wait()


def make_clock(settings: Settings, *, start: datetime | None = None) -> Clock:
    if settings.clock is ClockKind.WALL:
        return WallClock()
    if settings.profile is Profile.PRODUCTION:
        raise InsecureSettings("AFTERGLOW_CLOCK=manual is refused in production")
    return ManualClock(start or datetime.now(UTC))


class ClockSet(BaseModel):
    now: AwareDatetime


class ClockState(BaseModel):
    now: datetime
    kind: ClockKind


def clock_router(clock: Clock, *, profile: Profile) -> APIRouter:
    router = APIRouter(prefix="/v1/admin/clock", tags=["admin"], dependencies=[requires(ADMIN)])

    @router.get("", response_model=ClockState)
    async def read_clock() -> ClockState:
        """The service's current time and whether it is the wall or a manual clock."""
        return ClockState(now=clock.now(), kind=clock.kind)

    @router.put("", response_model=ClockState)
    async def set_clock(body: ClockSet) -> ClockState:
        """Move the manual clock forward (development and tests only)."""
        if profile is Profile.PRODUCTION:
            raise Problem(403, "the clock cannot be set in the production profile")
        if not isinstance(clock, ManualClock):
            raise Problem(409, "the clock is not manual (AFTERGLOW_CLOCK=wall)")
        before = clock.now()
        try:
            clock.set(body.now)
        except ValueError as exc:
            error = {"field": "now", "location": "body", "message": str(exc)}
            raise Problem(422, f"body.now: {exc}", field="now", errors=[error]) from exc
        log.info("clock moved", extra={"from": before.isoformat(), "to": clock.now().isoformat()})
        return ClockState(now=clock.now(), kind=clock.kind)

    return router
