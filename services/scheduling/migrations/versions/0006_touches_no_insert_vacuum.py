"""No autovacuum of the touches for their inserts alone (PostgreSQL).

Since PostgreSQL 13, autovacuum also visits a table once its inserts pass a threshold (1,000
plus 20% of its rows), to mark the new pages all-visible and freeze them early. That helps a
table whose rows are never updated. Every planned touch is updated within its deadline
(dispatched, suppressed, deferred or cancelled), and those updates bring the usual vacuums,
triggered by dead rows, which do the same work. A bulk plan (1,000,000 participants: 5,000,000
rows) set off an extra vacuum of the whole table in the minute when the plan's first touches
came due. In the benchmark (`--participants 1000000 --rate 10000`), 3 of 8 runs with it had a
p99 from due time to touch.due of 3.1-5.3 s, the touches late by more than 1 s all due in the
first 11-17 s of the day; in 6 runs without it, p99 was 133-512 ms.

The analyze after a bulk plan stays (its own threshold), and so do the vacuums by dead rows
and against wraparound. SQLite has no autovacuum: nothing to do there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "scheduling"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {SCHEMA}.touches SET (autovacuum_vacuum_insert_threshold = -1)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {SCHEMA}.touches RESET (autovacuum_vacuum_insert_threshold)")
