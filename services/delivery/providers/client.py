"""One channel's provider: its pooled transport, rate limit, circuit breaker and retries."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal

import httpx

from services.delivery.config import ChannelConfig
from services.delivery.domain import retry_delay
from services.delivery.providers.adapters import ADAPTERS
from services.delivery.providers.base import (
    Adapter,
    Endpoint,
    OutboundMessage,
    retry_after_seconds,
)
from services.delivery.providers.fast import FastTransport, ProviderAnswer
from services.delivery.providers.resilience import (
    CircuitBreaker,
    CircuitState,
    Limiter,
    TokenBucket,
)

log = logging.getLogger(__name__)

MESSAGE_ID_MAX = 256  # deliveries.provider_message_id

# accepted: 2xx. rejected: another 4xx, final for this channel. failed: retries ran out
# (429, 5xx, timeouts, dropped connections). circuit_open: not called at all.
# stopped: the caller withdrew the touch (erased) between tries.
Verdict = Literal["accepted", "rejected", "failed", "circuit_open", "stopped"]
CallObserver = Callable[[str, str, float], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    calls: int
    provider_message_id: str | None = None
    status: int | None = None
    error: str = ""

    @property
    def accepted(self) -> bool:
        return self.verdict == "accepted"


def _no_observer(channel: str, outcome: str, seconds: float) -> None:
    return None


class ProviderClient:
    def __init__(
        self,
        channel: str,
        config: ChannelConfig,
        *,
        semaphore: AbstractAsyncContextManager[object],
        observe: CallObserver = _no_observer,
    ) -> None:
        self.channel = channel
        self.config = config
        self.adapter: Adapter = ADAPTERS[config.adapter]
        self.base_url = config.base_url or self.adapter.default_base_url
        self.circuit = CircuitBreaker(config.circuit_failures, config.circuit_reset_s)
        self.bucket = TokenBucket(config.rate_per_s, config.burst)
        self.semaphore = semaphore
        self.observe = observe
        self.endpoint: Endpoint | None = None
        self._transport: FastTransport | None = None

    @property
    def configured(self) -> bool:
        return self.base_url is not None

    def open(self) -> None:
        if self._transport is not None or self.base_url is None:
            return
        token = self.config.token.get_secret_value() if self.config.token else None
        self.endpoint = Endpoint(
            self.base_url,
            headers=self.adapter.auth_headers(self.config.account, token),
            account=self.config.account,
            sender=self.config.sender,
            timeout_s=self.config.timeout_s,
            connect_timeout_s=self.config.connect_timeout_s,
        )
        self._transport = FastTransport(self.config.max_connections)

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()

    async def deliver(
        self,
        message: OutboundMessage,
        *,
        keep_going: Callable[[], bool] = lambda: True,
        since: float | None = None,
    ) -> Outcome:
        """Call until accepted, rejected, or out of tries; always with the same Idempotency-Key.

        `since` (a `time.monotonic()` value: when the batch of this message started)
        places the first call among those waiting for a turn of the limiters, oldest
        first (see `Limiter`); a retry goes before every first call.
        """
        transport, endpoint = self._transport, self.endpoint
        if transport is None or endpoint is None:
            return Outcome("failed", 0, error="provider not configured or not open")
        try:
            # Built once: every attempt sends the very same request and Idempotency-Key. A
            # message that cannot become a request fails alone, never the batch it came in.
            request = self.adapter.request(endpoint, message)
        except (ValueError, TypeError) as exc:
            return Outcome("rejected", 0, error=f"cannot build the request: {type(exc).__name__}")
        last = Outcome("failed", 0, error="not called")
        for attempt in range(1, self.config.max_attempts + 1):
            if not keep_going():
                return Outcome("stopped", attempt - 1, error="withdrawn")
            if not self.circuit.allow():
                return Outcome("circuit_open", attempt - 1, error="circuit open")
            wait = self.bucket.reserve()
            if wait > 0:
                await asyncio.sleep(wait)
            calls = attempt
            started = time.perf_counter()
            retry_after: float | None = None
            try:
                place = since if attempt == 1 else -math.inf
                slot = (
                    self.semaphore.turn(place)
                    if isinstance(self.semaphore, Limiter)
                    else self.semaphore
                )
                async with slot:
                    response = await transport.send(request, since=place)
            except httpx.TimeoutException as exc:
                self.circuit.failure()
                last = Outcome("failed", calls, error=f"timeout: {type(exc).__name__}")
                self.observe(self.channel, "timeout", time.perf_counter() - started)
            except httpx.TransportError as exc:
                self.circuit.failure()
                last = Outcome("failed", calls, error=f"transport: {type(exc).__name__}")
                self.observe(self.channel, "transport_error", time.perf_counter() - started)
            except Exception as exc:
                # Not a network failure that httpx names: a bug or a surprise of the
                # transport. A failed try of this message alone, retried like the others.
                self.circuit.failure()
                last = Outcome("failed", calls, error=f"unexpected: {type(exc).__name__}")
                self.observe(self.channel, "error", time.perf_counter() - started)
                log.warning(
                    "provider call raised unexpectedly",
                    extra={"channel": self.channel, "error": type(exc).__name__},
                    exc_info=True,
                )
            else:
                status = response.status_code
                seconds = time.perf_counter() - started
                if 200 <= status < 300:
                    self.circuit.success()
                    self.observe(self.channel, "accepted", seconds)
                    return Outcome("accepted", calls, self._message_id(response), status=status)
                if status == 429:
                    # Throttled: the provider is up, so this says nothing about its health.
                    self.circuit.release()
                    self.observe(self.channel, "throttled", seconds)
                elif status >= 500:
                    self.circuit.failure()
                    self.observe(self.channel, "server_error", seconds)
                else:
                    self.circuit.success()
                    self.observe(self.channel, "rejected", seconds)
                    return Outcome("rejected", calls, status=status, error=f"HTTP {status}")
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                last = Outcome("failed", calls, status=status, error=f"HTTP {status}")
                if retry_after is not None and retry_after > self.config.retry_after_max_s:
                    # Asked to wait longer than a batch may hold its partition: fall back now.
                    return Outcome(
                        "failed", calls, status=status, error=f"HTTP {status}, Retry-After too long"
                    )
            if attempt < self.config.max_attempts:
                await asyncio.sleep(
                    retry_delay(
                        attempt,
                        retry_after,
                        base_s=self.config.backoff_base_s,
                        max_s=self.config.backoff_max_s,
                        retry_after_max_s=self.config.retry_after_max_s,
                    )
                )
        return last

    def _message_id(self, response: ProviderAnswer) -> str | None:
        """The provider's id of an accepted message; None when its answer does not say.

        Never raises, and fits its column: the message is accepted whatever the body, and
        an answer that could not be stored would have it sent again.
        """
        try:
            found = self.adapter.message_id(response)
            return found[:MESSAGE_ID_MAX] if found is not None else None
        except Exception as exc:
            log.warning(
                "accepted answer without a readable message id",
                extra={"channel": self.channel, "error": type(exc).__name__},
            )
            return None

    def state(self) -> CircuitState:
        return self.circuit.state
