"""Jobs and their files (uploads, progress, claims, results).

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tritonasr_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=True),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("cancelled_at", sa.Double, nullable=True),
    )
    op.create_index("ix_tritonasr_jobs_key_created", "tritonasr_jobs", ["key_hash", "created_at"])
    op.create_table(
        "tritonasr_job_files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("tritonasr_jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=True),
        sa.Column("audio", sa.LargeBinary, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("done_ms", sa.BigInteger, nullable=False),
        sa.Column("total_ms", sa.BigInteger, nullable=True),
        sa.Column("duration_ms", sa.BigInteger, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.Column("queued_at", sa.Double, nullable=False),
        sa.Column("not_before", sa.Double, nullable=True),
        sa.Column("claim_token", sa.String(40), nullable=True),
        sa.Column("claimed_by", sa.Text, nullable=True),
        sa.Column("lease_until", sa.Double, nullable=True),
        sa.Column("finished_at", sa.Double, nullable=True),
    )
    op.create_index("ix_tritonasr_job_files_job", "tritonasr_job_files", ["job_id", "position"])
    op.create_index("ix_tritonasr_job_files_claim", "tritonasr_job_files", ["status", "queued_at"])


def downgrade() -> None:
    op.drop_table("tritonasr_job_files")
    op.drop_table("tritonasr_jobs")
