"""A sandbox provider: PRODUCT.md's generic provider contract on loopback.

`POST /v1/messages` with `Idempotency-Key` and the JSON message answers 200 with a
`provider_message_id` after `latency_s`, or 503 for a `fail_share` of the calls.
Like a real provider it remembers accepted keys: a repeated key gets the first
answer again and is counted in `duplicates`. `GET /_stats` reports the counts.

The embedded demo starts one (`async with SandboxProvider() as sandbox: sandbox.url`);
benchmarks run it in its own process: `python -m services.sandbox --latency-ms 20`.
`LoopbackHttpServer` is the small HTTP/1.1 server under it (keep-alive,
Content-Length bodies), reused by the test provider server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

import orjson

REQUIRED_FIELDS = ("id", "channel", "to", "user_id", "promotion_id", "wave", "body")
_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    411: "Length Required",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, value: Any, headers: dict[str, str] | None = None) -> HttpResponse:
        return cls(
            status, orjson.dumps(value), {"content-type": "application/json", **(headers or {})}
        )


# None: close the connection without an answer.
Handler = Callable[[HttpRequest], Awaitable[HttpResponse | None]]


class LoopbackHttpServer:
    """HTTP/1.1 on 127.0.0.1 (an ephemeral port unless given), one handler for every request."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, backlog=4096, limit=1 << 20
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await self._write(writer, HttpResponse(411), close=True)
                    return
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                response = await self.handler(HttpRequest(method, path, headers, body))
                if response is None:
                    return
                close = headers.get("connection", "").lower() == "close"
                await self._write(writer, response, close=close)
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # stop() cancels open connections; ending quietly keeps asyncio's stream
            # callback from logging the cancellation as an error.
            return
        finally:
            self._connections.discard(task)
            writer.close()

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: HttpResponse, *, close: bool) -> None:
        head = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Status')}"]
        head += [f"{name}: {value}" for name, value in response.headers.items()]
        head.append(f"content-length: {len(response.body)}")
        if close:
            head.append("connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body)
        await writer.drain()


@dataclass(frozen=True, slots=True)
class Accepted:
    """One message the sandbox accepted: what a provider's own log would show."""

    key: str
    touch_id: str
    user_id: str
    channel: str
    promotion_id: str
    wave: str
    at: datetime | None  # the caller's clock at acceptance (None without a clock)


class SandboxProvider:
    """The generic contract with a latency, an optional failure share and idempotency.

    `clock` (e.g. the demo's manual clock) stamps every accepted message in `messages`.
    """

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        fail_share: float = 0.0,
        seed: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if not 0.0 <= fail_share <= 1.0:
            raise ValueError("fail_share must be between 0 and 1")
        self.latency_s = latency_s
        self.fail_share = fail_share
        self._rng = random.Random(seed)
        self.http = LoopbackHttpServer(self.handle, host=host, port=port)
        # Idempotency-Key -> (provider_message_id, accepted at, epoch seconds).
        self.accepted: dict[str, tuple[str, float]] = {}
        self.messages: list[Accepted] = []
        self._clock = clock
        self.calls = 0
        self.failed = 0
        self.duplicates = 0

    @property
    def url(self) -> str:
        return self.http.url

    async def __aenter__(self) -> SandboxProvider:
        await self.http.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.http.stop()

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "accepted": len(self.accepted),
            "failed": self.failed,
            "duplicates": self.duplicates,
        }

    async def handle(self, request: HttpRequest) -> HttpResponse:
        if request.method == "GET" and request.path == "/_stats":
            return HttpResponse.json(200, self.stats())
        if request.method == "GET" and request.path == "/_accepted":
            return HttpResponse.json(200, {k: at for k, (_, at) in self.accepted.items()})
        if request.method != "POST" or request.path != "/v1/messages":
            return HttpResponse.json(404, {"error": "not found"})
        self.calls += 1
        key = request.headers.get("idempotency-key", "")
        try:
            message = request.json()
        except orjson.JSONDecodeError:
            return HttpResponse.json(400, {"error": "body is not JSON"})
        missing = [f for f in REQUIRED_FIELDS if not isinstance(message, dict) or f not in message]
        if not key or missing:
            return HttpResponse.json(422, {"error": "missing", "fields": missing or ["key"]})
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if key in self.accepted:
            self.duplicates += 1
            return HttpResponse.json(200, {"provider_message_id": self.accepted[key][0]})
        if self.fail_share and self._rng.random() < self.fail_share:
            self.failed += 1
            return HttpResponse.json(503, {"error": "sandbox failure"})
        message_id = f"sbx-{len(self.accepted) + 1}"
        self.accepted[key] = (message_id, time.time())
        self.messages.append(
            Accepted(
                key,
                str(message["id"]),
                str(message["user_id"]),
                str(message["channel"]),
                str(message["promotion_id"]),
                str(message["wave"]),
                self._clock() if self._clock is not None else None,
            )
        )
        return HttpResponse.json(200, {"provider_message_id": message_id})


async def _serve(port: int, latency_s: float, fail_share: float) -> None:
    async with SandboxProvider(latency_s=latency_s, fail_share=fail_share, port=port) as sandbox:
        print(sandbox.url, flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the sandbox provider on loopback.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fail-share", type=float, default=0.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.latency_ms / 1000, args.fail_share))
    return 0


if __name__ == "__main__":
    sys.exit(main())
