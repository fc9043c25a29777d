"""Feedback on harvested answers: each request_logs row gets the engine's response id
(chatcmpl-/cmpl-, shared by the n choices of one request), its choice index and a hash of its
prompt (to pair answers to the same prompt); `feedback` holds ratings and corrections, one per
row and API key (hashed).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("request_logs", sa.Column("response_id", sa.String(128), nullable=True))
    op.add_column("request_logs", sa.Column("choice", sa.Integer(), nullable=True))
    op.add_column("request_logs", sa.Column("prompt_hash", sa.String(64), nullable=True))
    op.create_index("ix_request_logs_response_id", "request_logs", ["response_id"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("request_log_id", sa.Integer(), sa.ForeignKey("request_logs.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("rating", sa.Integer(), nullable=True),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("request_log_id", "key_hash", name="uq_feedback_request_log_id_key_hash"),
    )
    op.create_index("ix_feedback_request_log_id", "feedback", ["request_log_id"])
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])
