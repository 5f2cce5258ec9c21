"""What every provider adapter shares: the message, the answer, and how an answer is read."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One touch on one channel, rendered.

    `id` is the touch id (the body's `id`, and the key receipts come back with);
    `idempotency_key` is the Idempotency-Key when it is not the touch id - the extra
    channels of a parallel send (`<touch id>:<channel>`).
    """

    id: str
    channel: str
    to: str
    user_id: str
    promotion_id: str
    wave: str
    variant: str | None
    subject: str
    body: str
    idempotency_key: str | None = None

    def contract_body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "channel": self.channel,
            "to": self.to,
            "user_id": self.user_id,
            "promotion_id": self.promotion_id,
            "wave": self.wave,
            "variant": self.variant,
            "subject": self.subject,
            "body": self.body,
        }


class Adapter(Protocol):
    """Turns a message into one provider's request, and its answer into a message id."""

    name: str
    default_base_url: str | None

    def auth_headers(self, account: str | None, token: str | None) -> dict[str, str]: ...

    def request(
        self,
        client: httpx.AsyncClient,
        message: OutboundMessage,
        *,
        account: str | None,
        sender: str | None,
    ) -> httpx.Request: ...

    def message_id(self, response: httpx.Response) -> str | None: ...


def idempotency_headers(message: OutboundMessage) -> dict[str, str]:
    return {"Idempotency-Key": message.idempotency_key or message.id}


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def json_field(response: httpx.Response, name: str) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    value = body.get(name) if isinstance(body, dict) else None
    return str(value) if value is not None else None
