"""A background step run now, then every interval of the service clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from shared.service import ServiceContext

log = logging.getLogger(__name__)


async def every(
    ctx: ServiceContext, interval_s: float, step: Callable[[], Awaitable[object]], what: str
) -> None:
    """Run `step` now, then every `interval_s` of the service clock (at once when a manual
    clock moves); a failed step is logged (`what` failed) and run again at the next turn."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("%s failed; retrying", what, exc_info=True)
        now = ctx.clock.now()
        await ctx.clock.sleep_until(now + timedelta(seconds=interval_s), max_wait_s=interval_s)
