"""Each provider adapter against a loopback server that speaks its API's shape."""

from __future__ import annotations

import asyncio
import base64
import dataclasses

from pydantic import SecretStr

from services.delivery.config import ChannelConfig
from services.delivery.providers.base import OutboundMessage
from services.delivery.providers.client import ProviderClient
from tests.support.provider_server import Answer, ProviderServer

MESSAGE = OutboundMessage(
    id="t-1",
    channel="sms",
    to="+8613800000000",
    user_id="u-1",
    promotion_id="p-1",
    wave="day3",
    variant="A",
    subject="Thanks",
    body="Your code ABC",
)


def client(url: str, adapter: str, **values: object) -> ProviderClient:
    config = ChannelConfig(
        adapter=adapter,  # type: ignore[arg-type]
        base_url=url,
        token=SecretStr("secret-token"),
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        **values,  # type: ignore[arg-type]
    )
    provider = ProviderClient(MESSAGE.channel, config, semaphore=asyncio.Semaphore(10))
    provider.open()
    return provider


async def test_twilio_messages_shape() -> None:
    async with ProviderServer(shape="twilio") as server:
        provider = client(server.url, "twilio", account="AC123", sender="+15005550006")
        server.script(Answer.throttle(0.01))
        try:
            outcome = await provider.deliver(MESSAGE)
        finally:
            await provider.close()
        assert outcome.accepted and outcome.provider_message_id == f"SM{2:032d}"
        call = server.calls[-1]
        assert call.path == "/2010-04-01/Accounts/AC123/Messages.json"
        assert call.form() == {
            "To": "+8613800000000",
            "From": "+15005550006",
            "Body": "Your code ABC",
        }
        expected = base64.b64encode(b"AC123:secret-token").decode()
        assert call.headers["authorization"] == f"Basic {expected}"
        assert call.headers["idempotency-key"] == "t-1"


async def test_sendgrid_mail_send_shape() -> None:
    async with ProviderServer(shape="sendgrid") as server:
        provider = client(server.url, "sendgrid", sender="news@shop.example")
        try:
            outcome = await provider.deliver(MESSAGE)
        finally:
            await provider.close()
        assert outcome.accepted and outcome.status == 202 and outcome.provider_message_id == "sg-1"
        call = server.calls[0]
        assert call.path == "/v3/mail/send"
        assert call.headers["authorization"] == "Bearer secret-token"
        body = call.json()
        assert body["personalizations"][0]["to"] == [{"email": "+8613800000000"}]
        assert body["from"] == {"email": "news@shop.example"}
        assert body["subject"] == "Thanks"
        assert body["content"] == [{"type": "text/plain", "value": "Your code ABC"}]
        assert body["custom_args"]["touch_id"] == "t-1"


async def test_fcm_v1_send_shape_and_final_4xx() -> None:
    async with ProviderServer(shape="fcm") as server:
        provider = client(server.url, "fcm", account="my-project")
        try:
            outcome = await provider.deliver(MESSAGE)
            server.default = Answer.status_code(404)  # UNREGISTERED: never retried
            rejected = await provider.deliver(MESSAGE)
        finally:
            await provider.close()
        assert outcome.accepted and outcome.provider_message_id == "projects/test/messages/1"
        call = server.calls[0]
        assert call.path == "/v1/projects/my-project/messages:send"
        assert call.headers["authorization"] == "Bearer secret-token"
        message = call.json()["message"]
        assert message["token"] == "+8613800000000"
        assert message["notification"] == {"title": "Thanks", "body": "Your code ABC"}
        assert message["data"]["touch_id"] == "t-1"
        assert rejected.verdict == "rejected" and rejected.calls == 1 and len(server.calls) == 2


async def test_generic_gives_up_after_max_attempts_and_long_retry_after_falls_back_at_once() -> (
    None
):
    async with ProviderServer() as server:
        server.default = Answer.error(502)
        provider = client(server.url, "generic", max_attempts=3, retry_after_max_s=1.0)
        try:
            failed = await provider.deliver(MESSAGE)
            server.default = Answer.throttle(60)
            throttled = await provider.deliver(MESSAGE)
        finally:
            await provider.close()
        assert failed.verdict == "failed" and failed.calls == 3
        assert throttled.verdict == "failed" and throttled.calls == 1
        assert server.duplicates() == 0


async def test_a_message_that_cannot_become_a_request_is_refused_without_a_call() -> None:
    async with ProviderServer(shape="generic") as server:
        provider = client(server.url, "generic")
        broken = dataclasses.replace(MESSAGE, id="t-2\r\nX-Injected: yes")
        try:
            outcome = await provider.deliver(broken)
            after = await provider.deliver(MESSAGE)
        finally:
            await provider.close()
        assert outcome.verdict == "rejected" and outcome.calls == 0
        assert "cannot build the request" in outcome.error
        assert after.accepted
        assert [call.headers["idempotency-key"] for call in server.calls] == ["t-1"]
