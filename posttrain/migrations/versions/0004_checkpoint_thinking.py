"""checkpoints.thinking: how a model reasons before it answers (see `Checkpoint.thinking`).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa

from posttrain.migrations import add_column_once

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_column_once("checkpoints", sa.Column("thinking", sa.String(32), nullable=True))
