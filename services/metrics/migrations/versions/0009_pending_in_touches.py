"""Counts waiting for a touch's segment kept in the touch's row (`touches.pending`).

A touch counted before its touch.planned (topics are consumed concurrently: a send often
comes first) was counted under segment "" with one `pending` row per measure (a send: sends,
sent and cost), read back and deleted when touch.planned came. In the 100,000-participant
benchmark that was about 5 us of PostgreSQL per event (insert, look-up and delete) for
rows nobody else reads. Those counts now live in a JSON column of the touch, whose row the
counting writes in the same transaction anyway and reads before touch.planned moves them.
The pending rows are moved into their touches, then the table is dropped.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from shared.db import UtcDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"

_meta = sa.MetaData(schema=SCHEMA)
_touches = sa.Table(
    "touches",
    _meta,
    sa.Column("touch_id", sa.String(128), primary_key=True),
    sa.Column("pending", sa.Text, nullable=True),
)
_pending = sa.Table(
    "pending",
    _meta,
    sa.Column("touch_id", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("minute", UtcDateTime(), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("measure", sa.String(48), nullable=False),
    sa.Column("value", sa.Float, nullable=False),
)


def upgrade() -> None:
    op.add_column("touches", sa.Column("pending", sa.Text, nullable=True), schema=SCHEMA)
    bind = op.get_bind()
    waiting: dict[str, list[list[object]]] = {}
    rows = bind.execute(sa.select(_pending).order_by(_pending.c.touch_id, _pending.c.seq))
    for r in rows:
        minute = int(r.minute.timestamp()) // 60
        waiting.setdefault(r.touch_id, []).append([minute, r.channel, r.measure, r.value])
    for touch_id, counts in waiting.items():
        bind.execute(
            sa.update(_touches)
            .where(_touches.c.touch_id == touch_id)
            .values(pending=json.dumps(counts))
        )
    op.drop_table("pending", schema=SCHEMA)


def downgrade() -> None:
    bind = op.get_bind()
    _pending.create(bind)
    found = bind.execute(
        sa.select(_touches.c.touch_id, _touches.c.pending).where(_touches.c.pending.is_not(None))
    )
    rows = [
        {
            "touch_id": touch_id,
            "seq": seq,
            "minute": datetime.fromtimestamp(minute * 60, UTC),
            "channel": channel,
            "measure": measure,
            "value": value,
        }
        for touch_id, stored in found
        for seq, (minute, channel, measure, value) in enumerate(json.loads(stored))
    ]
    if rows:
        bind.execute(sa.insert(_pending), rows)
    op.drop_column("touches", "pending", schema=SCHEMA)
