"""battles.regenerated (the arena's replaced replies, see `Battle.regenerated`), and
`meta.schema_version` 2 so a posttrain from before migrations refuses this database instead of
misreading it.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from posttrain.migrations import add_column_once

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_column_once("battles", sa.Column("regenerated", sa.JSON(), nullable=True))
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value="2"))
