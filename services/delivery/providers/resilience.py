"""A circuit breaker per provider, a token bucket per channel (time is injected), and a
limiter for calls in flight (oldest work first)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from enum import StrEnum

Now = Callable[[], float]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failures` consecutive failures; after `reset_s` lets one probe through.

    A successful probe closes it, a failed one opens it again for another `reset_s`.
    """

    def __init__(self, failures: int, reset_s: float, now: Now = time.monotonic) -> None:
        self.threshold = failures
        self.reset_s = reset_s
        self.now = now
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.opened_total = 0

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self.now() - self._opened_at >= self.reset_s:
            return CircuitState.HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open: the one probe)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN or self._probing:
            return False
        self._state = CircuitState.HALF_OPEN
        self._probing = True
        return True

    def success(self) -> None:
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._probing = False

    def failure(self) -> None:
        self._probing = False
        if self._state is CircuitState.HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._state is CircuitState.CLOSED and self._failures >= self.threshold:
            self._open()

    def release(self) -> None:
        """A call that ended without telling anything about the provider's health (429)."""
        self._probing = False

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = self.now()
        self._failures = 0
        self.opened_total += 1


class TokenBucket:
    """`rate` calls per second on average, `burst` at once; callers queue in order.

    Each call takes a token at once, possibly into debt, and sleeps until its token
    would have been there: no busy waiting, and waiters keep their arrival order.
    """

    def __init__(self, rate: float, burst: int, now: Now = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.now = now
        self._tokens = float(burst)
        self._updated = now()

    def reserve(self) -> float:
        """Take a token; return how long to wait before using it."""
        now = self.now()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


class Limiter:
    """At most `limit` holders at once; waiters get their turn oldest work first.

    A waiter's place is its `since`: a `time.monotonic()` value, by default the moment it
    asked, so that plain `async with limiter:` is first come, first served. Delivery
    passes the moment its batch started instead (`turn(since)`), so the calls of the
    oldest batch go first: with every batch's calls served in arrival order, the batches
    of all partitions advanced together, ended their calls together and then all waited
    at once - for their last retries' backoff, for the round that records the answers,
    for the next batch - with the connections idle. Oldest first, one batch's calls end
    while the next batches' still fill the connections, and its wait overlaps their
    calls. Equal places keep arrival order; a waiter that gives up takes no turn.

    What `asyncio.Semaphore` does (but in arrival order only), at a cost per acquire
    that does not grow with the queue: Python 3.11's `Semaphore.locked()` walks every
    waiter on each acquire, which with thousands of calls queued behind the connection
    limit became a cost per call that grew with the queue.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._free = limit
        # (since, arrival, future): a heap; futures of waiters that gave up stay in it
        # (cancelled) until `release` meets them.
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def in_use(self) -> int:
        return self.limit - self._free

    async def acquire(self, since: float | None = None) -> None:
        """Wait for a turn; `since` places the waiter (default: now; -inf: before all)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        place = time.monotonic() if since is None else since
        heapq.heappush(self._waiters, (place, next(self._arrivals), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a turn just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        """Hand the turn to the first waiter in place order, or give it back."""
        waiters = self._waiters
        while waiters:
            waiter = heapq.heappop(waiters)[2]
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def turn(self, since: float | None) -> _Turn:
        """`async with limiter.turn(since):` a turn placed at `since` (see the class)."""
        return _Turn(self, since)

    def ahead(self) -> _Turn:
        """`async with limiter.ahead():` a turn before everyone waiting.

        For a provider call's retry: its touch has waited once already, and the batch it
        belongs to cannot end before it. Behind the whole queue (thousands of first calls
        of the other batches), every retry cost a full turn of the queue, and the batches
        with a failure sat nearly idle for it: that was most of the rate lost with 5xx.
        """
        return _Turn(self, -math.inf)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Turn:
    __slots__ = ("limiter", "since")

    def __init__(self, limiter: Limiter, since: float | None) -> None:
        self.limiter = limiter
        self.since = since

    async def __aenter__(self) -> None:
        await self.limiter.acquire(self.since)

    async def __aexit__(self, *exc: object) -> None:
        self.limiter.release()
