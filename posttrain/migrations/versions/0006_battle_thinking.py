"""battles.thinking: the mode both sides of an arena battle ran in (see `Battle.thinking`), so
the leaderboard can rate each mode apart. Battles stored before it have none recorded (NULL).

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa

from posttrain.migrations import add_column_once

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_column_once("battles", sa.Column("thinking", sa.Boolean(), nullable=True))
