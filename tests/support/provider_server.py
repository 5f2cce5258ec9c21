"""A scriptable provider on 127.0.0.1 for tests: a real HTTP server, no patched client.

    async with ProviderServer() as provider:          # ephemeral port: provider.url
        provider.script(Answer.throttle(retry_after=0.1), Answer.error(500))  # next calls
        provider.default = Answer.ok()                # every call after the script
        ...
        assert provider.duplicates() == 0             # keys accepted (2xx) more than once
        assert provider.keys_seen["touch-1"] == 2     # calls per Idempotency-Key

Answers: `ok()` (the success answer of the server's `shape`: generic, twilio,
sendgrid or fcm), `status(code)`, `error(500)`, `throttle(retry_after)` (429),
`hang(seconds)` (no answer until the client gives up), `drop()` (closes the
connection without an answer). `rule` may choose an answer per call instead
(return None to fall through to the script and the default). Every call is in
`calls` with its headers (lower-case names), raw body and parsed JSON or form.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from services.sandbox import HttpRequest, HttpResponse, LoopbackHttpServer

Shape = Literal["generic", "twilio", "sendgrid", "fcm"]


@dataclass(frozen=True)
class Answer:
    kind: Literal["ok", "status", "hang", "drop"]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def ok(cls) -> Answer:
        return cls("ok")

    @classmethod
    def status_code(cls, status: int, headers: dict[str, str] | None = None) -> Answer:
        return cls("status", status, dict(headers or {}))

    @classmethod
    def error(cls, status: int = 500) -> Answer:
        return cls.status_code(status)

    @classmethod
    def throttle(cls, retry_after: float | str = 1) -> Answer:
        return cls.status_code(429, {"retry-after": str(retry_after)})

    @classmethod
    def hang(cls, seconds: float = 30.0) -> Answer:
        return cls("hang", seconds=seconds)

    @classmethod
    def drop(cls) -> Answer:
        return cls("drop")


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    answered: str  # the status code, "hang" or "drop"

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")

    def json(self) -> Any:
        return HttpRequest(self.method, self.path, self.headers, self.body).json()

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode()))


class ProviderServer:
    def __init__(self, *, shape: Shape = "generic", latency_s: float = 0.0) -> None:
        self.shape = shape
        self.latency_s = latency_s
        self.default = Answer.ok()
        self.rule: Callable[[HttpRequest], Answer | None] | None = None
        self.calls: list[Call] = []
        self.keys_seen: Counter[str] = Counter()
        self.accepted: Counter[str] = Counter()
        self._script: list[Answer] = []
        self._http = LoopbackHttpServer(self._handle)

    @property
    def url(self) -> str:
        return self._http.url

    def script(self, *answers: Answer) -> None:
        """Answer the next calls with these, in order, then with `default` again."""
        self._script.extend(answers)

    def duplicates(self) -> int:
        """Accepted (2xx) answers beyond the first for the same Idempotency-Key."""
        return sum(n - 1 for n in self.accepted.values() if n > 1)

    def calls_to(self, key: str) -> list[Call]:
        return [c for c in self.calls if c.key == key]

    async def wait_for_calls(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.calls)} calls, expected {count}")
            await asyncio.sleep(0.01)

    async def __aenter__(self) -> ProviderServer:
        await self._http.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._http.stop()

    def _next_answer(self, request: HttpRequest) -> Answer:
        if self.rule is not None:
            chosen = self.rule(request)
            if chosen is not None:
                return chosen
        if self._script:
            return self._script.pop(0)
        return self.default

    async def _handle(self, request: HttpRequest) -> HttpResponse | None:
        answer = self._next_answer(request)
        key = request.headers.get("idempotency-key")
        if key:
            self.keys_seen[key] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        answered = str(answer.status) if answer.kind in ("ok", "status") else answer.kind
        if answer.kind == "ok":
            response = self._success(len(self.calls) + 1)
            answered = str(response.status)
        self.calls.append(
            Call(
                request.method,
                request.path,
                request.headers,
                request.body,
                time.monotonic(),
                answered,
            )
        )
        if answer.kind == "hang":
            await asyncio.sleep(answer.seconds)
            return None
        if answer.kind == "drop":
            return None
        if answer.kind == "status":
            return HttpResponse.json(
                answer.status, {"error": f"scripted {answer.status}"}, answer.headers
            )
        if key:
            self.accepted[key] += 1
        return response

    def _success(self, n: int) -> HttpResponse:
        if self.shape == "twilio":
            return HttpResponse.json(201, {"sid": f"SM{n:032d}", "status": "queued"})
        if self.shape == "sendgrid":
            return HttpResponse(202, b"", {"x-message-id": f"sg-{n}"})
        if self.shape == "fcm":
            return HttpResponse.json(200, {"name": f"projects/test/messages/{n}"})
        return HttpResponse.json(200, {"provider_message_id": f"pm-{n}"})
