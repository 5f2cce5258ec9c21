"""Room for in-place (HOT) updates of the per-user aggregates on PostgreSQL.

Every accepted activity updates its user's aggregates row (one upsert per user and batch).
An update that changes no indexed column (none of the updated ones is) and finds room on
the row's page is a heap-only tuple (HOT): no new entry in the primary key, no second heap
page dirtied. The aggregates are written by the rebuild in full pages (fillfactor 100), so
the first update of a row moved it to another page and added a primary key entry. Pages
now keep 15% free: each has room for about a dozen new row versions between prunes.
Only pages written from now on leave that room (no table rewrite; the rebuild writes every
row again). SQLite is unchanged.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "segmentation"
AGGREGATES_FILLFACTOR = 85


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {SCHEMA}.aggregates SET (fillfactor = {AGGREGATES_FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {SCHEMA}.aggregates RESET (fillfactor)")
