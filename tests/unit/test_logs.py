from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import datetime

import orjson
import pytest

from shared.logs import configure_logging, is_sensitive_key, mask_text, mask_value

PHONE = "+8613800000000"


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("DEBUG", "json", service="segmentation", stream=stream)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (PHONE, "+86*********00"),
        ("sms to 13800000000.", "sms to *********00."),
        ("call +86 138 0000 0000", "call +86*********00"),
        ("alice.smith@example.com", "a***@example.com"),
        ("13800000000@qq.com", "1***@qq.com"),
        ("Authorization: Bearer eyJhbGciOi.x-y_z", "Authorization: ***"),
        ("sent bearer abc123", "sent bearer ***"),
        ("GET /cb?token=abc&page=2", "GET /cb?token=***&page=2"),
        ("{'password': 'hunter2'}", "{'password': '***'}"),
        ("/v1/users/13800000000/segment", "/v1/users/*********00/segment"),
    ],
)
def test_mask_text_hides_personal_data(text: str, expected: str) -> None:
    assert mask_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "amount 120.5 CNY, refund -99.90",
        "activity a-1 user u-1 sku-12345678901",
        "at 2025-03-01T08:00:00+08:00 and 2025-03-01T00:00:00.123Z",
        "born 1994, 42 touches, 3 waves, wave day30",
        "offset 12345678901 ts 1714567890123 epoch 1714567890",
        "promotion p-13800000000-x version 1.13800000000",
        "total=5 to=wave",
    ],
)
def test_mask_text_leaves_ordinary_values_readable(text: str) -> None:
    assert mask_text(text) == text


def test_mask_value_walks_containers_and_hides_sensitive_keys() -> None:
    value = {
        "user_id": "u-1",
        "amount": 120.5,
        "count": 3,
        "addresses": {"sms": PHONE, "email": "a@b.cn", "push": None},
        "to": "a@b.cn",
        "apiKey": "k",
        "notes": [{"text": f"reach me at {PHONE}"}, ("b@c.io",)],
        "raw": 13800000000,
        "at": datetime(2025, 3, 1),
    }
    assert mask_value(value) == {
        "user_id": "u-1",
        "amount": 120.5,
        "count": 3,
        "addresses": {"sms": "***", "email": "***", "push": None},
        "to": "***",
        "apiKey": "***",
        "notes": [{"text": "reach me at +86*********00"}, ["b***@c.io"]],
        "raw": "*********00",
        "at": datetime(2025, 3, 1),
    }


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "device_token",
        "receipt_secret",
        "Authorization",
        "password",
        "api_key",
        "phone",
        "phoneNumber",
        "user_email",
        "email",
        "address",
        "addresses",
        "to",
    ],
)
def test_sensitive_keys(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize("key", ["total", "touch_id", "user_id", "amount", "topic", "timezone"])
def test_ordinary_keys(key: str) -> None:
    assert not is_sensitive_key(key)


def test_json_lines_are_masked_everywhere(out: io.StringIO) -> None:
    log = logging.getLogger("services.segmentation.api")
    log.info("profile of %s saved for %s", "u-1", PHONE, extra={"profile": {"phone": PHONE}})
    try:
        raise ValueError(f"provider refused {PHONE} and a@b.cn with Bearer s3cr3t")
    except ValueError:
        log.exception("send failed", extra={"attempt": 2, "details": [{"note": "to a@b.cn"}]})
    first, second = lines(out)
    assert first["msg"] == "profile of u-1 saved for +86*********00"
    assert first["profile"] == {"phone": "***"}
    assert first["level"] == "INFO"
    assert first["logger"] == "services.segmentation.api"
    assert first["service"] == "segmentation"
    assert second["attempt"] == 2
    assert second["details"] == [{"note": "to a***@b.cn"}]
    assert "ValueError: provider refused +86*********00 and a***@b.cn with Bearer ***" in str(
        second["exc"]
    )
    assert PHONE not in out.getvalue()
    assert "s3cr3t" not in out.getvalue()


def test_timestamps_are_rfc3339_utc(out: io.StringIO) -> None:
    logging.getLogger("x").warning("hello")
    [line] = lines(out)
    ts = str(line["ts"])
    assert ts.endswith("Z")
    assert datetime.fromisoformat(ts).utcoffset() is not None


def test_service_comes_from_extra_or_logger_name() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:]
    try:
        configure_logging(stream=stream)
        logging.getLogger("services.delivery.providers").warning("a")
        logging.getLogger("shared.bus").warning("b", extra={"service": "metrics"})
        logging.getLogger("shared.bus").warning("c")
    finally:
        root.handlers[:] = saved
    assert [line["service"] for line in lines(stream)] == ["delivery", "metrics", None]


def test_configure_logging_is_idempotent(out: io.StringIO) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging("INFO", "json", service="segmentation", stream=out)
    configure_logging("INFO", "json", service="segmentation", stream=out)
    assert len(root.handlers) == before
    logging.getLogger("x").info("once")
    assert len(lines(out)) == 1


def test_console_format_is_masked_too(out: io.StringIO) -> None:
    configure_logging("INFO", "console", service="delivery", stream=out)
    logging.getLogger("x").info("to %s", "a@b.cn", extra={"phone": PHONE, "wave": "day3"})
    text = out.getvalue()
    assert "a***@b.cn" in text
    assert 'phone="***"' in text
    assert 'wave="day3"' in text
    assert PHONE not in text
