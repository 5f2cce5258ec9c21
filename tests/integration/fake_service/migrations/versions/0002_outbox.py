"""outbox and a widgets column

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.migrations import create_outbox, drop_outbox

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _schema() -> str:
    schema = op.get_context().version_table_schema
    assert schema is not None
    return schema


def upgrade() -> None:
    schema = _schema()
    with op.batch_alter_table("widgets", schema=schema) as batch:
        batch.add_column(sa.Column("size", sa.Integer, nullable=False, server_default="0"))
    create_outbox(schema)


def downgrade() -> None:
    schema = _schema()
    drop_outbox(schema)
    with op.batch_alter_table("widgets", schema=schema) as batch:
        batch.drop_column("size")
