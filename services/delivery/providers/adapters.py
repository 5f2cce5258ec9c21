"""The generic provider contract of PRODUCT.md and three real API shapes behind it.

- generic: `POST {base}/v1/messages`, JSON `{id, channel, to, user_id, promotion_id,
  wave, variant, subject, body}`, `Idempotency-Key: <touch id>`, bearer token.
- twilio (SMS): Twilio Programmable Messaging, `POST {base}/2010-04-01/Accounts/
  {AccountSid}/Messages.json`, form fields `To`, `From`, `Body`, HTTP basic auth
  (account SID and auth token); 201 with the message `sid`.
- sendgrid (email): SendGrid v3 `POST {base}/v3/mail/send`, JSON `personalizations`
  / `from` / `subject` / `content`, bearer API key; 202 with `X-Message-Id`.
  The touch id travels in `custom_args`, so that event webhooks carry it back.
- fcm (push): Firebase Cloud Messaging HTTP v1 `POST {base}/v1/projects/{project}/
  messages:send`, JSON `{"message": {"token", "notification": {"title", "body"},
  "data"}}`, bearer OAuth 2 access token; 200 with the message `name`.

Every adapter also sends `Idempotency-Key`; providers that ignore it lose nothing,
and delivery never calls twice for an accepted touch anyway.
"""

from __future__ import annotations

import base64
import urllib.parse

import orjson

from services.delivery.providers.base import (
    Adapter,
    Endpoint,
    OutboundMessage,
    idempotency_headers,
    json_field,
)
from services.delivery.providers.fast import ProviderAnswer, RawRequest

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


class GenericAdapter:
    name = "generic"
    default_base_url: str | None = None

    def auth_headers(self, account: str | None, token: str | None) -> dict[str, str]:
        return _bearer(token)

    def request(self, endpoint: Endpoint, message: OutboundMessage) -> RawRequest:
        return endpoint.post(
            "/v1/messages",
            content=orjson.dumps(message.contract_body()),
            headers={**JSON, **idempotency_headers(message)},
        )

    def message_id(self, response: ProviderAnswer) -> str | None:
        return json_field(response, "provider_message_id")


class TwilioAdapter:
    name = "twilio"
    default_base_url: str | None = "https://api.twilio.com"

    def auth_headers(self, account: str | None, token: str | None) -> dict[str, str]:
        if not account or not token:
            return {}
        basic = base64.b64encode(f"{account}:{token}".encode()).decode("ascii")
        return {"Authorization": f"Basic {basic}"}

    def request(self, endpoint: Endpoint, message: OutboundMessage) -> RawRequest:
        sender = endpoint.sender
        form = {"To": message.to, "Body": message.body}
        if sender and sender.startswith("MG"):
            form["MessagingServiceSid"] = sender
        elif sender:
            form["From"] = sender
        return endpoint.post(
            f"/2010-04-01/Accounts/{endpoint.account or ''}/Messages.json",
            content=urllib.parse.urlencode(form).encode(),
            headers={**FORM, **idempotency_headers(message)},
        )

    def message_id(self, response: ProviderAnswer) -> str | None:
        return json_field(response, "sid")


class SendGridAdapter:
    name = "sendgrid"
    default_base_url: str | None = "https://api.sendgrid.com"

    def auth_headers(self, account: str | None, token: str | None) -> dict[str, str]:
        return _bearer(token)

    def request(self, endpoint: Endpoint, message: OutboundMessage) -> RawRequest:
        body = {
            "personalizations": [
                {
                    "to": [{"email": message.to}],
                    "custom_args": {"touch_id": message.id, "promotion_id": message.promotion_id},
                }
            ],
            "from": {"email": endpoint.sender or "no-reply@afterglow.invalid"},
            "subject": message.subject or message.wave,
            "content": [{"type": "text/plain", "value": message.body}],
            "custom_args": {"touch_id": message.id},
        }
        return endpoint.post(
            "/v3/mail/send",
            content=orjson.dumps(body),
            headers={**JSON, **idempotency_headers(message)},
        )

    def message_id(self, response: ProviderAnswer) -> str | None:
        value = response.headers.get("X-Message-Id")
        return str(value) if value else None


class FcmAdapter:
    name = "fcm"
    default_base_url: str | None = "https://fcm.googleapis.com"

    def auth_headers(self, account: str | None, token: str | None) -> dict[str, str]:
        return _bearer(token)

    def request(self, endpoint: Endpoint, message: OutboundMessage) -> RawRequest:
        body = {
            "message": {
                "token": message.to,
                "notification": {"title": message.subject, "body": message.body},
                "data": {
                    "touch_id": message.id,
                    "promotion_id": message.promotion_id,
                    "wave": message.wave,
                },
            }
        }
        return endpoint.post(
            f"/v1/projects/{endpoint.account or ''}/messages:send",
            content=orjson.dumps(body),
            headers={**JSON, **idempotency_headers(message)},
        )

    def message_id(self, response: ProviderAnswer) -> str | None:
        return json_field(response, "name")


ADAPTERS: dict[str, Adapter] = {
    "generic": GenericAdapter(),
    "twilio": TwilioAdapter(),
    "sendgrid": SendGridAdapter(),
    "fcm": FcmAdapter(),
}
