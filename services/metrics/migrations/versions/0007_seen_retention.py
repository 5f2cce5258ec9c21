"""An index on seen_events.seen_at, for deleting the ids older than the retention.

BRIN on PostgreSQL: seen_at grows with insertion order, so a few pages of summaries find the
old rows, and an insert costs next to nothing more (a b-tree would be another insert per
counted event). SQLite has no BRIN: a plain index there.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"


def upgrade() -> None:
    op.create_index(
        "ix_seen_events_seen_at",
        "seen_events",
        ["seen_at"],
        schema=SCHEMA,
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index("ix_seen_events_seen_at", table_name="seen_events", schema=SCHEMA)
