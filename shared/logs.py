"""Structured logs that never carry personal data in clear.

Every record is masked on its way out: the message, each `extra=` value
(recursively) and the exception text. Code that builds strings for other
sinks masks them itself with `mask_text` / `mask_value`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import Mapping
from datetime import UTC, date, datetime
from enum import Enum
from typing import IO, Any, Literal
from uuid import UUID

import orjson

MASK = "***"

_SECRET_PARTS = ("token", "secret", "password", "passwd", "authorization", "api_key", "apikey")
_CONTACT_WORDS = frozenset(
    ("phone", "mobile", "msisdn", "email", "emails", "address", "addresses", "cookie")
)
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_SECRET_PAIR = re.compile(
    rf"""\b([\w\-]*(?:{"|".join(_SECRET_PARTS)})[\w\-]*["']?\s*[:=]\s*["']?)"""
    r"(?!\*\*\*)(?:(?:bearer|basic)\s+)?[^\s\"',;&}\]]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(bearer)\s+(?!\*\*\*)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)
_EMAIL = re.compile(
    r"\b([A-Za-z0-9])[A-Za-z0-9._%+\-]*@([A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,})\b"
)
# E.164 (`+8613800000000`, or grouped `+86 138 0000 0000`) and 11-digit mobiles
# (`13800000000`, `138-0000-0000`); never part of a longer number, word, id or decimal.
_PHONE = re.compile(
    r"(?<![\w+.\-])"
    r"(\+[1-9]\d{6,14}|\+[1-9]\d{0,2}(?:[ \-]\d{2,5}){2,5}|1[3-9]\d(?:[ \-]?\d{4}){2})"
    r"(?![\w\-]|\.\d)"
)


def _mask_phone(match: re.Match[str]) -> str:
    raw = match.group(0)
    digits = re.sub(r"\D", "", raw)
    if raw.startswith("+"):
        return "+" + digits[:2] + "*" * (len(digits) - 4) + digits[-2:]
    return "*" * (len(digits) - 2) + digits[-2:]


def mask_text(text: str) -> str:
    text = _SECRET_PAIR.sub(lambda m: m.group(1) + MASK, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _EMAIL.sub(lambda m: f"{m.group(1)}{MASK}@{m.group(2)}", text)
    return _PHONE.sub(_mask_phone, text)


def is_sensitive_key(key: str) -> bool:
    """Secrets by substring (`access_token`), contacts by word (`user_email`, not `total`)."""
    lowered = key.lower()
    if lowered == "to" or any(part in lowered for part in _SECRET_PARTS):
        return True
    return any(w.lower() in _CONTACT_WORDS for w in _WORD.findall(key))


def _hide(obj: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return {str(k): _hide(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_hide(v) for v in obj]
    return MASK


def mask_value(obj: Any) -> Any:
    """A copy of `obj` fit for logs: strings masked, values under sensitive keys hidden."""
    if obj is None or isinstance(obj, bool | float | datetime | date | UUID):
        return obj
    if isinstance(obj, str):
        return mask_text(obj)
    if isinstance(obj, Enum):
        return mask_value(obj.value)
    if isinstance(obj, int):
        masked = mask_text(str(obj))
        return obj if masked == str(obj) else masked
    if isinstance(obj, Mapping):
        return {
            str(k): _hide(v) if is_sensitive_key(str(k)) else mask_value(v) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple | set | frozenset):
        return [mask_value(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return mask_value({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return mask_text(str(obj))


_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "service",
}


def _timestamp(created: float) -> str:
    return (
        datetime.fromtimestamp(created, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        service = record.__dict__.get("service") or self.service
        if service is None and record.name.startswith("services."):
            service = record.name.split(".")[1]
        data: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": mask_text(record.getMessage()),
            "service": service,
        }
        extra = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        data.update((k, v) for k, v in mask_value(extra).items() if k not in data)
        if record.exc_info:
            data["exc"] = mask_text(self.formatException(record.exc_info))
        if record.stack_info:
            data["stack"] = mask_text(self.formatStack(record.stack_info))
        return data

    def format(self, record: logging.LogRecord) -> str:
        return orjson.dumps(self.fields(record), default=str).decode()


class ConsoleFormatter(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        data = self.fields(record)
        head = f"{data.pop('ts')} {data.pop('level'):<8} {data.pop('logger')}: {data.pop('msg')}"
        exc = data.pop("exc", None)
        data.pop("stack", None)
        pairs = " ".join(f"{k}={orjson.dumps(v, default=str).decode()}" for k, v in data.items())
        return "\n".join(filter(None, (f"{head} {pairs}".rstrip(), exc)))


class _AfterglowHandler(logging.StreamHandler[IO[str]]):
    """Marks the handler `configure_logging` owns, so a second call replaces it."""


def configure_logging(
    level: str = "INFO",
    fmt: Literal["json", "console"] = "json",
    service: str | None = None,
    *,
    stream: IO[str] | None = None,
) -> None:
    """Route every log record (uvicorn's too) through one masking handler on stderr."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _AfterglowHandler)]:
        root.removeHandler(old)
    handler = _AfterglowHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else ConsoleFormatter(service))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Access lines carry client addresses, which are personal data; requests are
    # counted by the Prometheus middleware instead.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
