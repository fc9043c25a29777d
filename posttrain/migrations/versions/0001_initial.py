"""The schema as posttrain created it before migrations (`create_all` plus the
`meta.schema_version` row 1): a database made then is stamped at this revision.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("parent", sa.String(200), nullable=True),
        sa.Column("recipe", sa.JSON(), nullable=False),
        sa.Column("datasets", sa.JSON(), nullable=False),
        sa.Column("git_commit", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
    )
    op.create_index("ix_checkpoints_name", "checkpoints", ["name"], unique=True)
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("suite", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("lineage", sa.JSON(), nullable=False),
        sa.Column("harness_version", sa.String(64), nullable=False),
        sa.Column("samples_path", sa.Text(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_eval_runs_model", "eval_runs", ["model"])
    op.create_table(
        "eval_scores",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("eval_runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("metric", sa.String(100), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("stderr", sa.Float(), nullable=True),
        sa.Column("n", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_eval_scores_run_id", "eval_scores", ["run_id"])
    op.create_index("ix_eval_scores_model", "eval_scores", ["model"])
    op.create_table(
        "battles",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_hash", sa.String(64), nullable=False),
        sa.Column("model_a", sa.String(200), nullable=False),
        sa.Column("model_b", sa.String(200), nullable=False),
        sa.Column("conversation_a", sa.JSON(), nullable=False),
        sa.Column("conversation_b", sa.JSON(), nullable=False),
        sa.Column("vote", sa.String(16), nullable=False),
        sa.Column("source", sa.String(206), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("voted_at", sa.DateTime(), nullable=False),
    )
    for column in ("session_hash", "model_a", "model_b", "voted_at"):
        op.create_index(f"ix_battles_{column}", "battles", [column])
    op.create_table(
        "request_logs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("completion", sa.Text(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_request_logs_model", "request_logs", ["model"])
    op.create_index("ix_request_logs_created_at", "request_logs", ["created_at"])
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])

