"""Packed outbox rows: many messages of one topic and lane in one row.

The relay of every service reads them (`shared.outbox`); this service writes none yet.
Waiting packs are unpacked into one row per message on the way down.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from shared.migrations import add_outbox_packs, drop_outbox_packs

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"


def upgrade() -> None:
    add_outbox_packs(SCHEMA)


def downgrade() -> None:
    drop_outbox_packs(SCHEMA)
