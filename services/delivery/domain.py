"""Delivery's rules: which channel a touch goes out on, what it says, what it may cost.

Pure Python over plain data: no database, no HTTP. The handlers feed it what
they loaded and carry out what it decides.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from shared.events import MessageContent, TouchDue

# Failure reasons beyond the shared ones (delivery.failed carries `Reason | str`).
TEMPLATE = "template"
NO_CONTENT = "no_content"

SIGNATURE_PREFIX = "sha256="
_COUPON_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud and typed
COUPON_LENGTH = 16  # 32**16 = 2**80 codes


@dataclass(frozen=True, slots=True)
class Contact:
    """Delivery's copy of a user's contact state, from the users topic."""

    user_id: str
    addresses: Mapping[str, str] = field(default_factory=dict)
    consent: Mapping[str, bool] = field(default_factory=dict)
    erased: bool = False


@dataclass(frozen=True, slots=True)
class ChannelTerms:
    """What the rules need to know of a configured channel."""

    configured: bool
    cost: float
    budget: float | None
    reserve_share: float


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body: str


class TemplateError(ValueError):
    """A template could not be filled: a variable is missing or a placeholder is malformed."""


def candidate_channels(due: TouchDue) -> list[str]:
    """The channels of a touch in order of preference, each once."""
    ordered = list(due.channels) or ([due.channel] if due.channel else [])
    return list(dict.fromkeys(ordered))


def lane_count(due: TouchDue) -> int:
    """How many channels a touch goes out on at once: `parallel`, at most its channels."""
    return max(1, min(due.parallel, len(candidate_channels(due))))


def unavailable_reason(
    contact: Contact | None, channel: str, terms: Mapping[str, ChannelTerms]
) -> str | None:
    """Why `channel` cannot carry a touch to this user now, or None when it can."""
    if contact is not None and contact.erased:
        return "erased"
    if contact is None or not contact.consent.get(channel, False):
        return "no_consent"
    if not contact.addresses.get(channel):
        return "no_consent"
    channel_terms = terms.get(channel)
    if channel_terms is None or not channel_terms.configured:
        return "provider_failed"
    return None


def render(content: MessageContent, variables: Mapping[str, str]) -> Rendered:
    """`${name}` substitution only: no expressions, attribute access or code from a template."""
    try:
        return Rendered(
            subject=_fill(content.subject, variables), body=_fill(content.body, variables)
        )
    except KeyError as exc:
        raise TemplateError(f"missing variable {exc.args[0]!r}") from None
    except ValueError as exc:
        raise TemplateError(f"malformed placeholder: {exc}") from None


def _fill(template: str, variables: Mapping[str, str]) -> str:
    # Without a `$` there is nothing to substitute (and nothing malformed): every touch
    # of a wave renders the same subject, often a plain one.
    if "$" not in template:
        return template
    return string.Template(template).substitute(variables)


def new_coupon_code() -> str:
    """Unique in practice (80 random bits) and unguessable (from `secrets`).

    One read of the system's random source per code: 32 letters is 5 bits, and 256 is a
    multiple of 32, so each byte taken modulo 32 is a uniform letter (no bias). Drawing
    each letter with `secrets.choice` read the source 16 times (~100 us a code).
    """
    return "".join(_COUPON_ALPHABET[b % 32] for b in secrets.token_bytes(COUPON_LENGTH))


def template_variables(due: TouchDue, coupon_code: str | None) -> dict[str, str]:
    values = {
        **due.variables,
        "user_id": due.user_id,
        "promotion_id": due.promotion_id,
        "wave": due.wave,
    }
    if coupon_code is not None:
        values["coupon"] = coupon_code
    return values


# -- budget ---------------------------------------------------------------------


class Ledger:
    """Spend per (promotion, channel) while a batch is decided; the store persists it.

    A regular send may use the budget up to its reserve; a fallback (the
    unexpected: the preferred channel failed) may use the reserve as well.
    `delta` is what this batch added (or gave back) per key: the store adds it to
    the stored spend, so keys that were not read under a lock (channels without a
    budget) are counted right however many batches run at once.
    """

    def __init__(
        self, spent: Mapping[tuple[str, str], float], terms: Mapping[str, ChannelTerms]
    ) -> None:
        self.spent: dict[tuple[str, str], float] = dict(spent)
        self.terms = terms
        self.delta: dict[tuple[str, str], float] = {}

    @property
    def changed(self) -> set[tuple[str, str]]:
        return set(self.delta)

    def limit(self, channel: str, *, fallback: bool) -> float | None:
        terms = self.terms[channel]
        if terms.budget is None:
            return None
        return terms.budget if fallback else terms.budget * (1.0 - terms.reserve_share)

    def has_room(self, promotion_id: str, channel: str, *, fallback: bool) -> bool:
        limit = self.limit(channel, fallback=fallback)
        if limit is None:
            return True
        cost = self.terms[channel].cost
        # A tolerance so that sums of float costs do not refuse the last affordable touch.
        return self.spent.get((promotion_id, channel), 0.0) + cost <= limit + 1e-9

    def charge(self, promotion_id: str, channel: str) -> float:
        cost = self.terms[channel].cost
        key = (promotion_id, channel)
        self.spent[key] = self.spent.get(key, 0.0) + cost
        self.delta[key] = self.delta.get(key, 0.0) + cost
        return cost

    def refund(self, promotion_id: str, channel: str, amount: float) -> None:
        key = (promotion_id, channel)
        before = self.spent.get(key, 0.0)
        if self.terms[channel].budget is None:
            # Not read from the store (see `delta`): give back exactly what was charged.
            self.spent[key] = before - amount
            self.delta[key] = self.delta.get(key, 0.0) - amount
            return
        self.spent[key] = max(0.0, before - amount)
        self.delta[key] = self.delta.get(key, 0.0) + self.spent[key] - before


@dataclass(frozen=True, slots=True)
class Send:
    channel: str
    fallback: bool


@dataclass(frozen=True, slots=True)
class Fail:
    reason: str
    detail: str


def choose_channel(
    due: TouchDue,
    contact: Contact | None,
    terms: Mapping[str, ChannelTerms],
    ledger: Ledger,
    tried: Sequence[str],
    taken: Collection[str] = (),
) -> Send | Fail:
    """The next channel for a touch, or why none is left.

    The first available channel in order of preference is taken when its budget
    for the promotion has room; otherwise a cheaper available channel with room;
    otherwise the touch is suppressed with reason `budget`. Channels in `tried`
    failed before (provider errors): the touch falls back along its list. Channels in
    `taken` belong to the other lanes of a parallel touch and are skipped.
    """
    fallback = bool(tried)
    available: list[str] = []
    reasons: list[str] = []
    for channel in candidate_channels(due):
        if channel in tried or channel in taken:
            continue
        reason = unavailable_reason(contact, channel, terms)
        if reason is None:
            if channel not in due.content:
                reasons.append(NO_CONTENT)
                continue
            available.append(channel)
        else:
            reasons.append(reason)
    if not available:
        if contact is not None and contact.erased:
            return Fail("erased", "the user was erased")
        if fallback:
            return Fail("provider_failed", f"every channel failed: {', '.join(tried)}")
        for reason in ("provider_failed", NO_CONTENT, "no_consent"):
            if reason in reasons:
                return Fail(reason, _detail(reason, due))
        if taken:
            return Fail("no_consent", "every channel is taken by the other parallel sends")
        return Fail("no_consent", "the touch names no channel")
    preferred = available[0]
    if ledger.has_room(due.promotion_id, preferred, fallback=fallback):
        return Send(preferred, fallback)
    cost = terms[preferred].cost
    for channel in available[1:]:
        if terms[channel].cost < cost and ledger.has_room(
            due.promotion_id, channel, fallback=fallback
        ):
            return Send(channel, fallback)
    return Fail("budget", f"the budget of {preferred} for promotion {due.promotion_id} is spent")


def _detail(reason: str, due: TouchDue) -> str:
    channels = ", ".join(candidate_channels(due))
    if reason == "provider_failed":
        return f"no provider configured for any consented channel of {channels}"
    if reason == NO_CONTENT:
        return f"the touch carries no content for its consented channels ({channels})"
    return f"no consent or address for {channels}"


# -- retries --------------------------------------------------------------------


def backoff_delay(
    attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, base * 2**(attempt-1))]."""
    ceiling = min(max_s, base_s * (2 ** max(0, attempt - 1)))
    return (rng or _rng).uniform(0.0, ceiling)


_rng = random.Random()


def retry_delay(
    attempt: int,
    retry_after_s: float | None,
    *,
    base_s: float,
    max_s: float,
    retry_after_max_s: float,
    rng: random.Random | None = None,
) -> float:
    """The wait before the next try: the jittered backoff, never less than Retry-After."""
    delay = backoff_delay(attempt, base_s=base_s, max_s=max_s, rng=rng)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, retry_after_max_s))
    return delay


# -- receipts -------------------------------------------------------------------


def sign(secret: bytes, body: bytes) -> str:
    return SIGNATURE_PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_valid(secret: bytes, body: bytes, header: str | None) -> bool:
    """`sha256=<hex HMAC-SHA256 of the raw body>`, compared in constant time."""
    if not header or not header.startswith(SIGNATURE_PREFIX):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().lower().encode())
