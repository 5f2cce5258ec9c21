"""A lean HTTP/1.1 keep-alive transport for the providers, usable as an httpx transport.

Why it exists - measured on the 2-core development machine (other work running),
5,000 POSTs with 256 in flight to the sandbox provider answering in 20 ms in its own
process (the numbers are req/s, and this process's CPU per request):

    httpx.AsyncClient, default transport (httpcore 1.0.9), 256 connections
                                                           111-188 req/s  4.6-4.8 ms
    same, split over 16 clients x 16 connections              470 req/s   1.9 ms
    same, split over 4 clients x 64 connections               727 req/s   1.2 ms
    httpx.AsyncClient.post over this transport           3,900-5,150 req/s  190-230 us
    this transport, prebuilt httpx.Request                   ~10,000 req/s   74-89 us
    this transport, `RawRequest` (what delivery uses)   6,900-10,200 req/s   73-83 us

The default transport's cost is CPU, not the network (no Nagle or delayed-ACK wait:
it burns milliseconds of CPU per request): httpcore's pool re-scans every connection
and every queued request on each assignment (`_assign_requests_to_connections`, see
encode/httpcore#1035 and the fixes in pydantic/httpx2#974/#1075), so the cost per
request grows with the pool and the queue - exactly the shape of a delivery batch.
The client layer above any transport (URL merging, cookies, auth and redirect
handling per call) costs another ~130 us per call, so delivery lays its requests out
once as bytes (`RawRequest`, built by `providers.base.Endpoint`) and calls `send()`,
which answers with a `ProviderAnswer` (status, headers, body) rather than an
`httpx.Response`.

What it speaks is what provider APIs need: one request at a time per connection, each
request written with a single write (so Nagle never holds a part back), answers with
Content-Length, chunked, or delimited by the connection's end; TLS through asyncio;
keep-alive pooling with at most `max_connections` per transport, waiters served in
order; httpx's timeouts (connect, read) and httpx's exceptions (ConnectError,
ConnectTimeout, ReadTimeout, ReadError, RemoteProtocolError), so the retry policy above
it treats it like any httpx transport. `handle_async_request` makes it a regular
`httpx.AsyncBaseTransport` as well.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from services.delivery.providers.resilience import Limiter

_MAX_HEAD = 64 * 1024

# (scheme, host, port)
Origin = tuple[str, str, int]


def _origin(url: httpx.URL) -> Origin:
    scheme = url.scheme
    return (scheme, url.host, url.port or (443 if scheme == "https" else 80))


class RawRequest:
    """A request laid out once as HTTP/1.1 bytes, without building an `httpx.Request`.

    `head` is the request line and every header but Content-Length, each line ending
    in CRLF; `payload()` adds the length and the body.
    """

    __slots__ = ("content", "head", "method", "origin", "path", "timeout", "url")

    def __init__(
        self,
        url: httpx.URL,
        head: bytes,
        content: bytes,
        timeout: Mapping[str, float | None],
        *,
        method: str = "POST",
    ) -> None:
        self.url = url
        self.origin = _origin(url)
        self.path = url.raw_path.decode("ascii")
        self.method = method
        self.head = head
        self.content = content
        self.timeout = timeout

    def payload(self) -> bytes:
        return b"%scontent-length: %d\r\n\r\n%s" % (self.head, len(self.content), self.content)

    def header(self, name: str) -> str | None:
        """One header's value (for tests and logs; names compare case-insensitively)."""
        wanted = name.lower().encode() + b":"
        for line in self.head.split(b"\r\n")[1:]:
            if line.lower().startswith(wanted):
                return line[len(wanted) :].strip().decode("latin-1")
        return None


class AnswerHeaders(dict[str, str]):
    """An answer's headers by lower-case name; `get` and `[]` take any case."""

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())


class ProviderAnswer:
    """What `send()` returns: status, headers and body, without an `httpx.Response`.

    Reading a provider's answer needs the status, a header or two and the JSON body;
    an `httpx.Response` (header objects, stream and decoder set-up) cost more than that.
    """

    __slots__ = ("_headers", "_raw_headers", "content", "status_code")

    def __init__(
        self, status_code: int, headers: list[tuple[bytes, bytes]], content: bytes
    ) -> None:
        self.status_code = status_code
        self._raw_headers = headers
        self._headers: AnswerHeaders | None = None
        self.content = content

    @property
    def headers(self) -> AnswerHeaders:
        if self._headers is None:
            self._headers = AnswerHeaders(
                (name.decode("latin-1").lower(), value.decode("latin-1"))
                for name, value in self._raw_headers
            )
        return self._headers

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return orjson.loads(self.content)


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes, bool]] | None = (
            None
        )
        self.closed = False
        self.received_any = False
        self._head: tuple[int, list[tuple[bytes, bytes]], int | None, bool, bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            head = self._head
            if head is not None and head[2] is None and not head[3]:
                # A body delimited by the end of the connection.
                waiter.set_result((head[0], head[1], bytes(self.buffer), False))
            elif self.received_any:
                waiter.set_exception(
                    httpx.ReadError("connection closed in the middle of an answer")
                )
            else:
                waiter.set_exception(
                    httpx.RemoteProtocolError("server disconnected without sending a response")
                )

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.buffer += data
        try:
            self._parse()
        except ValueError as exc:
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(httpx.RemoteProtocolError(f"malformed answer: {exc}"))
            self.close()

    def _parse(self) -> None:
        if self.waiter is None or self.waiter.done():
            return
        if self._head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    raise ValueError("header too large")
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            del self.buffer[: end + 4]
            parts = lines[0].split(b" ", 2)
            status = int(parts[1])
            headers: list[tuple[bytes, bytes]] = []
            length: int | None = None
            chunked = False
            keep_alive = parts[0] == b"HTTP/1.1"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name, value = name.strip(), value.strip()
                headers.append((name, value))
                lower = name.lower()
                if lower == b"content-length":
                    length = int(value)
                elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif lower == b"connection":
                    keep_alive = value.lower() != b"close"
            if status in (204, 304) or 100 <= status < 200:
                length = 0
            self._head = (status, headers, length, chunked, keep_alive)
        status, headers, length, chunked, keep_alive = self._head
        if chunked:
            body = _dechunk(self.buffer)
            if body is None:
                return
            content, used = body
        elif length is not None:
            if len(self.buffer) < length:
                return
            content, used = bytes(self.buffer[:length]), length
        else:
            return  # until the connection closes
        del self.buffer[:used]
        self._head = None
        self.waiter.set_result((status, headers, content, keep_alive))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _dechunk(buffer: bytearray) -> tuple[bytes, int] | None:
    """The body of a complete chunked message at the start of `buffer`, and bytes used."""
    out = bytearray()
    pos = 0
    while True:
        end = buffer.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(bytes(buffer[pos:end]).split(b";")[0].strip() or b"0", 16)
        pos = end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None
            return bytes(out), trailer_end + 4
        if len(buffer) < pos + size + 2:
            return None
        out += buffer[pos : pos + size]
        pos += size + 2


def _expire(waiter: asyncio.Future[Any], request: httpx.Request | None) -> None:
    if not waiter.done():
        waiter.set_exception(
            httpx.ReadTimeout("the provider did not answer in time", request=request)
        )


class FastTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int, *, verify: ssl.SSLContext | bool = True) -> None:
        self._limit = Limiter(max_connections)
        self._idle: dict[Origin, deque[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._verify = verify
        self._all: set[_Connection] = set()

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            if isinstance(self._verify, ssl.SSLContext):
                self._ssl = self._verify
            elif self._verify:
                self._ssl = ssl.create_default_context()
            else:
                self._ssl = ssl._create_unverified_context()
        return self._ssl

    async def _connect(self, origin: Origin, limit_s: float | None) -> _Connection:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit_s):
                _, protocol = await loop.create_connection(
                    _Connection,
                    host,
                    port,
                    ssl=self._context() if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(f"connecting to {host}:{port}: {exc}") from None
        self._all.add(protocol)
        return protocol

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """The httpx transport interface: any `httpx.AsyncClient` can use this transport."""
        url = request.url
        body = await request.aread()
        head = [request.method.encode() + b" " + url.raw_path + b" HTTP/1.1"]
        head += [name + b": " + value for name, value in request.headers.raw]
        payload = b"\r\n".join(head) + b"\r\n\r\n" + body
        answer = await self.exchange(
            _origin(url), payload, request.extensions.get("timeout", {}), request=request
        )
        return httpx.Response(
            answer.status_code,
            headers=answer._raw_headers,
            content=answer.content,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def send(self, request: RawRequest, *, since: float | None = None) -> ProviderAnswer:
        """The lean path: a request whose bytes are already laid out (see `RawRequest`).

        `since` places it among the requests waiting for a connection (`Limiter.turn`).
        """
        return await self.exchange(request.origin, request.payload(), request.timeout, since=since)

    async def exchange(
        self,
        origin: Origin,
        payload: bytes,
        timeouts: Mapping[str, float | None],
        *,
        request: httpx.Request | None = None,
        since: float | None = None,
    ) -> ProviderAnswer:
        """Write one request on a pooled connection and read its answer."""
        async with self._limit.turn(since):
            connection = await self._connect(origin, timeouts.get("connect"))
            loop = asyncio.get_running_loop()
            waiter = connection.waiter = loop.create_future()
            connection.received_any = False
            assert connection.transport is not None
            connection.transport.write(payload)
            read_s = timeouts.get("read")
            # A timer on the future, cheaper than an asyncio.timeout() scope per call.
            timer = (
                loop.call_later(read_s, _expire, waiter, request) if read_s is not None else None
            )
            try:
                status, headers, content, keep_alive = await waiter
            except BaseException:
                # A timeout, a transport error, or the caller cancelled: the connection may
                # still get (part of) this answer, so it never carries another request.
                connection.close()
                self._all.discard(connection)
                raise
            finally:
                connection.waiter = None
                if timer is not None:
                    timer.cancel()
            if keep_alive and not connection.closed:
                self._idle.setdefault(origin, deque()).append(connection)
            else:
                connection.close()
                self._all.discard(connection)
        return ProviderAnswer(status, headers, content)

    async def aclose(self) -> None:
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()
