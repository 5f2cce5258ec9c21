"""widgets

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str | None:
    # The fake service's schema differs per test; a real service writes "segmentation".
    return op.get_context().version_table_schema


def upgrade() -> None:
    op.create_table(
        "widgets",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        schema=_schema(),
    )


def downgrade() -> None:
    op.drop_table("widgets", schema=_schema())
