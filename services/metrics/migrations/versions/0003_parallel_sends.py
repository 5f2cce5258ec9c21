"""Touches: accepted channel sends (parallel touches count as sent once); promotion index.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"


def upgrade() -> None:
    op.add_column(
        "touches",
        sa.Column("sends", sa.BigInteger, nullable=False, server_default="0"),
        schema=SCHEMA,
    )
    # Touches sent before this revision had one send each.
    op.execute(f"UPDATE {SCHEMA}.touches SET sends = 1 WHERE exposure = 'sent'")
    op.create_index("ix_touches_promotion_wave", "touches", ["promotion_id", "wave"], schema=SCHEMA)


def downgrade() -> None:
    op.drop_index("ix_touches_promotion_wave", table_name="touches", schema=SCHEMA)
    op.drop_column("touches", "sends", schema=SCHEMA)
