"""The providers' HTTP transport (services/delivery/providers/fast.py) against real sockets.

Through the lean path (`Endpoint.post` + `FastTransport.send`) and as a plain httpx
transport: answers and their headers, keep-alive, a provider that hangs past the
timeout, one that drops the connection, one that is not there, chunked and
close-delimited answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from services.delivery.providers.base import Endpoint
from services.delivery.providers.fast import FastTransport
from tests.support.ports import free_port
from tests.support.provider_server import Answer, ProviderServer


def endpoint(url: str, timeout_s: float = 5.0) -> Endpoint:
    return Endpoint(
        url,
        headers={"Authorization": "Bearer t"},
        account=None,
        sender=None,
        timeout_s=timeout_s,
        connect_timeout_s=1.0,
    )


async def post(transport: FastTransport, target: Endpoint, key: str) -> httpx.Response:
    request = target.post(
        "/v1/messages",
        content=b'{"id": "%s"}' % key.encode(),
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    return await transport.send(request)


async def test_lean_requests_carry_headers_body_and_reuse_one_connection() -> None:
    async with ProviderServer() as server:
        transport = FastTransport(4)
        try:
            target = endpoint(server.url)
            server.script(Answer.throttle(retry_after=7))
            throttled = await post(transport, target, "k-1")
            answers = [await post(transport, target, f"k-{n}") for n in range(2, 5)]
            connections = len(transport._all)
        finally:
            await transport.aclose()
        assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert answers[0].json()["provider_message_id"] == "pm-2"
        call = server.calls[1]
        assert call.method == "POST" and call.path == "/v1/messages"
        assert call.headers["authorization"] == "Bearer t"
        assert call.headers["idempotency-key"] == "k-2"
        assert call.headers["host"] == server.url.removeprefix("http://")
        assert call.json() == {"id": "k-2"}
        assert connections == 1, "calls one after another share one connection"


async def test_hang_past_the_timeout_is_a_read_timeout_and_the_connection_is_not_reused() -> None:
    async with ProviderServer() as server:
        transport = FastTransport(4)
        try:
            target = endpoint(server.url, timeout_s=0.2)
            server.script(Answer.hang(5))
            with pytest.raises(httpx.ReadTimeout):
                await post(transport, target, "k-1")
            after = await post(transport, target, "k-2")
        finally:
            await transport.aclose()
        assert after.status_code == 200
        assert server.keys_seen == {"k-1": 1, "k-2": 1}


async def test_a_cancelled_call_never_leaves_its_connection_to_the_next_call() -> None:
    async with ProviderServer() as server:
        transport = FastTransport(4)
        try:
            target = endpoint(server.url)
            server.script(Answer.hang(5))
            pending = asyncio.create_task(post(transport, target, "k-1"))
            await server.wait_for_calls(1)
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
            left = set(transport._all)
            after = await post(transport, target, "k-2")
        finally:
            await transport.aclose()
        assert left == set(), "the cancelled call's connection was closed"
        assert after.status_code == 200 and after.json()["provider_message_id"] == "pm-2"


async def test_a_dropped_connection_is_a_transport_error_and_the_next_call_reconnects() -> None:
    async with ProviderServer() as server:
        transport = FastTransport(4)
        try:
            target = endpoint(server.url)
            assert (await post(transport, target, "k-0")).status_code == 200
            server.script(Answer.drop())
            with pytest.raises(httpx.RemoteProtocolError):
                await post(transport, target, "k-1")
            after = await post(transport, target, "k-2")
        finally:
            await transport.aclose()
        assert after.status_code == 200


async def test_nobody_listening_is_a_connect_error() -> None:
    port = free_port()
    transport = FastTransport(1)
    try:
        with pytest.raises(httpx.ConnectError):
            await post(transport, endpoint(f"http://127.0.0.1:{port}"), "k-1")
    finally:
        await transport.aclose()


async def test_header_values_with_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        endpoint("http://127.0.0.1:9").post(
            "/v1/messages", content=b"{}", headers={"Idempotency-Key": "a\r\nX-Evil: 1"}
        )


Reply = Callable[[bytes], bytes]


@contextlib.asynccontextmanager
async def raw_server(reply: Reply, *, close: bool) -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                writer.write(reply(body))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_chunked_answers_are_read_whole_through_httpx() -> None:
    def chunked(body: bytes) -> bytes:
        return (
            b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"sid\r\n0E\r\n": "SM123"}   \r\n0\r\n\r\n'
        )

    async with raw_server(chunked, close=False) as url:
        async with httpx.AsyncClient(base_url=url, transport=FastTransport(2)) as client:
            first = await client.post("/x", content=b"one")
            second = await client.post("/x", content=b"two")
        assert first.status_code == second.status_code == 201
        assert first.json() == {"sid": "SM123"}


async def test_an_answer_delimited_by_closing_the_connection() -> None:
    def close_delimited(body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body.upper()

    async with raw_server(close_delimited, close=True) as url:
        async with httpx.AsyncClient(base_url=url, transport=FastTransport(2)) as client:
            answers = [await client.post("/x", content=b"abc") for _ in range(2)]
        assert [a.content for a in answers] == [b"ABC", b"ABC"]
