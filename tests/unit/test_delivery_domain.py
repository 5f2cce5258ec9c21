"""Delivery's rules: channels, templates, coupons, budget, retries, signatures, resilience."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from services.delivery import domain
from services.delivery.config import DeliveryConfigError, load_config
from services.delivery.domain import ChannelTerms, Contact, Fail, Ledger, Send
from services.delivery.providers.base import retry_after_seconds
from services.delivery.providers.resilience import (
    CircuitBreaker,
    CircuitState,
    Limiter,
    TokenBucket,
)
from shared.events import MessageContent, TouchDue
from shared.settings import Settings

NOW = datetime(2026, 3, 8, 12, 0, tzinfo=UTC)


def due(*channels: str, **kw: object) -> TouchDue:
    return TouchDue(
        touch_id="t-1",
        user_id="u-1",
        promotion_id="p-1",
        wave="day3",
        due_at=NOW,
        channels=list(channels),  # type: ignore[arg-type]
        content={c: MessageContent(body="hi") for c in channels},  # type: ignore[misc]
        **kw,  # type: ignore[arg-type]
    )


TERMS = {
    "sms": ChannelTerms(True, 1.0, 10.0, 0.2),
    "email": ChannelTerms(True, 0.1, None, 0.1),
    "push": ChannelTerms(False, 0.0, None, 0.1),
    "social": ChannelTerms(True, 2.0, None, 0.1),
}
EVERYWHERE = Contact(
    "u-1",
    {c: "addr" for c in ("sms", "email", "push", "social")},
    {c: True for c in ("sms", "email", "push", "social")},
)


def test_render_substitutes_only_and_names_the_missing_variable() -> None:
    content = MessageContent(
        subject="Hi ${name}", body="Code ${coupon}, {{ 7*7 }} $$ ${name.__class__}"
    )
    with pytest.raises(domain.TemplateError, match="malformed"):
        domain.render(content, {"name": "Ann", "coupon": "X"})
    ok = domain.render(MessageContent(subject="Hi ${name}", body="{{ 7*7 }} $$5"), {"name": "Ann"})
    assert ok == domain.Rendered("Hi Ann", "{{ 7*7 }} $5")
    with pytest.raises(domain.TemplateError, match="'coupon'"):
        domain.render(MessageContent(body="${coupon}"), {})


def test_coupons_are_long_random_and_distinct() -> None:
    codes = {domain.new_coupon_code() for _ in range(2000)}
    assert len(codes) == 2000
    assert all(len(c) == domain.COUPON_LENGTH for c in codes)
    # Every letter of the 32 (a byte modulo 32 is uniform only for 32 letters) is used.
    assert len(domain._COUPON_ALPHABET) == 32
    assert set("".join(codes)) == set(domain._COUPON_ALPHABET)


def test_choose_takes_the_first_available_channel_and_falls_back_past_tried() -> None:
    ledger = Ledger({}, TERMS)
    assert domain.choose_channel(
        due("push", "sms", "email"), EVERYWHERE, TERMS, ledger, []
    ) == Send("sms", False)
    assert domain.choose_channel(due("sms", "email"), EVERYWHERE, TERMS, ledger, ["sms"]) == Send(
        "email", True
    )
    failed = domain.choose_channel(due("sms", "email"), EVERYWHERE, TERMS, ledger, ["sms", "email"])
    assert isinstance(failed, Fail) and failed.reason == "provider_failed"


@pytest.mark.parametrize(
    ("contact", "reason"),
    [
        (None, "no_consent"),
        (Contact("u-1", {"sms": "+86"}, {"sms": False}), "no_consent"),
        (Contact("u-1", {}, {"sms": True}), "no_consent"),
        (Contact("u-1", {}, {}, erased=True), "erased"),
    ],
)
def test_reasons_when_no_channel_is_available(contact: Contact | None, reason: str) -> None:
    choice = domain.choose_channel(due("sms"), contact, TERMS, Ledger({}, TERMS), [])
    assert isinstance(choice, Fail) and choice.reason == reason


def test_budget_keeps_its_reserve_for_fallbacks_and_shifts_to_cheaper_channels() -> None:
    ledger = Ledger({("p-1", "sms"): 8.0}, TERMS)
    assert not ledger.has_room("p-1", "sms", fallback=False)
    assert ledger.has_room("p-1", "sms", fallback=True)
    assert domain.choose_channel(due("sms", "email"), EVERYWHERE, TERMS, ledger, []) == Send(
        "email", False
    )
    # social costs more than sms: never a budget fallback
    choice = domain.choose_channel(due("sms", "social"), EVERYWHERE, TERMS, ledger, [])
    assert isinstance(choice, Fail) and choice.reason == "budget"
    ledger.charge("p-1", "sms")
    ledger.refund("p-1", "sms", 1.0)
    assert ledger.spent[("p-1", "sms")] == 8.0


def test_backoff_has_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(7)
    delays = [domain.backoff_delay(5, base_s=0.1, max_s=1.0, rng=rng) for _ in range(500)]
    assert 0 <= min(delays) < 0.1 and 0.9 < max(delays) <= 1.0
    assert domain.retry_delay(1, 3.0, base_s=0.1, max_s=1, retry_after_max_s=5) == 3.0
    assert domain.retry_delay(1, 30.0, base_s=0.1, max_s=1, retry_after_max_s=5) == 5.0


def test_retry_after_as_seconds_or_http_date() -> None:
    assert retry_after_seconds("2") == 2.0
    when = (NOW + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry_after_seconds(when, now=NOW) == 30.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_signatures_are_hmac_sha256_of_the_raw_body() -> None:
    header = domain.sign(b"k", b'{"a":1}')
    assert domain.signature_valid(b"k", b'{"a":1}', header)
    assert not domain.signature_valid(b"k", b'{"a": 1}', header)
    assert not domain.signature_valid(b"other", b'{"a":1}', header)
    assert not domain.signature_valid(b"k", b'{"a":1}', None)
    assert not domain.signature_valid(b"k", b'{"a":1}', header.removeprefix("sha256="))


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_circuit_opens_probes_once_and_closes() -> None:
    clock = FakeTime()
    circuit = CircuitBreaker(3, 10.0, now=clock)
    for _ in range(3):
        assert circuit.allow()
        circuit.failure()
    assert circuit.state is CircuitState.OPEN and not circuit.allow()
    clock.now = 10.0
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.allow() and not circuit.allow(), "one probe at a time"
    circuit.failure()
    assert circuit.state is CircuitState.OPEN
    clock.now = 20.0
    assert circuit.allow()
    circuit.success()
    assert circuit.state is CircuitState.CLOSED and circuit.allow()


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = FakeTime()
    bucket = TokenBucket(rate=10, burst=3, now=clock)
    assert [bucket.reserve() for _ in range(3)] == [0, 0, 0]
    waits = [bucket.reserve() for _ in range(3)]
    assert waits == pytest.approx([0.1, 0.2, 0.3])
    clock.now = 1.0
    assert bucket.reserve() == 0


def test_config_from_environment_with_tokens_and_urls() -> None:
    settings = Settings(provider_sms_url="http://sms.local")
    env = {
        "AFTERGLOW_DELIVERY_CONFIG": '{"channels": {"sms": {"adapter": "twilio", "cost": 0.07}}}',
        "AFTERGLOW_PROVIDER_SMS_TOKEN": "tok",
    }
    config = load_config(settings, env)
    sms = config.channel("sms")
    assert sms.adapter == "twilio" and sms.cost == 0.07 and sms.base_url == "http://sms.local"
    assert sms.token is not None and sms.token.get_secret_value() == "tok"
    assert (
        config.channel("email").base_url is None
        and config.channel("email").cost_of("email") == 0.005
    )
    with pytest.raises(DeliveryConfigError, match=r"channels\.sms\.reserve_share"):
        load_config(
            settings, {"AFTERGLOW_DELIVERY_CONFIG": '{"channels": {"sms": {"reserve_share": 2}}}'}
        )


async def test_limiter_caps_holders_and_serves_waiters_in_order() -> None:
    limiter = Limiter(2)
    order: list[int] = []
    release = asyncio.Event()

    async def hold(n: int) -> None:
        async with limiter:
            order.append(n)
            await release.wait()

    tasks = [asyncio.create_task(hold(n)) for n in range(5)]
    await asyncio.sleep(0.01)
    assert order == [0, 1] and limiter.in_use == 2
    tasks[2].cancel()  # a waiter that gives up does not take a turn
    release.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 4] and limiter.in_use == 0


async def test_a_retry_takes_the_next_turn_of_the_limiter() -> None:
    """A provider call's retry goes before the first calls waiting (its batch waits on it)."""
    limiter = Limiter(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def hold(name: str, *, retry: bool = False) -> None:
        async with limiter.ahead() if retry else limiter:
            order.append(name)
            await gate.wait()

    tasks = [asyncio.create_task(hold(n)) for n in ("first", "a", "b")]
    await asyncio.sleep(0.01)
    tasks.append(asyncio.create_task(hold("retry", retry=True)))
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*tasks)
    assert order == ["first", "retry", "a", "b"] and limiter.in_use == 0


async def test_the_limiter_serves_the_oldest_batch_first_whatever_the_arrival_order() -> None:
    """Calls of a batch that started earlier go before those of a later one that asked
    first, so that one batch ends while the others keep the connections busy."""
    limiter = Limiter(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def hold(name: str, since: float | None) -> None:
        async with limiter.turn(since):
            order.append(name)
            await gate.wait()

    tasks = [asyncio.create_task(hold("first", None))]
    await asyncio.sleep(0.01)
    for name, since in (("late-1", 20.0), ("early-1", 10.0), ("late-2", 20.0), ("early-2", 10.0)):
        tasks.append(asyncio.create_task(hold(name, since)))
        await asyncio.sleep(0)
    tasks[2].cancel()  # early-1 gives up: it takes no turn
    await asyncio.sleep(0.01)
    gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == ["first", "early-2", "late-1", "late-2"] and limiter.in_use == 0


def test_a_server_going_away_or_starting_up_is_waited_for_a_broken_statement_is_not() -> None:
    """Answers in hand are kept through these (handlers._keep_answers), not through bugs."""
    from asyncpg import exceptions as pg

    from services.delivery.handlers import database_unreachable

    assert database_unreachable(pg.CannotConnectNowError("the database system is starting up"))
    assert database_unreachable(pg.AdminShutdownError("terminating connection"))
    assert database_unreachable(ConnectionRefusedError(111, "Connect call failed"))
    assert not database_unreachable(pg.UniqueViolationError("duplicate key"))
    assert not database_unreachable(ValueError("a bug"))
