"""Touches found by user: the hash index on the touch id and the index by promotion are
dropped.

- Every statement that looks a touch up by its id also knows its user (dispatch decisions,
  delivery outcomes, cancellation and erasure), so it goes through `ix_touches_user`
  (user_id, due_at), and the dispatcher, which holds the claimed row, gives its due time
  too. A user has a handful of touches per promotion.
- A promotion's touches are those of its participants (`plan_members`, keyed by promotion
  then user): cancelling walks them user by user, the plan summary joins them.

Planning then writes two indexes per touch instead of four, and every status change two
index entries fewer. Measured on PostgreSQL 15, 1,000,000 touch rows inserted in one
statement: the heap 1.7 s, the hash index on the id +2.6 s, (promotion_id, status) +1.7 s,
(user_id, due_at) +3.0 s.

SQLite keeps its primary key on the touch id (nothing is measured there).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "scheduling"


def upgrade() -> None:
    op.drop_index("ix_touches_promotion", table_name="touches", schema=SCHEMA)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_touches_id", table_name="touches", schema=SCHEMA)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.create_index(
            "ix_touches_id", "touches", ["touch_id"], schema=SCHEMA, postgresql_using="hash"
        )
    op.create_index("ix_touches_promotion", "touches", ["promotion_id", "status"], schema=SCHEMA)
