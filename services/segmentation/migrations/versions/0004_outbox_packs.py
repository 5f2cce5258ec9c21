"""Packed outbox rows: many messages of one topic and lane in one row.

The ingest announces each batch's new activities in one row per lane instead of one
per activity: fewer rows to write, and for the relay to delete.
Waiting packs are unpacked into one row per message on the way down.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from shared.migrations import add_outbox_packs, drop_outbox_packs

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "segmentation"


def upgrade() -> None:
    add_outbox_packs(SCHEMA)


def downgrade() -> None:
    drop_outbox_packs(SCHEMA)
