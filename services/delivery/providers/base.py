"""What every provider adapter shares: the message, the answer, and how an answer is read."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import httpx

from services.delivery.providers.fast import ProviderAnswer, RawRequest


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


USER_AGENT = "afterglow-delivery"


class Endpoint:
    """One channel's provider as the adapters see it: where, who, and how long to wait.

    `post()` lays a request out as HTTP/1.1 bytes at once (the request line, the
    auth and default headers, the timeouts) for `FastTransport.send`. Building an
    `httpx.Request` and going through `httpx.AsyncClient.send` (URL merging, header
    objects, cookies, auth and redirect machinery) cost more CPU per call than the
    call itself; nothing of it is needed here (no cookies, no redirects: a provider
    answering 3xx gets a final non-2xx).
    """

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        account: str | None,
        sender: str | None,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"User-Agent": USER_AGENT, "Accept": "*/*", **headers}
        self.account = account
        self.sender = sender
        self.timeout: dict[str, float | None] = {
            "connect": connect_timeout_s,
            "read": timeout_s,
            "write": timeout_s,
            "pool": timeout_s,
        }
        self._heads: dict[str, tuple[httpx.URL, bytes]] = {}

    def _head(self, path: str) -> tuple[httpx.URL, bytes]:
        found = self._heads.get(path)
        if found is None:
            url = httpx.URL(self.base_url + path)
            host = url.netloc.decode("ascii")
            lines = [f"POST {url.raw_path.decode('ascii')} HTTP/1.1", f"Host: {host}"]
            lines += [f"{name}: {_header_value(value)}" for name, value in self.headers.items()]
            if len(self._heads) > 1024:
                self._heads.clear()
            found = self._heads[path] = (url, ("\r\n".join(lines) + "\r\n").encode("latin-1"))
        return found

    def post(self, path: str, *, content: bytes, headers: dict[str, str]) -> RawRequest:
        url, head = self._head(path)
        extra = "".join(f"{name}: {_header_value(value)}\r\n" for name, value in headers.items())
        return RawRequest(url, head + extra.encode("latin-1"), content, self.timeout)


def _header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a header value may not contain a line break")
    return value


class Adapter(Protocol):
    """Turns a message into one provider's request, and its answer into a message id."""

    name: str
    default_base_url: str | None

    def auth_headers(self, account: str | None, token: str | None) -> dict[str, str]: ...

    def request(self, endpoint: Endpoint, message: OutboundMessage) -> RawRequest: ...

    def message_id(self, response: ProviderAnswer) -> str | None: ...


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


def json_field(response: ProviderAnswer, name: str) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    value = body.get(name) if isinstance(body, dict) else None
    return str(value) if value is not None else None
