"""Per-minute aggregates with one column per measure instead of one row per measure.

A batch of events writes a third of the rows it wrote (a send's sends, sent and cost share
one row), and the row count is what the aggregation's database time is spent on. Existing
rows are moved over, summed per minute and dimensions.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = "metrics"
TS = sa.DateTime(timezone=True)
KEY = ("promotion_id", "minute", "wave", "channel", "segment", "variant")
# The measures as of this revision, frozen here (a measure's column: its name, "." as "_");
# as words, one list to read rather than one line per name.
MEASURES = (  # noqa: SIM905
    "planned ltv ltv_touches sends sent cost failed delivered opened clicked bounced"
    " complained unsubscribed orders revenue converted holdout_orders holdout_revenue"
    " holdout_converted"
).split() + [
    f"suppressed.{reason}"
    for reason in (  # noqa: SIM905
        "cap_7d cap_30d fatigue quiet_hours no_consent unsubscribed complained holdout"
        " cancelled erased abuse budget provider_failed"
    ).split()
]


def _column(measure: str) -> str:
    return measure.replace(".", "_")


def _key_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("promotion_id", sa.String(128), primary_key=True),
        sa.Column("minute", TS, primary_key=True),
        sa.Column("wave", sa.String(16), primary_key=True),
        sa.Column("channel", sa.String(16), primary_key=True),
        sa.Column("segment", sa.String(64), primary_key=True),
        sa.Column("variant", sa.String(64), primary_key=True),
    ]


def upgrade() -> None:
    op.rename_table("minute_counts", "minute_counts_by_measure", schema=SCHEMA)
    op.create_table(
        "minute_counts",
        *_key_columns(),
        *(sa.Column(_column(m), sa.Float, nullable=False, server_default="0") for m in MEASURES),
        schema=SCHEMA,
    )
    key = ", ".join(KEY)
    sums = ", ".join(f"SUM(CASE WHEN measure = '{m}' THEN value ELSE 0 END)" for m in MEASURES)
    op.execute(
        f"INSERT INTO {SCHEMA}.minute_counts ({key}, {', '.join(_column(m) for m in MEASURES)})"
        f" SELECT {key}, {sums} FROM {SCHEMA}.minute_counts_by_measure GROUP BY {key}"
    )
    op.drop_table("minute_counts_by_measure", schema=SCHEMA)


def downgrade() -> None:
    op.rename_table("minute_counts", "minute_counts_by_column", schema=SCHEMA)
    op.create_table(
        "minute_counts",
        *_key_columns(),
        sa.Column("measure", sa.String(48), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
        schema=SCHEMA,
    )
    key = ", ".join(KEY)
    for m in MEASURES:
        op.execute(
            f"INSERT INTO {SCHEMA}.minute_counts ({key}, measure, value)"
            f" SELECT {key}, '{m}', {_column(m)} FROM {SCHEMA}.minute_counts_by_column"
            f" WHERE {_column(m)} <> 0"
        )
    op.drop_table("minute_counts_by_column", schema=SCHEMA)
