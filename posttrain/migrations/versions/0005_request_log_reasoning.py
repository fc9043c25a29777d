"""request_logs.reasoning: the reasoning trace a thinking model wrote before its answer (see
`RequestLog.reasoning`), so harvested answers export with it.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa

from posttrain.migrations import add_column_once

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_column_once("request_logs", sa.Column("reasoning", sa.Text(), nullable=True))
