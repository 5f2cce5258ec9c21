"""Delivery's event handlers and commands.

A batch of `touch.due` events is delivered in rounds. Each round first commits
what it is about to do - the channel of each call, its reserved cost, the
coupon - and only then calls the providers, all at once (bounded by the
runtime's limiter); the next round's transaction settles the answers and
records the fallbacks. A crash after a call and before its settlement leaves
the touch in `sending`: the redelivered event repeats that very call with the
same Idempotency-Key, and a touch once `sent` or `failed` is never called again. A
database that is down or restarting when the answers come back costs no second call:
the answers are kept and their round is written once the database is back
(`_keep_answers`). A call that raises anything unexpected is a failed try of its lane
alone.

A touch with `parallel` = n goes out on n channels at once: n lanes, each a call of its
own with its own fallback along the rest of the list (a lane never takes a channel
another lane holds, tried or accepted). Lane 0 is the `deliveries` row and calls with
Idempotency-Key `<touch id>`; lanes 1.. are `parallel_sends` rows and call with
`<touch id>:<channel>`, so the keys of one touch differ per provider call. Each lane is
settled once, like a touch: a redelivery repeats only the calls still `sending`. Every
accepted lane reports `delivery.sent` (one per channel; scheduling counts the touch
once); `delivery.failed` is reported only when every lane failed, by the last to end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import orjson
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Integer,
    String,
    Table,
    TextClause,
    any_,
    bindparam,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from services.delivery import domain, store
from services.delivery.domain import Contact, Fail, Ledger, Send
from services.delivery.providers.base import OutboundMessage
from services.delivery.providers.client import Outcome
from services.delivery.runtime import DeliveryRuntime
from shared.consumer import is_transient
from shared.db import UtcDateTime, insert_ignore, upsert
from shared.events import (
    DeliveryBounced,
    DeliveryFailed,
    DeliverySent,
    EngagementRecorded,
    Event,
    EventData,
    TouchDue,
    UserErased,
    UserUpdated,
)
from shared.logs import mask_value
from shared.service import ServiceContext

log = logging.getLogger(__name__)

ReceiptKind = Literal["delivered", "opened", "clicked", "bounced", "complained", "unsubscribed"]


# -- users ----------------------------------------------------------------------


async def on_user_updated(ctx: ServiceContext, event: Event[Any]) -> None:
    user: UserUpdated = event.data
    c = store.contacts
    insert = postgresql.insert(c)
    stmt = insert.on_conflict_do_update(
        index_elements=["user_id"],
        set_={name: insert.excluded[name] for name in ("addresses", "consent", "updated_at")},
        # An erased user stays erased: a late update must not bring the addresses back.
        where=c.c.erased.is_(False),
    )
    async with ctx.db.begin() as conn:
        await conn.execute(
            stmt,
            {
                "user_id": user.user_id,
                "addresses": dict(user.addresses),
                "consent": dict(user.consent),
                "erased": False,
                "updated_at": ctx.clock.now(),
            },
        )


async def on_user_erased(ctx: ServiceContext, rt: DeliveryRuntime, event: Event[Any]) -> None:
    erased: UserErased = event.data
    rt.erased.add(erased.user_id)
    async with ctx.db.begin() as conn:
        await conn.execute(
            upsert(store.contacts, ["user_id"]),
            {
                "user_id": erased.user_id,
                "addresses": {},
                "consent": {},
                "erased": True,
                "updated_at": ctx.clock.now(),
            },
        )
    log.info("contact erased", extra={"user_id": erased.user_id})


async def load_contacts(conn: AsyncConnection, user_ids: Iterable[str]) -> dict[str, Contact]:
    c = store.contacts
    rows = (await conn.execute(select(c).where(_among(conn, c.c.user_id, user_ids)))).all()
    return {
        r.user_id: Contact(r.user_id, dict(r.addresses), dict(r.consent), bool(r.erased))
        for r in rows
    }


# -- touches --------------------------------------------------------------------


@dataclass
class Group:
    """The lanes of one touch: which lane holds which channel, and how the lanes ended."""

    holders: dict[str, int] = field(default_factory=dict)
    open: int = 0
    accepted: int = 0
    coupon: str | None = None

    def hold(self, lane: int, *channels: str | None) -> None:
        for channel in channels:
            if channel:
                self.holders.setdefault(channel, lane)

    def taken(self, lane: int) -> set[str]:
        """Channels held by the other lanes."""
        return {c for c, holder in self.holders.items() if holder != lane}


@dataclass
class Work:
    """One lane of a touch (the touch itself unless it is parallel) through the rounds."""

    due: TouchDue
    contact: Contact | None
    row_exists: bool
    lane: int = 0
    group: Group = field(default_factory=Group)
    coupon: str | None = None
    tried: list[str] = field(default_factory=list)
    attempts: int = 0
    channel: str | None = None
    cost: float = 0.0
    # A call recorded by an earlier process that may have gone out: repeat it first.
    resume: bool = False
    message: OutboundMessage | None = None
    outcome: Outcome | None = None


@dataclass
class Round:
    """What one transaction writes."""

    inserts: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    lane_inserts: list[dict[str, Any]] = field(default_factory=list)
    lane_updates: list[dict[str, Any]] = field(default_factory=list)
    events: list[EventData] = field(default_factory=list)
    sent: dict[tuple[str, str], int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    # Spend rows this transaction inserted: known to exist once it commits.
    created_spend: set[tuple[str, str]] = field(default_factory=set)
    # Metrics (channel, status, reason) and log lines (level, message, extra): for after
    # the commit, so that a round written again counts and says each thing once.
    counts: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)


async def on_touches_due(
    ctx: ServiceContext, rt: DeliveryRuntime, events: Sequence[Event[Any]]
) -> None:
    """Deliver a batch of due touches: settle each one as sent or failed, exactly once.

    Its calls wait for the limiters' turns placed at the moment the batch started, so
    the oldest batch's calls go first (`Limiter`): one partition's batch ends (its last
    retries, the round that records the answers) while the other partitions' calls keep
    the connections busy, instead of all of them waiting at once.
    """
    since = time.monotonic()
    unique: dict[str, TouchDue] = {}
    for event in events:
        unique.setdefault(event.data.touch_id, event.data)
    dues = list(unique.values())
    d, p = store.deliveries, store.parallel_sends
    touch_ids = [t.touch_id for t in dues]
    async with ctx.db.connect() as conn:
        rows = {
            r.touch_id: r
            for r in (
                await conn.execute(select(d).where(_among(conn, d.c.touch_id, touch_ids)))
            ).all()
        }
        # Lanes beyond the first exist only for parallel touches: most batches have none.
        parallel = [t.touch_id for t in dues if domain.lane_count(t) > 1]
        lane_rows = {
            (r.touch_id, r.lane): r
            for r in (
                await conn.execute(select(p).where(_among(conn, p.c.touch_id, parallel)))
                if parallel
                else []
            )
        }
        contacts = await load_contacts(conn, (t.user_id for t in dues))
    pending: list[Work] = []
    for due in dues:
        first = rows.get(due.touch_id)
        group = Group()
        lanes: list[tuple[int, Any]] = []
        for lane in range(domain.lane_count(due)):
            row = first if lane == 0 else lane_rows.get((due.touch_id, lane))
            if row is None and lane > 0 and first is not None:
                continue  # the touch was decided without this lane: never call it now
            lanes.append((lane, row))
            if row is not None:
                group.hold(lane, *(row.tried or []), row.channel)
                group.accepted += int(row.status == "sent")
                group.coupon = group.coupon or row.coupon_code
        for lane, row in lanes:
            if row is not None and row.status != "sending":
                continue  # settled before: a redelivery never calls again
            work = Work(
                due, contacts.get(due.user_id), row_exists=row is not None, lane=lane, group=group
            )
            group.open += 1
            if row is not None:
                work.coupon = row.coupon_code
                work.tried = list(row.tried or [])
                work.attempts = row.attempts
                work.channel = row.channel
                work.cost = row.cost or 0.0
                work.resume = row.channel is not None
            pending.append(work)
    wait_s = rt.config.consent_wait_s
    ready: list[Work] = []
    waiting: list[Work] = []
    for work in pending:
        (waiting if wait_s > 0 and _waits_for_consent(work, rt) else ready).append(work)
    if not waiting:
        await _deliver(ctx, rt, ready, since)
        return
    await asyncio.gather(
        _deliver(ctx, rt, ready, since), _deliver_later(ctx, rt, waiting, wait_s, since)
    )


def _waits_for_consent(work: Work, rt: DeliveryRuntime) -> bool:
    """A new touch none of whose channels has consent and an address (yet): see `_deliver_later`."""
    if work.row_exists or work.tried or work.group.holders:
        return False
    contact = work.contact
    if contact is not None and contact.erased:
        return False
    return all(
        domain.unavailable_reason(contact, channel, rt.terms) == "no_consent"
        for channel in domain.candidate_channels(work.due)
    )


async def _deliver_later(
    ctx: ServiceContext, rt: DeliveryRuntime, works: list[Work], wait_s: float, since: float
) -> None:
    """The consent race: wait briefly for the `user.updated` that grants consent.

    `touch.due` (topic touches) and the `user.updated` that gave the consent it was planned
    on (topic users) are not ordered with each other, so a touch may arrive first. It then
    waits `consent_wait_s` (while the rest of the batch goes on), its contact is read again,
    and only then it is decided as usual: no consent and address by then is `no_consent`.
    Delivery never sends on the strength of the touch alone: the touch carries no address,
    and a withdrawal that raced the touch must win.
    """
    await asyncio.sleep(wait_s)
    async with ctx.db.connect() as conn:
        contacts = await load_contacts(conn, (w.due.user_id for w in works))
    for work in works:
        work.contact = contacts.get(work.due.user_id)
    await _deliver(ctx, rt, works, since)


async def _deliver(
    ctx: ServiceContext, rt: DeliveryRuntime, pending: list[Work], since: float
) -> None:
    """Rounds until every lane is settled: record, call, settle, fall back.

    `since`: when the batch started, the place of its calls in the limiters' queues."""
    in_flight: list[Work] = []
    while pending or in_flight:
        if in_flight:
            to_call = await _keep_answers(ctx, rt, settle=in_flight, decide=pending)
        else:
            try:
                to_call = await _round(ctx, rt, settle=[], decide=pending)
            except _CommitUnknown as exc:
                # No call made yet: the redelivered batch reads whatever was stored.
                raise (exc.__cause__ or exc) from None
        pending = []
        if not to_call:
            break
        outcomes = await asyncio.gather(*(_call(rt, w, since) for w in to_call))
        for work, outcome in zip(to_call, outcomes, strict=True):
            work.outcome = outcome
        in_flight = to_call


async def _call(rt: DeliveryRuntime, work: Work, since: float) -> Outcome:
    """One lane's call; whatever goes wrong in it is a failed call of that lane alone."""
    assert work.message is not None and work.channel is not None
    user_id = work.due.user_id
    try:
        return await rt.providers[work.channel].deliver(
            work.message, keep_going=lambda: user_id not in rt.erased, since=since
        )
    except Exception as exc:
        # A bug in an adapter or the transport: the other calls of the batch settle as
        # usual, this lane falls back by the rules (it may have reached the provider, so
        # it counts as a call).
        log.exception(
            "provider call failed unexpectedly",
            extra={"channel": work.channel, "touch_id": work.due.touch_id},
        )
        return Outcome("failed", 1, error=f"unexpected: {type(exc).__name__}")


class _CommitUnknown(Exception):
    """The connection broke during COMMIT: the round's writes may or may not be stored."""

    def __init__(self, todo: Round, to_call: list[Work]) -> None:
        super().__init__("the commit of a delivery round was not acknowledged")
        self.todo = todo
        self.to_call = to_call


async def _keep_answers(
    ctx: ServiceContext, rt: DeliveryRuntime, *, settle: list[Work], decide: list[Work]
) -> list[Work]:
    """`_round` for answers in hand: while the database cannot take them, wait and retry.

    The calls behind `settle` were made; redoing the batch from its event would make them
    again (same Idempotency-Key, but a second send for a provider that does not keep
    keys). So a round that fails because the database is unreachable is computed again
    from the state the lanes had before it (`_Snapshot`: a failed attempt's changes to
    the lanes are dropped with its transaction) and written again, with backoff, for up
    to `settle_retry_s`; only then does the error reach the consumer. A commit whose
    acknowledgement was lost is looked up before anything is written again
    (`_round_stored`), so a round is never applied twice.
    """
    config = rt.config
    deadline = time.monotonic() + config.settle_retry_s
    snapshot = _Snapshot(settle + decide)
    unknown: _CommitUnknown | None = None
    attempt = 0
    while True:
        try:
            if unknown is not None:
                async with ctx.db.connect() as conn:
                    stored = await _round_stored(conn, unknown.todo)
                if stored:
                    _after_commit(ctx, rt, unknown.todo)
                    return unknown.to_call
                snapshot.restore()
                unknown = None
            return await _round(ctx, rt, settle=settle, decide=decide)
        except Exception as exc:
            if isinstance(exc, _CommitUnknown):
                unknown, cause = exc, exc.__cause__ or exc
            else:
                cause = exc
                if unknown is None:
                    snapshot.restore()
            attempt += 1
            if not database_unreachable(cause) or time.monotonic() >= deadline:
                if unknown is not None:
                    snapshot.restore()
                rt.settle_retry("gave_up")
                log.error(
                    "cannot record provider answers; the batch will be redelivered",
                    extra={"calls": len(settle), "attempts": attempt, "error": _name(cause)},
                )
                raise cause from None
            rt.settle_retry("retried")
            log.warning(
                "cannot record provider answers yet; keeping them and retrying",
                extra={"calls": len(settle), "attempt": attempt, "error": _name(cause)},
            )
            await asyncio.sleep(
                domain.backoff_delay(
                    attempt, base_s=config.settle_backoff_s, max_s=config.settle_backoff_max_s
                )
            )


def _name(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    return type(exc).__name__ + (f" ({type(orig).__name__})" if orig is not None else "")


def database_unreachable(exc: BaseException) -> bool:
    """A server that went away or restarts (the consumer's transient errors)."""
    return is_transient(exc)


class _Snapshot:
    """The state of some lanes (and of their touches' groups) to go back to."""

    def __init__(self, works: list[Work]) -> None:
        self.works = [
            (
                w,
                list(w.tried),
                w.attempts,
                w.channel,
                w.cost,
                w.resume,
                w.message,
                w.coupon,
                w.row_exists,
                w.outcome,
            )
            for w in works
        ]
        groups = {id(w.group): w.group for w in works}
        self.groups = [(g, dict(g.holders), g.open, g.accepted, g.coupon) for g in groups.values()]

    def restore(self) -> None:
        for (
            w,
            tried,
            attempts,
            channel,
            cost,
            resume,
            message,
            coupon,
            exists,
            outcome,
        ) in self.works:
            w.tried = list(tried)
            w.attempts, w.channel, w.cost, w.resume = attempts, channel, cost, resume
            w.message, w.coupon, w.row_exists, w.outcome = message, coupon, exists, outcome
        for g, holders, open_, accepted, coupon in self.groups:
            g.holders = dict(holders)
            g.open, g.accepted, g.coupon = open_, accepted, coupon


async def _round_stored(conn: AsyncConnection, todo: Round) -> bool:
    """Whether a round whose commit went unacknowledged is in the tables.

    Its rows were written in one transaction, so one of them tells: an inserted row
    exists, an updated row holds what the round wrote (every round changes the status,
    channel, attempts or tried channels of each row it writes).
    """
    d, p = store.deliveries, store.parallel_sends
    if todo.inserts or todo.updates:
        written = todo.inserts[0] if todo.inserts else todo.updates[0]
        key = written.get("touch_id", written.get("b_touch_id"))
        row = (await conn.execute(select(d).where(d.c.touch_id == key))).first()
        if todo.inserts:
            return row is not None
    elif todo.lane_inserts or todo.lane_updates:
        written = todo.lane_inserts[0] if todo.lane_inserts else todo.lane_updates[0]
        key = written.get("touch_id", written.get("b_touch_id"))
        lane = written.get("lane", written.get("b_lane"))
        row = (
            await conn.execute(select(p).where(p.c.touch_id == key).where(p.c.lane == lane))
        ).first()
        if todo.lane_inserts:
            return row is not None
    else:
        return False
    return (
        row is not None
        and all(getattr(row, name) == written[name] for name in ("status", "channel", "attempts"))
        and list(row.tried or []) == list(written["tried"])
    )


async def _round(
    ctx: ServiceContext, rt: DeliveryRuntime, *, settle: list[Work], decide: list[Work]
) -> list[Work]:
    """One transaction: settle the answers of the last calls, decide and record the next.

    It changes the lanes in memory as it goes (see `_Snapshot` for going back); what it
    does beyond the database (metrics, logs, the outbox's wake-up) waits for the commit.
    """
    now = ctx.clock.now()
    todo = Round()
    decide = list(decide)
    for work in settle:
        if _settle(work, todo, now):
            decide.append(work)
    to_call: list[Work] = []
    committing = False
    try:
        async with ctx.db.begin() as conn:
            erased = await _erased_now(conn, rt, (w.due.user_id for w in decide))
            ledger = await _lock_ledger(conn, rt, settle + decide, todo.created_spend)
            for work in settle:
                if work.outcome is not None and not work.outcome.accepted and work.cost:
                    ledger.refund(work.due.promotion_id, work.tried[-1], work.cost)
                    work.cost = 0.0
            for work in decide:
                if work.due.user_id in erased:
                    _fail(work, todo, now, "erased", "the user was erased")
                    continue
                if _decide(rt, work, ledger, todo, now):
                    to_call.append(work)
            await _write(conn, todo)
            await ctx.outbox.add(conn, todo.events, now=now)
            await _write_spend(conn, rt, ledger, todo)
            committing = True
    except Exception as exc:
        if committing:
            raise _CommitUnknown(todo, to_call) from exc
        raise
    _after_commit(ctx, rt, todo)
    return to_call


def _after_commit(ctx: ServiceContext, rt: DeliveryRuntime, todo: Round) -> None:
    rt.spend_rows |= todo.created_spend
    for channel, status, reason in todo.counts:
        rt.count(channel, status, reason)
    for level, message, extra in todo.notes:
        log.log(level, message, extra=extra)
    if todo.events:
        ctx.outbox.notify()


def _settle(work: Work, todo: Round, now: datetime) -> bool:
    """Record one call's answer; True when the touch needs another channel."""
    outcome = work.outcome
    assert outcome is not None and work.channel is not None
    work.attempts += outcome.calls
    channel = work.channel
    if outcome.accepted:
        todo.accepted[channel] = todo.accepted.get(channel, 0) + 1
        key = (work.due.promotion_id, channel)
        todo.sent[key] = todo.sent.get(key, 0) + 1
        work.group.accepted += 1
        work.group.open -= 1
        _record(work, todo, now, status="sent", provider_message_id=outcome.provider_message_id)
        todo.events.append(
            DeliverySent(
                **_touch_fields(work.due),
                channel=channel,
                at=now,
                cost=work.cost,
                provider_message_id=outcome.provider_message_id,
                attempts=work.attempts,
            )
        )
        todo.counts.append((channel, "sent", ""))
        return False
    if outcome.calls:
        todo.failed[channel] = todo.failed.get(channel, 0) + 1
    work.tried.append(channel)
    work.resume = False
    if outcome.verdict == "stopped":
        work.channel = None
        return True  # the next decision sees the erasure
    todo.notes.append(
        (
            logging.WARNING,
            "provider did not accept a touch; falling back",
            {
                "channel": channel,
                "touch_id": work.due.touch_id,
                "verdict": outcome.verdict,
                "error": outcome.error,
            },
        )
    )
    return True


def _decide(rt: DeliveryRuntime, work: Work, ledger: Ledger, todo: Round, now: datetime) -> bool:
    """Choose, render and record the next call of a touch; True when there is one to make."""
    due = work.due
    if work.resume and work.channel is not None:
        reason = domain.unavailable_reason(work.contact, work.channel, rt.terms)
        if reason is None and work.channel in due.content:
            # Recorded (and charged) by an earlier process: repeat the same call.
            return _prepare(rt, work, todo, now, record=False)
        if work.cost:
            ledger.refund(due.promotion_id, work.channel, work.cost)
            work.cost = 0.0
        work.resume = False
    choice = domain.choose_channel(
        due, work.contact, rt.terms, ledger, work.tried, taken=work.group.taken(work.lane)
    )
    if isinstance(choice, Fail):
        _fail(work, todo, now, choice.reason, choice.detail)
        return False
    assert isinstance(choice, Send)
    work.channel = choice.channel
    work.group.hold(work.lane, choice.channel)
    if due.coupon and work.coupon is None:
        # One coupon per touch, whichever channels carry it.
        work.coupon = work.group.coupon or domain.new_coupon_code()
        work.group.coupon = work.coupon
    cost = work.cost = ledger.charge(due.promotion_id, choice.channel)
    if not _prepare(rt, work, todo, now, record=True):
        ledger.refund(due.promotion_id, choice.channel, cost)
        return False
    return True


def _prepare(rt: DeliveryRuntime, work: Work, todo: Round, now: datetime, *, record: bool) -> bool:
    due, channel, contact = work.due, work.channel, work.contact
    assert channel is not None and contact is not None
    try:
        rendered = domain.render(
            due.content[channel],  # type: ignore[index]
            domain.template_variables(due, work.coupon),
        )
    except domain.TemplateError as exc:
        _fail(work, todo, now, domain.TEMPLATE, f"{channel}: {exc}")
        return False
    work.message = OutboundMessage(
        id=due.touch_id,
        channel=channel,
        to=contact.addresses[channel],
        user_id=due.user_id,
        promotion_id=due.promotion_id,
        wave=due.wave,
        variant=due.variant,
        subject=rendered.subject,
        body=rendered.body,
        idempotency_key=idempotency_key(due.touch_id, work.lane, channel),
    )
    if record:
        _record(work, todo, now, status="sending")
    return True


def idempotency_key(touch_id: str, lane: int, channel: str) -> str | None:
    """None (the touch id) for lane 0; `<touch id>:<channel>` for the extra parallel lanes.

    No two lanes of a touch ever call the same channel, so the keys of one touch are
    distinct per provider call, and a repeated call (a resumed lane) has the same key.
    """
    return None if lane == 0 else f"{touch_id}:{channel}"


def _record(work: Work, todo: Round, now: datetime, **values: Any) -> None:
    """Write the lane's row: `deliveries` for lane 0, `parallel_sends` for the others."""
    if work.lane == 0:
        if work.row_exists:
            todo.updates.append(_row(work, now, **values))
        else:
            todo.inserts.append(_new_row(work, now, **values))
    else:
        row = _lane_row(work, now, **values)
        if work.row_exists:
            todo.lane_updates.append({"b_touch_id": work.due.touch_id, "b_lane": work.lane, **row})
        else:
            todo.lane_inserts.append({"touch_id": work.due.touch_id, "lane": work.lane, **row})
    work.row_exists = True


def _fail(work: Work, todo: Round, now: datetime, reason: str, detail: str) -> None:
    channel = work.tried[-1] if work.tried else work.channel
    work.channel = channel
    work.cost = 0.0
    _record(work, todo, now, status="failed", reason=reason, detail=detail)
    work.group.open -= 1
    if work.group.open <= 0 and not work.group.accepted:
        # The last lane of the touch to end, and none was accepted: the touch failed.
        todo.events.append(
            DeliveryFailed(
                **_touch_fields(work.due),
                channel=channel,
                at=now,
                reason=reason,
            )
        )
    todo.counts.append((channel or "", "failed", reason))
    todo.notes.append(
        (
            logging.INFO,
            "touch failed",
            {"touch_id": work.due.touch_id, "reason": reason, "detail": mask_value(detail)},
        )
    )


def _touch_fields(due: TouchDue) -> dict[str, Any]:
    return {
        "touch_id": due.touch_id,
        "user_id": due.user_id,
        "promotion_id": due.promotion_id,
        "wave": due.wave,
        "variant": due.variant,
    }


def _new_row(work: Work, now: datetime, **values: Any) -> dict[str, Any]:
    due = work.due
    return {
        "touch_id": due.touch_id,
        "user_id": due.user_id,
        "promotion_id": due.promotion_id,
        "wave": due.wave,
        "variant": due.variant,
        "channel": work.channel,
        "status": values.get("status"),
        "attempts": work.attempts,
        "reason": values.get("reason"),
        "detail": (values.get("detail") or "")[:500] or None,
        "cost": work.cost,
        "provider_message_id": None,
        "coupon_code": work.coupon,
        "tried": list(work.tried),
        "due_at": due.due_at,
        "created_at": now,
        "updated_at": now,
    }


def _row(work: Work, now: datetime, **values: Any) -> dict[str, Any]:
    """The columns an update writes (bound as `b_<column>`)."""
    return {
        "b_touch_id": work.due.touch_id,
        "channel": work.channel,
        "status": values["status"],
        "attempts": work.attempts,
        "reason": values.get("reason"),
        "detail": (values.get("detail") or "")[:500] or None,
        "cost": work.cost,
        "provider_message_id": values.get("provider_message_id"),
        "coupon_code": work.coupon,
        "tried": list(work.tried),
        "updated_at": now,
    }


def _lane_row(work: Work, now: datetime, **values: Any) -> dict[str, Any]:
    return {
        "channel": work.channel,
        "status": values["status"],
        "attempts": work.attempts,
        "reason": values.get("reason"),
        "cost": work.cost,
        "provider_message_id": values.get("provider_message_id"),
        "coupon_code": work.coupon,
        "tried": list(work.tried),
        "updated_at": now,
    }


_LANE_COLUMNS = (
    "channel",
    "status",
    "attempts",
    "reason",
    "cost",
    "provider_message_id",
    "coupon_code",
    "tried",
    "updated_at",
)

_UPDATE_COLUMNS = (
    "channel",
    "status",
    "attempts",
    "reason",
    "detail",
    "cost",
    "provider_message_id",
    "coupon_code",
    "tried",
    "updated_at",
)


async def _erased_now(conn: AsyncConnection, rt: DeliveryRuntime, users: Iterable[str]) -> set[str]:
    """Erased users among `users`: this process's knowledge and the table's (other replicas)."""
    wanted = set(users)
    if not wanted:
        return set()
    c = store.contacts
    rows = await conn.execute(
        select(c.c.user_id).where(_among(conn, c.c.user_id, wanted)).where(c.c.erased.is_(True))
    )
    return {r.user_id for r in rows} | (wanted & rt.erased)


async def _lock_ledger(
    conn: AsyncConnection, rt: DeliveryRuntime, works: list[Work], created: set[tuple[str, str]]
) -> Ledger:
    """Spend of every budgeted (promotion, channel) the batch may touch, locked until commit.

    Channels without a budget are neither read nor locked: nothing is decided on their
    spend, and `_write` adds this batch's share to it at the end of the transaction. So
    the batches of a promotion (every partition sends for the same promotion) wait for
    each other only where a budget has to be checked, and then only on those rows.
    """
    promotions = sorted({w.due.promotion_id for w in works})
    budgeted = sorted(name for name, terms in rt.terms.items() if terms.budget is not None)
    if not promotions or not budgeted:
        return Ledger({}, rt.terms)
    s = store.spend
    keys = [(p, c) for p in promotions for c in budgeted]
    await _ensure_spend_rows(conn, rt, keys, created)
    rows = await conn.execute(
        select(s.c.promotion_id, s.c.channel, s.c.spent)
        .where(s.c.promotion_id.in_(promotions))
        .where(s.c.channel.in_(budgeted))
        .order_by(s.c.promotion_id, s.c.channel)
        .with_for_update()
    )
    return Ledger({(r.promotion_id, r.channel): float(r.spent) for r in rows}, rt.terms)


def _among(conn: AsyncConnection, column: Any, values: Iterable[str]) -> Any:
    """`column IN values`; on PostgreSQL `column = ANY(:array)`: one statement text (and one
    prepared statement) whatever the number of values, and no bind rendered per value."""
    wanted = list(set(values))
    if conn.dialect.name == "postgresql":
        return column == any_(bindparam(None, wanted, type_=postgresql.ARRAY(String)))
    return column.in_(wanted)


_PG_TYPES = {Integer: "int4", Float: "float8", Boolean: "bool", JSON: "json"}


def _pg_type(column: Column[Any]) -> str:
    if isinstance(column.type, UtcDateTime):
        return "timestamptz"
    for kind, name in _PG_TYPES.items():
        if isinstance(column.type, kind):
            return name
    return "text"


def _recordset(table: Table, names: Sequence[str]) -> str:
    columns = ", ".join(f"{n} {_pg_type(table.c[n])}" for n in names)
    return f"json_to_recordset(CAST(:rows AS json)) AS r({columns})"


def _recordset_insert(table: Table) -> TextClause:
    names = [c.name for c in table.columns]
    listed = ", ".join(names)
    return text(
        f"INSERT INTO {table.fullname} ({listed}) SELECT {listed} FROM {_recordset(table, names)}"
    )


def _recordset_update(table: Table, keys: Sequence[str], columns: Sequence[str]) -> TextClause:
    """UPDATE from rows keyed `b_<key>` (the shape `_write` binds for SQLite)."""
    sets = ", ".join(f"{n} = r.{n}" for n in columns)
    where = " AND ".join(f"t.{k} = r.b_{k}" for k in keys)
    fields = ", ".join(
        [f"b_{k} {_pg_type(table.c[k])}" for k in keys]
        + [f"{n} {_pg_type(table.c[n])}" for n in columns]
    )
    return text(
        f"UPDATE {table.fullname} AS t SET {sets}"
        f" FROM json_to_recordset(CAST(:rows AS json)) AS r({fields}) WHERE {where}"
    )


# PostgreSQL writes a round's rows of each kind as one statement with one JSON parameter
# (json_to_recordset): SQLAlchemy's executemany processed every bind of every row in Python
# (render, type processors, JSON columns through the json module), the largest share of
# delivery's CPU per touch after the HTTP call itself.
_PG_WRITES = {
    "inserts": _recordset_insert(store.deliveries),
    "updates": _recordset_update(store.deliveries, ["touch_id"], _UPDATE_COLUMNS),
    "lane_inserts": _recordset_insert(store.parallel_sends),
    "lane_updates": _recordset_update(store.parallel_sends, ["touch_id", "lane"], _LANE_COLUMNS),
}


async def _write(conn: AsyncConnection, todo: Round) -> None:
    if conn.dialect.name == "postgresql":
        for kind, statement in _PG_WRITES.items():
            rows = getattr(todo, kind)
            if rows:
                await conn.execute(statement, {"rows": orjson.dumps(rows).decode()})
        return
    d = store.deliveries
    if todo.inserts:
        await conn.execute(d.insert(), todo.inserts)
    if todo.updates:
        await conn.execute(
            update(d)
            .where(d.c.touch_id == bindparam("b_touch_id"))
            .values({name: bindparam(name) for name in _UPDATE_COLUMNS}),
            todo.updates,
        )
    p = store.parallel_sends
    if todo.lane_inserts:
        await conn.execute(p.insert(), todo.lane_inserts)
    if todo.lane_updates:
        await conn.execute(
            update(p)
            .where(p.c.touch_id == bindparam("b_touch_id"))
            .where(p.c.lane == bindparam("b_lane"))
            .values({name: bindparam(name) for name in _LANE_COLUMNS}),
            todo.lane_updates,
        )


async def _ensure_spend_rows(
    conn: AsyncConnection,
    rt: DeliveryRuntime,
    keys: list[tuple[str, str]],
    created: set[tuple[str, str]],
) -> None:
    """Create the spend rows not known to exist (rows are never deleted, so each promotion
    and channel costs this statement once per process, not once per transaction)."""
    missing = [key for key in keys if key not in rt.spend_rows]
    if not missing:
        return
    await conn.execute(
        insert_ignore(store.spend),
        [{"promotion_id": p, "channel": c, "spent": 0.0, "sent": 0} for p, c in missing],
    )
    # Remembered once the transaction commits (see `_round`).
    created.update(missing)


async def _write_spend(
    conn: AsyncConnection, rt: DeliveryRuntime, ledger: Ledger, todo: Round
) -> None:
    """Spend, sends and success counts: rows every batch shares, so written last.

    Each row is updated with an increment as the transaction's last statements, so a
    concurrent batch of the same promotion waits on them only for the commit.
    """
    s = store.spend
    changed = sorted(ledger.changed | set(todo.sent))
    if changed:
        await _ensure_spend_rows(conn, rt, changed, todo.created_spend)
        await conn.execute(
            update(s)
            .where(s.c.promotion_id == bindparam("b_promotion_id"))
            .where(s.c.channel == bindparam("b_channel"))
            .values(spent=s.c.spent + bindparam("b_spent"), sent=s.c.sent + bindparam("b_sent")),
            [
                {
                    "b_promotion_id": p,
                    "b_channel": c,
                    "b_spent": ledger.delta.get((p, c), 0.0),
                    "b_sent": todo.sent.get((p, c), 0),
                }
                for p, c in changed
            ],
        )
    stats = store.channel_stats
    for channel in sorted(set(todo.accepted) | set(todo.failed)):
        accepted, failed = todo.accepted.get(channel, 0), todo.failed.get(channel, 0)
        stmt = upsert(
            stats,
            ["channel"],
            {"accepted": stats.c.accepted + accepted, "failed": stats.c.failed + failed},
        )
        await conn.execute(stmt, {"channel": channel, "accepted": accepted, "failed": failed})


# -- receipts -------------------------------------------------------------------


class UnknownTouch(LookupError):
    pass


async def record_receipt(
    ctx: ServiceContext,
    receipt_id: str,
    kind: ReceiptKind,
    at: datetime,
    channel: str | None = None,
) -> bool:
    """Turn a provider receipt into an engagement; False when it was recorded before.

    `receipt_id` is the touch id, or the Idempotency-Key of a parallel lane
    (`<touch id>:<channel>`), which is what a provider that echoes the key sends back;
    `channel` names the lane as well. A receipt is recorded once per lane and kind,
    with the lane's channel: the push "opened" of a day-7 SMS + push touch counts for
    push, and does not hide the SMS "opened".
    """
    now = ctx.clock.now()
    async with ctx.db.begin() as conn:
        events = await _receipt_events(conn, receipt_id, kind, at, channel, now)
        if events is None:
            return False
        await ctx.outbox.add(conn, events, now=now)
    ctx.outbox.notify()
    return True


Receipt = tuple[str, ReceiptKind, datetime, str | None]  # id, kind, at, channel


async def record_receipts(ctx: ServiceContext, receipts: Sequence[Receipt]) -> list[bool | None]:
    """A provider's batch of receipts in one transaction, each as `record_receipt` would.

    Per receipt: True when recorded, False when recorded before, None when it names no
    delivery (the others are recorded all the same).
    """
    now = ctx.clock.now()
    outcomes: list[bool | None] = []
    events: list[EventData] = []
    async with ctx.db.begin() as conn:
        for receipt_id, kind, at, channel in receipts:
            try:
                new = await _receipt_events(conn, receipt_id, kind, at, channel, now)
            except UnknownTouch:
                outcomes.append(None)
                continue
            outcomes.append(new is not None)
            events.extend(new or ())
        if events:
            await ctx.outbox.add(conn, events, now=now)
    if events:
        ctx.outbox.notify()
    return outcomes


async def _receipt_events(
    conn: AsyncConnection,
    receipt_id: str,
    kind: ReceiptKind,
    at: datetime,
    channel: str | None,
    now: datetime,
) -> list[EventData] | None:
    """Store one receipt and return the events it makes; None when stored before.

    Raises UnknownTouch, having written nothing, when it names no delivery or lane."""
    d, p = store.deliveries, store.parallel_sends
    row = (await conn.execute(select(d).where(d.c.touch_id == receipt_id))).first()
    if row is None and ":" in receipt_id:
        touch_id, _, keyed = receipt_id.rpartition(":")
        if channel is not None and channel != keyed:
            raise UnknownTouch(receipt_id)
        channel = keyed
        row = (await conn.execute(select(d).where(d.c.touch_id == touch_id))).first()
    if row is None:
        raise UnknownTouch(receipt_id)
    sent_on, cost, key = row.channel, row.cost, row.touch_id
    if channel is not None and channel != row.channel:
        lane = (
            await conn.execute(
                select(p).where(p.c.touch_id == row.touch_id).where(p.c.channel == channel)
            )
        ).first()
        if lane is None:
            raise UnknownTouch(receipt_id)
        sent_on, cost, key = lane.channel, lane.cost, _lane_receipt_key(row.touch_id, channel)
    inserted = await conn.execute(
        insert_ignore(store.receipts),
        {"touch_id": key, "kind": kind, "at": at, "received_at": now},
    )
    if inserted.rowcount != 1:
        return None
    common: dict[str, Any] = {
        "touch_id": row.touch_id,
        "user_id": row.user_id,
        "promotion_id": row.promotion_id,
        "wave": row.wave,
        "channel": sent_on,
        "variant": row.variant,
    }
    events: list[EventData] = [EngagementRecorded(**common, kind=kind, at=at)]
    if kind == "bounced":
        events.append(DeliveryBounced(**common, at=at, cost=cost or 0.0))
    if kind in ("unsubscribed", "complained") and sent_on:
        await _withdraw_consent(conn, row.user_id, sent_on, now)
    return events


def _lane_receipt_key(touch_id: str, channel: str) -> str:
    """The receipts row key of a parallel lane; a digest where the key would not fit."""
    key = f"{touch_id}:{channel}"
    if len(key) <= RECEIPT_KEY_MAX:
        return key
    return hashlib.sha256(key.encode()).hexdigest()[:RECEIPT_KEY_MAX]


RECEIPT_KEY_MAX = 64  # receipts.touch_id


async def _withdraw_consent(
    conn: AsyncConnection, user_id: str, channel: str, now: datetime
) -> None:
    """Stop this channel at once; segmentation's next `user.updated` carries it too."""
    c = store.contacts
    row = (await conn.execute(select(c).where(c.c.user_id == user_id))).first()
    if row is None or row.erased:
        return
    consent = {**dict(row.consent), channel: False}
    await conn.execute(
        update(c).where(c.c.user_id == user_id).values(consent=consent, updated_at=now)
    )


# -- queries --------------------------------------------------------------------


async def user_deliveries(ctx: ServiceContext, user_id: str) -> list[dict[str, Any]]:
    """Every send of one user, oldest first: one entry per lane of a parallel touch."""
    d, p = store.deliveries, store.parallel_sends
    async with ctx.db.connect() as conn:
        rows = (
            await conn.execute(select(d).where(d.c.user_id == user_id).order_by(d.c.updated_at))
        ).all()
        lanes: dict[str, list[Any]] = {}
        ids = [r.touch_id for r in rows]
        for start in range(0, len(ids), 500):
            query = select(p).where(p.c.touch_id.in_(ids[start : start + 500]))
            for lane in (await conn.execute(query.order_by(p.c.lane))).all():
                lanes.setdefault(lane.touch_id, []).append(lane)
    listed = []
    for r in rows:
        for lane, row in [(0, r), *((x.lane, x) for x in lanes.get(r.touch_id, []))]:
            listed.append(
                {
                    "touch_id": r.touch_id,
                    "lane": lane,
                    "promotion_id": r.promotion_id,
                    "wave": r.wave,
                    "channel": row.channel,
                    "variant": r.variant,
                    "status": row.status,
                    "reason": row.reason,
                    "attempts": row.attempts,
                    "cost": row.cost or 0.0,
                    "provider_message_id": row.provider_message_id,
                    "coupon_code": row.coupon_code,
                    "tried": list(row.tried or []),
                    "at": row.updated_at,
                }
            )
    return listed


async def channel_report(
    ctx: ServiceContext, rt: DeliveryRuntime, promotion_id: str | None
) -> list[dict[str, Any]]:
    s, st = store.spend, store.channel_stats
    async with ctx.db.connect() as conn:
        query = select(s.c.channel, s.c.spent, s.c.sent)
        if promotion_id is not None:
            query = query.where(s.c.promotion_id == promotion_id)
        spend: dict[str, list[float]] = {}
        for r in (await conn.execute(query)).all():
            entry = spend.setdefault(r.channel, [0.0, 0])
            entry[0] += float(r.spent)
            entry[1] += int(r.sent)
        stats = {r.channel: r for r in (await conn.execute(select(st))).all()}
    report = []
    for name, provider in rt.providers.items():
        config = rt.config.channel(name)
        spent, sent = spend.get(name, [0.0, 0])
        row = stats.get(name)
        total = (row.accepted + row.failed) if row is not None else 0
        budget = config.budget_per_promotion
        report.append(
            {
                "channel": name,
                "adapter": config.adapter,
                "configured": provider.configured,
                "cost": rt.terms[name].cost,
                "budget_per_promotion": budget,
                "reserve_share": config.reserve_share,
                "spend": round(spent, 6),
                "sent": int(sent),
                "remaining": (
                    None if budget is None or promotion_id is None else round(budget - spent, 6)
                ),
                "success_rate": (row.accepted / total) if row is not None and total else None,
                "circuit": provider.state().value,
                "rate_per_s": config.rate_per_s,
            }
        )
    return report
